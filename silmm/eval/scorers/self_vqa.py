"""The `self` scorer: the LMM judges its own images with yes/no VQA, as in SILMM's self-feedback (Eq. 1).

Who judges: the model being evaluated (the iteration's model), or the base model at model.path when
``feedback.judge=base`` (the same judge as training used).

What it asks:
- a benchmark's own yes/no questions (DPG-Bench, GenEval-derived) as they are: answer "yes" when
  p(yes) > p(no); correct when that is the expected answer;
- a multiple-choice question (TIFA) becomes one yes/no question per choice, "<question> Is the answer
  <choice>?", and the choice with the highest p(yes) is the answer. This is a deviation from TIFA, whose
  VQA models pick among the choices directly; results.json lists it. A question whose choices are exactly
  yes/no is asked as a yes/no question;
- a benchmark without questions (T2I-CompBench++, the toy) gets silmm's decomposition: the judge writes
  questions from the in-context examples (`questions.icl_examples`) greedily, parsed as the questions
  stage parses them (Prompt-Q when nothing usable comes out); the expected answer is "yes".

Per-image score: mean over questions of p(yes) - p(no) (for a multiple-choice question, of its chosen
choice). p_yes / p_no are stored for yes/no questions and NaN for multiple-choice ones. Each image is
encoded once per call and its prefix reused for its questions (the backend's yes_no).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from silmm import questions as Q
from silmm.eval.records import BenchmarkPrompt, BenchmarkQuestion, ImageAnswers
from silmm.eval.scorers import Scorer, ScorerContext

log = logging.getLogger(__name__)

DEVIATION = ("scored by the evaluated LMM's own yes/no VQA (silmm's `self` scorer), not by the benchmark's "
             "official scorer; numbers are not comparable with published ones")
MC_DEVIATION = ("multiple-choice questions were asked as one yes/no question per choice ('<question> Is the "
                "answer <choice>?'), the choice with the highest p(yes) taken as the answer")
DECOMPOSITION = ("prompts without the benchmark's own questions were scored on questions the judge wrote "
                 "itself (silmm's self-questioning, greedy), not on the benchmark's protocol")


@dataclass(frozen=True)
class _Ask:
    """One question as the judge is asked it: the yes/no texts it becomes, and how to read the answers."""

    text: str  # the question as recorded (the benchmark's text, or the judge's own)
    expected: str  # expected answer
    choices: tuple[str, ...]  # () = yes/no; else one yes/no text per choice
    texts: tuple[str, ...]  # what the judge is asked (1 for yes/no, len(choices) otherwise)


def _is_yes_no(q: BenchmarkQuestion) -> bool:
    return not q.choices or sorted(c.strip().lower() for c in q.choices) == ["no", "yes"]


def choice_question(question: str, choice: str) -> str:
    return f"{question.strip()} Is the answer {choice.strip()}?"


def _asks(q: BenchmarkQuestion) -> _Ask:
    if _is_yes_no(q):
        return _Ask(q.text, q.answer.strip().lower(), (), (q.text,))
    return _Ask(q.text, q.answer.strip().lower(), q.choices, tuple(choice_question(q.text, c) for c in q.choices))


class SelfVQA(Scorer):
    name = "self"
    version = "1"

    def __init__(self, ctx: ScorerContext):
        super().__init__(ctx)
        self._judge = None

    # the judge ----------------------------------------------------------------------------------
    @property
    def judge(self):
        if self._judge is None:
            from silmm.models import load_judge, separate_judge

            run = self.ctx.run
            if not separate_judge(run.config) and self.ctx.backend is not None:
                self._judge = self.ctx.backend
            else:
                self._judge = load_judge(run, self.ctx.iteration + 1)
        return self._judge

    @classmethod
    def identity_of(cls, run: Any) -> dict[str, Any]:
        q = run.config.questions
        return {"scorer": cls.name, "version": cls.version, "judge": run.config.feedback.judge.value,
                "max_questions": q.max_questions, "max_new_tokens": q.max_new_tokens,
                "icl_examples": Q.load_examples(q.icl_examples), "feedback_batch_size": run.config.feedback.batch_size}

    @classmethod
    def model_paths(cls, run: Any, iteration: int) -> dict[str, Path]:
        from silmm.models import judge_path, separate_judge

        return {"judge": judge_path(run, iteration + 1)} if separate_judge(run.config) else {}

    @classmethod
    def deviations(cls, benchmark: str, prompts: Sequence[BenchmarkPrompt]) -> list[str]:
        out = [DEVIATION]
        if any(not _is_yes_no(q) for p in prompts for q in p.questions):
            out.append(MC_DEVIATION)
        if any(not p.questions for p in prompts):
            out.append(DECOMPOSITION)
        return out

    # scoring ------------------------------------------------------------------------------------
    def own_questions(self, prompts: Sequence[BenchmarkPrompt]) -> list[list[str]]:
        """The judge's decomposition of each prompt (greedy; Prompt-Q when nothing usable comes out)."""
        cfg = self.ctx.run.config
        if not prompts:
            return []
        examples = Q.load_examples(cfg.questions.icl_examples)
        written = self.judge.write_text([Q.question_request(p.text, examples) for p in prompts], [0] * len(prompts),
                                        max_new_tokens=cfg.questions.max_new_tokens, temperature=0.0)
        return [Q.parse_questions(w, cfg.questions.max_questions) or Q.prompt_q(p.text)
                for w, p in zip(written, prompts, strict=True)]

    def score(self, prompts: Sequence[BenchmarkPrompt], images: Sequence[np.ndarray]) -> list[list[ImageAnswers]]:
        need_own = [p for p in prompts if not p.questions]
        own = dict(zip([p.id for p in need_own], self.own_questions(need_own), strict=True))
        out = []
        for prompt, imgs in zip(prompts, images, strict=True):
            if prompt.questions:
                asks = [_asks(q) for q in prompt.questions]
            else:
                asks = [_Ask(q, "yes", (), (q,)) for q in own[prompt.id]]
            out.append(self._answer(asks, np.asarray(imgs)))
        return out

    def _answer(self, asks: list[_Ask], images: np.ndarray) -> list[ImageAnswers]:
        texts = [t for a in asks for t in a.texts]
        per_call = max(1, self.ctx.run.config.feedback.batch_size // len(texts))  # ~batch_size pairs a forward
        probs = []
        for i in range(0, len(images), per_call):
            chunk = images[i:i + per_call]
            probs += self.judge.yes_no(chunk, [texts] * len(chunk))
        results = []
        for p_yes_all, p_no_all in probs:
            p_yes_all, p_no_all = np.asarray(p_yes_all, np.float64), np.asarray(p_no_all, np.float64)
            p_yes, p_no, answers, correct, margins = [], [], [], [], []
            k = 0
            for a in asks:
                ys, ns = p_yes_all[k:k + len(a.texts)], p_no_all[k:k + len(a.texts)]
                k += len(a.texts)
                if not a.choices:
                    answer = "yes" if ys[0] > ns[0] else "no"
                    p_yes.append(float(ys[0]))
                    p_no.append(float(ns[0]))
                    margins.append(float(ys[0] - ns[0]))
                else:
                    best = int(np.argmax(ys))
                    answer = a.choices[best]
                    p_yes.append(math.nan)
                    p_no.append(math.nan)
                    margins.append(float(ys[best] - ns[best]))
                answers.append(answer)
                correct.append(float(answer.strip().lower() == a.expected))
            results.append(ImageAnswers(score=float(np.mean(margins)), questions=[a.text for a in asks],
                                        p_yes=p_yes, p_no=p_no, answers=answers, correct=correct))
        return results
