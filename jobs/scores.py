"""Stage 4 -- VQA self-feedback for one shard: the model scores its own samples.

Reads   iter_K/samples/shard_NNNNN.h5 (images, or tokens/features to decode when images were not
        stored) and iter_K/questions/shard_NNNNN.h5; the iteration's starting model
Writes  iter_K/scores/shard_NNNNN.h5: per sample p(yes), p(no) for each of its prompt's questions and
        the score -- `feedback.method=vqa`: mean of p(yes) - p(no) (paper Eq. 1); `ratio_yes` and
        `random` are the paper's ablation controls; `scorer`: another judge's score (feedback.scorer, a
        registered scorer such as the toy's exact oracle), a control that is not self-improvement.

Each image is encoded once and its prefix reused for all of its questions (the backend's yes_no).
The samples shard streams: its ids and seeds are held, each prompt's PNGs (or tokens / features to
decode) are read when it is scored, so memory stays at a few prompts' data whatever the shard's size.
Run directly: python -m jobs.scores --run RUN --iteration K --shard I
"""

from __future__ import annotations

import logging
from typing import Any

import h5py
import numpy as np
import torch

from silmm import feedback as F
from silmm.config import FeedbackMethod, ImageStorage
from silmm.eval.records import BenchmarkPrompt
from silmm.eval.scorers import ScorerContext, get_scorer
from silmm.images import from_png, to_png
from silmm.models import load_backend, load_judge, separate_judge
from silmm.rundir import RunDir
from silmm.seeding import decode_seed
from silmm.store import Shard
from silmm.tasks import open_writer, progress, read_input

log = logging.getLogger("jobs.scores")
# what the job holds of a samples shard; a prompt's images or tokens/features are read when it is scored
ID_COLUMNS = ("prompt_id", "sample_index", "seed")


