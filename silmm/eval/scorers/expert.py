"""The `expert` scorer: each benchmark judged by the expert models it recommends, as transformers ships them.

Per benchmark and category (checkpoints from `eval.experts.<role>`, loaded once per task, on first use):

    T2I-CompBench++  color, shape, texture   BLIP VQA on the prompt's noun phrases + "?" (at most 8); image score
                                             = product of p(yes)/(p(yes)+p(no)) (the benchmark's aggregate)
                     non_spatial             CLIPScore (ViT-B/32)
                     spatial, numeracy       open-vocabulary detector (OWLv2 for UniDet) + the benchmark's rules
                     3d_spatial              detector + DPT depth + the benchmark's rules
                     complex                 the 3-in-1 average of the BLIP, CLIP and 2D-spatial parts
    DPG-Bench        its questions           BLIP VQA yes/no (mPLUG-large is recommended, not in transformers)
    TIFA             its questions           BLIP VQA; a multiple-choice question answered free-form and mapped to
                                             the nearest choice (sentence embeddings when installed, else the VQA
                                             model's likelihood of each choice; results say which)
    GenEval          its requirements        Mask2Former instances + CLIP ViT-L/14 colours + GenEval's rules

Each image is preprocessed once per judge and call; detections and depth are computed once per image and
shared by the categories that need them (complex). Every substitution is a deviation in results.json.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from silmm.eval.records import BenchmarkPrompt, ImageAnswers
from silmm.eval.scorers import Scorer, ScorerContext

# role -> (module, class): the judges, loaded through their own `load(path, device, dtype)`
JUDGES = {
    "vqa": ("silmm.eval.scorers.blip_vqa", "BlipVQA"),
    "clip": ("silmm.eval.scorers.clip", "ClipJudge"),
    "clip_large": ("silmm.eval.scorers.clip", "ClipJudge"),
    "detector": ("silmm.eval.scorers.detector", "Detector"),
    "depth": ("silmm.eval.scorers.depth", "DepthJudge"),
    "segmentation": ("silmm.eval.scorers.mask2former", "Segmenter"),
}
# which judges a benchmark's categories need
ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    "t2i_compbench": {"color": ("vqa",), "shape": ("vqa",), "texture": ("vqa",), "non_spatial": ("clip",),
                      "spatial": ("detector",), "numeracy": ("detector",), "3d_spatial": ("detector", "depth"),
                      "complex": ("vqa", "clip", "detector")},
    "dpg_bench": {"*": ("vqa",)},
    "tifa": {"*": ("vqa",)},
    "geneval": {"*": ("segmentation", "clip_large")},
}
DEVIATIONS = {
    "t2i_compbench": ["2D/3D spatial, numeracy and the spatial part of complex use OWLv2 (transformers) instead of "
                      "UniDet, which no well-kept library ships; the benchmark's formulas are kept",
                      "3D spatial depth by DPT through transformers"],
    "dpg_bench": ["questions answered by BLIP VQA (transformers) instead of the recommended mPLUG-large"],
    "tifa": ["questions answered by BLIP VQA (transformers) instead of the recommended mPLUG-large"],
    "geneval": ["Mask2Former and CLIP through transformers instead of GenEval's mmdetection models; the rules are kept"],
}


def roles_for(benchmark: str, categories: Sequence[str] | None = None) -> list[str]:
    table = ROLES.get(benchmark, {})
    wanted = table.get("*") or tuple(r for c, rs in table.items() if categories is None or c in categories for r in rs)
    return sorted(set(wanted))


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 of a checkpoint directory's config and weight headers (cheap; weights change their headers'
    offsets only with their shapes, so the weight files' sizes and first MiB are hashed too)."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


class ExpertScorer(Scorer):
    name = "expert"
    benchmarks = tuple(ROLES)
    version = "1"

    def __init__(self, ctx: ScorerContext):
        super().__init__(ctx)
        self._judges: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ configuration
    @classmethod
    def required_checkpoints(cls, cfg: Any, benchmark: str) -> dict[str, str | None]:
        """eval.experts.<role> -> path, for the roles ``benchmark`` needs (config validation)."""
        return {role: getattr(cfg.eval.experts, role) for role in roles_for(benchmark)}

    @classmethod
    def model_paths(cls, run: Any, iteration: int) -> dict[str, Path]:
        names = run.config.eval.benchmarks
        roles = sorted({r for b in names for r in roles_for(b)})
        return {role: Path(getattr(run.config.eval.experts, role)) for role in roles
                if getattr(run.config.eval.experts, role)}

    @classmethod
    def identity_of(cls, run: Any) -> dict[str, Any]:
        paths = cls.model_paths(run, 0)
        sbert = run.config.eval.experts.sbert
        return {"scorer": cls.name, "version": cls.version,
                "checkpoints": {role: {"path": str(p), "hash": checkpoint_fingerprint(p)} for role, p in paths.items()},
                "multiple_choice": f"sentence embeddings ({sbert})" if sbert else "the VQA model's likelihood of each choice"}

    @classmethod
    def deviations(cls, benchmark: str, prompts: Sequence[BenchmarkPrompt]) -> list[str]:
        out = list(DEVIATIONS.get(benchmark, []))
        if benchmark == "t2i_compbench":
            from silmm.eval.scorers import t2i_rules

            parser = t2i_rules.parser_name()
            if not parser.startswith("spacy"):
                out.append(f"objects, relations and noun phrases found by silmm's rules, not spaCy ({parser}); "
                           "CLIPScore of complex prompts keeps their adjectives")
        return out

    @classmethod
    def deviating_categories(cls, benchmark: str) -> list[str]:
        """Categories judged by a substitute for the benchmark's recommended model (the report marks them)."""
        return {"t2i_compbench": ["spatial", "3d_spatial", "numeracy", "complex"],
                "dpg_bench": ["*"], "tifa": ["*"], "geneval": ["*"]}.get(benchmark, [])

    @property
    def _batch(self) -> int:
        """Images per forward of a judge: eval.batch_size, as for the model that drew them."""
        return self.ctx.run.config.eval.batch_size

    def judge(self, role: str) -> Any:
        if role not in self._judges:
            module, name = JUDGES[role]
            path = getattr(self.ctx.run.config.eval.experts, role)
            from silmm.backends.base import resolve_device

            device, dtype = resolve_device(self.ctx.run.config.model)
            extra = {"sbert_path": self.ctx.run.config.eval.experts.sbert} if role == "vqa" else {}
            self._judges[role] = getattr(importlib.import_module(module), name).load(path, device, dtype, **extra)
        return self._judges[role]

    # ------------------------------------------------------------------------------------ scoring
    def score(self, prompts: Sequence[BenchmarkPrompt], images: Sequence[np.ndarray]) -> list[list[ImageAnswers]]:
        out: list[list[ImageAnswers] | None] = [None] * len(prompts)
        by_bench: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            by_bench.setdefault(p.benchmark, []).append(i)
        for bench, idx in by_bench.items():
            method = getattr(self, f"_score_{bench}")
            for i, answers in zip(idx, method([prompts[i] for i in idx], [images[i] for i in idx]), strict=True):
                out[i] = answers
        return out  # type: ignore[return-value]

    # DPG-Bench and TIFA: their own questions, answered by the VQA judge
    def _score_dpg_bench(self, prompts, images) -> list[list[ImageAnswers]]:
        return self._vqa_own_questions(prompts, images)

    def _score_tifa(self, prompts, images) -> list[list[ImageAnswers]]:
        return self._vqa_own_questions(prompts, images)

    def _vqa_own_questions(self, prompts, images) -> list[list[ImageAnswers]]:
        """Yes/no questions: "yes" when p(yes) > p(no). Multiple choice: the judge's `choose`. Every image of
        every prompt in one batched call per kind."""
        vqa = self.judge("vqa")
        flat = [(k, im) for k, ims in enumerate(images) for im in ims]
        yn = [[q.text for q in prompts[k].questions if not _is_choice(q)] for k, _ in flat]
        mc = [[(q.text, list(q.choices)) for q in prompts[k].questions if _is_choice(q)] for k, _ in flat]
        probs = vqa.yes_no([im for _, im in flat], yn) if any(yn) else [(np.zeros(0), np.zeros(0))] * len(flat)
        chosen = vqa.choose([im for _, im in flat], mc) if any(mc) else [[] for _ in flat]
        out: list[list[ImageAnswers]] = [[] for _ in prompts]
        for (k, _), (p_yes, p_no), picks in zip(flat, probs, chosen, strict=True):
            yes_iter, mc_iter = iter(zip(p_yes, p_no, strict=True)), iter(picks)
            qs, py, pn, ans, ok = [], [], [], [], []
            for q in prompts[k].questions:
                qs.append(q.text)
                if _is_choice(q):
                    answer, _method = next(mc_iter)
                    py.append(math.nan)
                    pn.append(math.nan)
                else:
                    y, n = next(yes_iter)
                    answer = "yes" if y > n else "no"
                    py.append(float(y))
                    pn.append(float(n))
                ans.append(answer)
                ok.append(float(_normal(answer) == _normal(q.answer)))
            score = float(np.mean(ok)) if ok else math.nan
            out[k].append(ImageAnswers(score=score, questions=qs, p_yes=py, p_no=pn, answers=ans, correct=ok))
        return out


    # T2I-CompBench++: one judge per category, as the benchmark's own scripts
    def _score_t2i_compbench(self, prompts, images) -> list[list[ImageAnswers]]:
        from silmm import questions as Q
        from silmm.eval.scorers import t2i_rules as R
        from silmm.eval.scorers.blip_vqa import yes_ratio

        flat = [(k, j, im) for k, ims in enumerate(images) for j, im in enumerate(ims)]
        cats = [prompts[k].category for k, _, _ in flat]
        bs = self._batch
        need = lambda *cs: [i for i, c in enumerate(cats) if c in cs]  # noqa: E731 - a local filter
        # BLIP: the prompt's noun phrases + "?" (the first 8, as BLIP_vqa.py); attribute categories and complex
        blip_idx = need("color", "shape", "texture", "complex")
        questions = {i: [ph + "?" for ph in Q.noun_phrases(prompts[flat[i][0]].text, 8, prefer="first")]
                     for i in blip_idx}
        blip = dict(zip(blip_idx, self.judge("vqa").yes_no([flat[i][2] for i in blip_idx],
                                                           [questions[i] for i in blip_idx]), strict=True)) \
            if blip_idx else {}
        # CLIPScore: non-spatial and the action part of complex (complex: adjectives removed by the script;
        # without spaCy the prompt is kept whole, a documented deviation)
        clip_idx = need("non_spatial", "complex")
        clip = dict(zip(clip_idx, self.judge("clip").similarity([flat[i][2] for i in clip_idx],
                                                                [prompts[flat[i][0]].text for i in clip_idx]),
                        strict=True)) if clip_idx else {}
        # the detector once per image, with every object any of its categories asks about
        det_idx = need("spatial", "3d_spatial", "numeracy", "complex")
        queries = {i: _detector_queries(prompts[flat[i][0]], R) for i in det_idx}
        dets = dict(zip(det_idx, self.judge("detector").detect([flat[i][2] for i in det_idx],
                                                                [queries[i] for i in det_idx], batch_size=bs), strict=True)) \
            if det_idx else {}
        depth_idx = need("3d_spatial")
        depth = dict(zip(depth_idx, self.judge("depth").depth([flat[i][2] for i in depth_idx], batch_size=bs), strict=True)) \
            if depth_idx else {}

        out: list[list[ImageAnswers]] = [[] for _ in prompts]
        for i, (k, _, im) in enumerate(flat):
            p, cat = prompts[k], cats[i]
            qs, py, pn = (questions.get(i, []), *(list(map(float, x)) for x in blip[i])) if i in blip else ([], [], [])
            if cat in ("color", "shape", "texture"):
                score = float(np.prod(yes_ratio(np.asarray(py), np.asarray(pn)))) if qs else 1.0
            elif cat == "non_spatial":
                score = float(clip[i])
            elif cat == "spatial":
                score = R.spatial_2d_score(p.text, dets[i], image_size=im.shape[:2])
            elif cat == "3d_spatial":
                score = R.spatial_3d_score(p.text, dets[i], depth[i])
            elif cat == "numeracy":
                score = R.numeracy_score(p.text, dets[i])
            else:  # complex: 3-in-1 of the BLIP product, the 2D spatial score (complex mode) and CLIPScore
                attribute = float(np.prod(yes_ratio(np.asarray(py), np.asarray(pn)))) if qs else 1.0
                spatial = R.spatial_2d_score(p.text, dets[i], image_size=im.shape[:2], complex_prompt=True)
                score = R.complex_score(attribute, spatial, float(clip[i]), p.subcategory or "spatial_action")
                qs, py, pn = [], [], []  # the image score is the 3-in-1 value, not a BLIP product
            nan = [math.nan] * len(qs)
            out[k].append(ImageAnswers(score=float(score), questions=qs, p_yes=py or nan, p_no=pn or nan,
                                       answers=["yes" if y > n else "no" for y, n in zip(py, pn, strict=True)],
                                       correct=[float(y > n) for y, n in zip(py, pn, strict=True)]))
        return out

    # GenEval: Mask2Former instances, CLIP colours, GenEval's clauses -> one verdict per silmm question
    def _score_geneval(self, prompts, images) -> list[list[ImageAnswers]]:
        import json

        from silmm.eval.scorers import geneval_rules as G

        flat = [(k, im) for k, ims in enumerate(images) for im in ims]
        found = self.judge("segmentation").instances([im for _, im in flat], batch_size=self._batch)
        colour = G.clip_colour_fn(self.judge("clip_large"))
        out: list[list[ImageAnswers]] = [[] for _ in prompts]
        for (k, im), dets in zip(flat, found, strict=True):
            p = prompts[k]
            verdicts = G.question_verdicts(json.loads(p.metadata), dets, im, colour)
            qs = [q.text for q in p.questions]
            if len(verdicts) != len(qs):
                raise ValueError(f"geneval {p.id}: {len(verdicts)} verdicts for {len(qs)} questions")
            ok = [float(v) for v in verdicts]
            out[k].append(ImageAnswers(score=float(all(verdicts)), questions=qs, p_yes=[math.nan] * len(qs),
                                       p_no=[math.nan] * len(qs), answers=["yes" if v else "no" for v in verdicts],
                                       correct=ok))
        return out


def _detector_queries(prompt: BenchmarkPrompt, rules: Any) -> list[str]:
    """The objects the benchmark's rules look for in this prompt (the detector is queried with them)."""
    cat = prompt.category
    if cat == "numeracy":
        names = [obj for obj, _ in rules.numeracy_targets(prompt.text)]
    elif cat == "complex":
        names = list(rules.complex_spatial_objects(prompt.text))
    elif cat == "3d_spatial":
        names = list(rules.spatial_objects(prompt.text, rules.SPATIAL_3D_VOCAB))
    else:
        names = list(rules.spatial_objects(prompt.text))
    names = [n for n in dict.fromkeys(names) if n]
    return names or [prompt.text]


def _is_choice(q) -> bool:
    return bool(q.choices) and {c.lower() for c in q.choices} != {"yes", "no"}


def _normal(text: str) -> str:
    return " ".join(str(text).lower().strip().rstrip(".").split())


__all__ = ["ExpertScorer", "JUDGES", "ROLES", "checkpoint_fingerprint", "roles_for"]
