"""Oracle evaluation of a toy LMM on held-out prompts, and how well its self-feedback agrees with the oracle.

For each held-out prompt the model draws `eval_samples` images with its own generation (``generate``: a
continuous model without DropDiv; seeds fixed across iterations, so iterations are compared on the same
noise), the exact oracle scores them, and the model scores them
itself the SILMM way: it writes questions for the prompt, answers them about each image, and averages
p(yes) - p(no). Agreement = how often the self-score orders two images of one prompt as the oracle does
(the only thing pair selection uses), plus the mean per-prompt Spearman correlation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from silmm import questions as Q
from silmm.feedback import vqa_score
from silmm.seeding import derive_seed
from silmm.toy import world


@dataclass
class PromptResult:
    prompt: str
    category: str
    oracle: list[float]  # overall (all checks hold) per image
    partial: list[float]  # fraction of checks that hold per image
    self_score: list[float]  # the model's own score per image
    questions: list[str]
    questions_exact: bool  # the model wrote exactly the decomposition of toy.question_style
    strict: list[float] | None = None  # overall, and no object beyond those the prompt names


def check_fraction(prompt: str, image: np.ndarray) -> float:
    objects = world.parse(image)
    checks = world.checks(world.parse_prompt(prompt))
    return float(np.mean([c.holds(objects) for c in checks]))


def evaluate_prompts(backend, prompts: Sequence[str], samples: int, run_seed: int, batch_size: int,
                     examples: Sequence[tuple[str, Sequence[str]]], max_questions: int = 8,
                     max_new_tokens: int = 64, judge=None, style: str = "named",
                     decode_seed: int | None = None) -> tuple[list[PromptResult], dict[str, np.ndarray]]:
    """Results per prompt, and the images of every prompt ({prompt: uint8 [samples, H, W, 3]}).
    ``backend`` draws the images; ``judge`` (default: the same model) writes questions and answers them;
    ``style``: the question style whose decomposition counts as exact; ``decode_seed``: every image is
    decoded from this one seed (sampling.decoder_noise=fixed) instead of its own."""
    judge = backend if judge is None else judge
    flat = [(i, j) for i in range(len(prompts)) for j in range(samples)]
    images = np.zeros((len(prompts), samples, world.SIZE, world.SIZE, 3), np.uint8)
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        seeds = [derive_seed(run_seed, 0, i, j, "toy-eval") for i, j in chunk]
        tokens = backend.generate([prompts[i] for i, _ in chunk], seeds)
        decode_seeds = seeds if decode_seed is None else [decode_seed] * len(seeds)
        for (i, j), image in zip(chunk, backend.decode(tokens, decode_seeds), strict=True):
            images[i, j] = image
    written: list[str] = []
    for start in range(0, len(prompts), batch_size):  # greedy: the seeds are not used
        chunk = prompts[start:start + batch_size]
        written += judge.write_text([Q.question_request(p, examples) for p in chunk], [0] * len(chunk),
                                      max_new_tokens=max_new_tokens, temperature=0.0)
    asked = [Q.parse_questions(w, max_questions) or Q.prompt_q(p) for w, p in zip(written, prompts, strict=True)]
    answers = judge.yes_no(images.reshape(-1, *images.shape[2:]), [qs for qs in asked for _ in range(samples)])
    results = []
    for i, prompt in enumerate(prompts):
        truth = world.questions(prompt, style)
        oracle = [world.score(prompt, im).overall for im in images[i]]
        results.append(PromptResult(
            prompt=prompt, category=world.parse_prompt(prompt).category, oracle=oracle,
            strict=[ok * world.nothing_extra(prompt, im) for ok, im in zip(oracle, images[i], strict=True)],
            partial=[check_fraction(prompt, im) for im in images[i]],
            self_score=[vqa_score(y, n) for y, n in answers[i * samples:(i + 1) * samples]], questions=asked[i],
            questions_exact=[q.lower() for q in asked[i]] == [q.lower() for q in truth]))
    return results, {p: images[i] for i, p in enumerate(prompts)}


def pairwise_agreement(results: Sequence[PromptResult]) -> tuple[float, int]:
    """Among pairs of images of one prompt with different oracle (partial) scores, the share that the
    self-score orders the same way (ties in self-score count half); and the number of such pairs."""
    agree, pairs = 0.0, 0
    for r in results:
        for a in range(len(r.partial)):
            for b in range(a + 1, len(r.partial)):
                d_oracle = r.partial[a] - r.partial[b]
                if d_oracle == 0:
                    continue
                d_self = r.self_score[a] - r.self_score[b]
                agree += 0.5 if d_self == 0 else float(np.sign(d_self) == np.sign(d_oracle))
                pairs += 1
    return (agree / pairs if pairs else math.nan), pairs


def mean_spearman(results: Sequence[PromptResult]) -> tuple[float, int]:
    """Mean over prompts of Spearman(self-score, oracle partial score); prompts where either is constant
    have no rank correlation and are left out (their count is the second value's complement)."""
    values = []
    for r in results:
        if len(set(r.partial)) > 1 and len(set(r.self_score)) > 1:
            values.append(float(spearmanr(r.self_score, r.partial).statistic))
    return (float(np.mean(values)) if values else math.nan), len(values)


def summarize(results: Sequence[PromptResult]) -> dict:
    by_cat = {c: [x for r in results if r.category == c for x in r.oracle] for c in world.CATEGORIES}
    agreement, pairs = pairwise_agreement(results)
    rho, n_rho = mean_spearman(results)
    return {
        "overall": float(np.mean([x for r in results for x in r.oracle])),
        "strict": (float(np.mean([x for r in results for x in r.strict]))
                   if all(r.strict is not None for r in results) else math.nan),
        "partial": float(np.mean([x for r in results for x in r.partial])),
        "per_category": {c: float(np.mean(v)) for c, v in by_cat.items() if v},
        "self_score": float(np.mean([x for r in results for x in r.self_score])),
        "agreement_pairwise": agreement, "agreement_pairs": pairs,
        "spearman_mean": rho, "spearman_prompts": n_rho,
        "questions_exact": float(np.mean([r.questions_exact for r in results])),
    }