def run(run: RunDir, iteration: int, shard: int) -> dict[str, Any]:
    cfg = run.config
    samples = read_input(run, iteration, "samples", shard, columns=ID_COLUMNS)  # the rest verified, not held
    questions = read_input(run, iteration, "questions", shard)
    q_of = _questions_by_prompt(questions)
    rows_of: dict[int, list[int]] = {}
    for row, pid in enumerate(samples["prompt_id"]):
        rows_of.setdefault(int(pid), []).append(row)
    missing = [pid for pid in rows_of if pid not in q_of]
    if missing:
        raise ValueError(f"{questions.path}: no questions for prompts {missing[:10]} of {samples.path}")

    writer = open_writer(run, iteration, "scores", shard, samples.meta.shard_count)
    todo = [pid for pid in rows_of if pid not in writer.done]
    method = cfg.feedback.method
    keep_best_worst = cfg.sampling.store_images is ImageStorage.best_worst
    needs_images = method is not FeedbackMethod.random or keep_best_worst  # (random needs no images)
    stored_images = samples.meta.extra.get("images") == ImageStorage.all.value
    # the model answers for vqa / ratio_yes; another scorer needs a model only to decode unstored samples
    # (a scorer that wants the model's answers, like `self`, loads its judge itself)
    judges = method in (FeedbackMethod.vqa, FeedbackMethod.ratio_yes)
    backend = load_judge(run, iteration) if todo and judges else None
    decoder = None
    if todo and needs_images and not stored_images:
        # a base judge cannot decode what this iteration's model sampled
        decoder = backend if backend is not None and not separate_judge(cfg) else load_backend(run, iteration)
    scorer, text_of = None, {}
    if method is FeedbackMethod.scorer and todo:  # the images the iteration's start model drew, scored by another
        scorer = get_scorer(cfg.feedback.scorer, ScorerContext(run, iteration - 1, decoder))
        prompts = read_input(run, iteration, "prompts", shard, columns=("prompt_id", "text"))
        text_of = {int(i): str(t) for i, t in zip(prompts["prompt_id"], prompts["text"], strict=True)}
    with SampleRows(samples, run.config.store.file_locking) as source:
        for pid in progress(todo, len(todo), f"scores shard {shard}", cfg.logging.progress):
            rows, qs = rows_of[pid], q_of[pid]
            seeds = [int(x) for x in samples["seed"][rows]]
            images = _images(decoder, source, rows, cfg.run.seed, stored_images,
                             cfg.sampling.decoder_noise.value) if needs_images else []
            if method is FeedbackMethod.random:
                p_yes = p_no = [np.zeros(len(qs), np.float32)] * len(rows)
                scores = [F.random_score(sd) for sd in seeds]
            elif scorer is not None:  # its own questions; the model's are kept, unanswered
                p_yes = p_no = [np.zeros(len(qs), np.float32)] * len(rows)
                prompt = BenchmarkPrompt(benchmark=str(getattr(cfg.prompts.source, "value", cfg.prompts.source)),
                                         id=str(pid), text=text_of[pid], category="")
                scores = [a.score for a in scorer.score([prompt], [np.stack(images)])[0]]
            else:
                per_call = max(1, cfg.feedback.batch_size // len(qs))  # images per forward: ~batch_size pairs
                answers = [a for i in range(0, len(rows), per_call)
                           for a in backend.yes_no(np.stack(images[i: i + per_call]),
                                                   [qs] * len(images[i: i + per_call]))]
                p_yes, p_no = [a[0] for a in answers], [a[1] for a in answers]
                score_fn = F.vqa_score if method is FeedbackMethod.vqa else F.ratio_yes_score
                scores = [score_fn(y, n) for y, n in zip(p_yes, p_no, strict=True)]
            record: dict[str, Any] = {
                "prompt_id": [pid] * len(rows), "sample_index": samples["sample_index"][rows],
                "score": np.asarray(scores, np.float32), "question_count": [len(qs)] * len(rows),
                "p_yes": np.concatenate(p_yes).astype(np.float32), "p_no": np.concatenate(p_no).astype(np.float32),
            }
            if keep_best_worst:
                order = np.argsort(-np.asarray(scores), kind="stable")
                keep = {int(order[0]), int(order[-1])}
                record["image_png"] = [to_png(images[i]) if i in keep else b"" for i in range(len(rows))]
            writer.add(pid, record)
    writer.meta.extra.update(method=method.value)
    path = writer.finish()
    log.info("wrote scores of %d prompts to %s", len(rows_of), path)
    return {"prompts": len(rows_of), "computed": len(todo)}


class SampleRows:
    """The rows of one prompt of a samples shard that :func:`read_input` has verified: its PNGs, or the
    tokens / features to decode (as float32), read on demand so that the job holds one prompt's data."""

    def __init__(self, samples: Shard, file_locking: bool):
        self.samples = samples
        self.file = h5py.File(samples.path, "r", locking=file_locking)

    def __enter__(self) -> SampleRows:
        return self

    def __exit__(self, *_: Any) -> None:
        self.file.close()

    def pngs(self, rows: list[int]) -> list[np.ndarray]:
        dset = self.file["image_png"]
        return [from_png(dset[r], f"{self.samples.path}: prompt {int(self.samples['prompt_id'][r])} sample "
                         f"{int(self.samples['sample_index'][r])}") for r in rows]

    def values(self, rows: list[int]) -> torch.Tensor:
        """Tokens (discrete) or H as float32 (continuous, whatever its stored precision)."""
        name = "tokens" if "tokens" in self.file else "features"
        values = self.file[name][rows]  # rows of one prompt: increasing, as h5py wants
        return torch.from_numpy(values if name == "tokens" else values.astype(np.float32))


def _questions_by_prompt(shard) -> dict[int, list[str]]:
    out, start = {}, 0
    for pid, count in zip(shard["prompt_id"], shard["question_count"], strict=True):
        out[int(pid)] = list(shard["question"][start: start + count])
        start += count
    return out


def _images(backend, source: SampleRows, rows: list[int], run_seed: int, stored: bool,
            noise: str) -> list[np.ndarray]:
    """Stored PNGs, or a fresh decode of the stored tokens/features with the samples stage's decode seeds."""
    if stored:
        return source.pngs(rows)
    samples = source.samples
    seeds = [decode_seed(run_seed, samples.meta.iteration, int(samples["prompt_id"][r]),
                         int(samples["sample_index"][r]), noise) for r in rows]
    return list(backend.decode(source.values(rows), seeds))


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main("scores"))
