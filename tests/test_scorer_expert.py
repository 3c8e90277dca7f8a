"""The `expert` scorer (silmm/eval/scorers/expert.py): the benchmarks' expert judges behind one scorer.

Tiny random judges built offline (each module's build_tiny_*), loaded through the same `load` real checkpoints
use. Random judges answer nothing meaningful, so the tests check the plumbing against independent calls of
the judges and rules on the same images: what the scorer stores is what the benchmark's recipe computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from silmm import config as C
from silmm.driver import run_eval_driver
from silmm.eval import stage as E
from silmm.eval.benchmarks import get_benchmark
from silmm.eval.results import read_results, results_path
from silmm.eval.scorers import ScorerContext, get_scorer
from silmm.eval.scorers import t2i_rules as R
from silmm.images import from_png
from silmm.store import read_shard
from tests.helpers import tiny_run
from tests.test_eval_stage import write_dpg, write_t2i

ROOT = Path(__file__).resolve().parents[1]
GENEVAL = ['{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}',
           '{"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}], '
           '"prompt": "a photo of two cats"}']


@pytest.fixture(scope="module")
def judges(tmp_path_factory) -> dict[str, Path]:
    from silmm.eval.scorers.blip_vqa import build_tiny_blip_vqa
    from silmm.eval.scorers.clip import build_tiny_clip
    from silmm.eval.scorers.depth import build_tiny_dpt
    from silmm.eval.scorers.detector import build_tiny_owlv2
    from silmm.eval.scorers.mask2former import build_tiny_mask2former

    root = tmp_path_factory.mktemp("judges")
    clip = build_tiny_clip(root / "clip")
    return {"vqa": build_tiny_blip_vqa(root / "vqa"), "clip": clip, "clip_large": clip,
            "detector": build_tiny_owlv2(root / "owlv2"), "depth": build_tiny_dpt(root / "dpt"),
            "segmentation": build_tiny_mask2former(root / "m2f")}


def experts(judges: dict[str, Path]) -> list[str]:
    return [f"eval.experts.{role}={path}" for role, path in judges.items()]


def test_a_missing_expert_checkpoint_fails_before_anything_runs(tmp_path, judges):
    write_dpg(tmp_path / "dpg")
    base = [f"run.root={tmp_path}", f"eval.benchmarks.dpg_bench.path={tmp_path / 'dpg'}",
            "eval.benchmarks.dpg_bench.scorer=expert"]
    with pytest.raises(C.ConfigError, match="key 'eval.experts.vqa'.*is required: scorer 'expert' judges dpg_bench"):
        C.load(ROOT / "configs" / "tiny_discrete.yaml", base)
    with pytest.raises(C.ConfigError, match=f"key 'eval.experts.vqa'.*{tmp_path}/nowhere: no checkpoint there"):
        C.load(ROOT / "configs" / "tiny_discrete.yaml", [*base, f"eval.experts.vqa={tmp_path}/nowhere"])
    # a benchmark needs only its own judges: DPG-Bench asks nothing of the detector
    assert C.load(ROOT / "configs" / "tiny_discrete.yaml", [*base, f"eval.experts.vqa={judges['vqa']}"])


def _stored(run, benchmark: str) -> tuple[list, list[np.ndarray], list]:
    """(prompts, images per prompt, answers per prompt) as the eval shards hold them."""
    plan = E.plan(run, 0, benchmark)
    prompts, images, answers = [], [], []
    for s in range(plan.shard_count):
        data = read_shard(plan.shard_path(s), stage="eval")
        pngs = data["image_png"]
        for sp in E.read_prompts(data):
            prompts.append(sp.prompt)
            images.append(np.stack([from_png(pngs[r]) for r in sp.image_rows]))
            answers.append(sp.answers)
    return prompts, images, answers


def test_expert_scores_dpg_and_t2i_through_the_stage_as_the_recipes_compute(tiny_checkpoints, tmp_path, judges):
    write_dpg(tmp_path / "dpg")
    write_t2i(tmp_path / "t2i")
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=debug", "eval.batch_size=4",
                   f"eval.benchmarks.dpg_bench.path={tmp_path / 'dpg'}", "eval.benchmarks.dpg_bench.scorer=expert",
                   "eval.benchmarks.dpg_bench.images_per_prompt=2",
                   f"eval.benchmarks.t2i_compbench.path={tmp_path / 't2i'}", "eval.benchmarks.t2i_compbench.scorer=expert",
                   "eval.benchmarks.t2i_compbench.images_per_prompt=1", *experts(judges))
    run_eval_driver(run, [0], ["dpg_bench", "t2i_compbench"])
    ctx = ScorerContext(run, 0)
    scorer = get_scorer("expert", ctx)

    # DPG-Bench: the VQA judge's yes/no on the benchmark's own questions, "yes" when p(yes) > p(no)
    prompts, images, answers = _stored(run, "dpg_bench")
    for p, ims, ans in zip(prompts, images, answers, strict=True):
        probs = scorer.judge("vqa").yes_no(list(ims), [[q.text for q in p.questions]] * len(ims))
        for (p_yes, p_no), a in zip(probs, ans, strict=True):
            np.testing.assert_allclose(a.p_yes, p_yes, atol=1e-6)
            assert a.correct == [float(y > n) for y, n in zip(p_yes, p_no, strict=True)]
    res = read_results(results_path(run.path, "dpg_bench", 0))
    assert res.scorer == "expert" and not res.official_recipe
    assert any("mPLUG" in d for d in res.deviations)

    # T2I-CompBench++: each category's judge and rule, recomputed on the stored images
    prompts, images, answers = _stored(run, "t2i_compbench")
    assert {p.category for p in prompts} == set(get_benchmark("t2i_compbench").categories)
    for p, ims, ans in zip(prompts, images, answers, strict=True):
        im, a = ims[0], ans[0]
        if p.category == "spatial":
            dets = scorer.judge("detector").detect([im], [[n for n in R.spatial_objects(p.text) if n]])[0]
            assert a.score == pytest.approx(R.spatial_2d_score(p.text, dets, image_size=im.shape[:2]), abs=1e-6)
        elif p.category == "non_spatial":
            assert a.score == pytest.approx(float(scorer.judge("clip").similarity([im], [p.text])[0]), abs=1e-5)
        elif p.category == "color":
            y, n = scorer.judge("vqa").yes_no([im], [a.questions])[0]
            assert a.questions and a.score == pytest.approx(float(np.prod(y / (y + n))), rel=1e-5)
    res = read_results(results_path(run.path, "t2i_compbench", 0))
    assert res.scorer == "expert" and any("OWLv2" in d for d in res.deviations)
    checkpoints = json.loads(json.dumps(res.__dict__, default=str))
    assert str(judges["detector"]) in json.dumps(checkpoints)  # which checkpoint judged is on record


def test_one_detector_pass_per_image_and_geneval_verdicts(tiny_checkpoints, tmp_path, judges, monkeypatch):
    from silmm.eval.benchmarks.t2i_compbench import T2ICompBench
    from silmm.eval.scorers import geneval_rules as G
    from silmm.eval.scorers.detector import Detector

    write_t2i(tmp_path / "t2i")
    (tmp_path / "geneval" / "prompts").mkdir(parents=True)
    (tmp_path / "geneval" / "prompts" / "evaluation_metadata.jsonl").write_text("\n".join(GENEVAL) + "\n")
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", f"eval.benchmarks.geneval.path={tmp_path / 'geneval'}",
                   "eval.benchmarks.geneval.scorer=expert", *experts(judges))
    scorer = get_scorer("expert", ScorerContext(run, 0))
    rng = np.random.default_rng(0)

    t2i = [p for p in T2ICompBench().read(tmp_path / "t2i") if p.category in ("spatial", "complex", "numeracy")]
    images = [rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for _ in t2i]
    calls = []
    real = Detector.detect
    monkeypatch.setattr(Detector, "detect", lambda self, ims, labels, **kw: calls.append(len(ims)) or real(self, ims, labels, **kw))
    out = scorer.score(t2i, images)
    assert calls == [2 * len(t2i)]  # every image of every category in one batched pass, each image once
    assert [len(a) for a in out] == [2] * len(t2i)

    geneval = get_benchmark("geneval").read(tmp_path / "geneval")
    images = [rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for _ in geneval]
    out = scorer.score(geneval, images)
    segmenter, colour = scorer.judge("segmentation"), G.clip_colour_fn(scorer.judge("clip_large"))
    for p, ims, answers in zip(geneval, images, out, strict=True):
        for im, a in zip(ims, answers, strict=True):
            verdicts = G.question_verdicts(json.loads(p.metadata), segmenter.instances([im])[0], im, colour)
            assert a.correct == [float(v) for v in verdicts] and a.score == float(all(verdicts))
            assert a.questions == [q.text for q in p.questions]


def test_tifa_multiple_choice_by_the_vqa_likelihood(tiny_checkpoints, tmp_path, judges):
    from tests.test_eval_benchmarks import write_tifa

    write_tifa(tmp_path / "tifa")
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", f"eval.benchmarks.tifa.path={tmp_path / 'tifa'}",
                   "eval.benchmarks.tifa.scorer=expert", *experts(judges))
    scorer = get_scorer("expert", ScorerContext(run, 0))
    prompts = get_benchmark("tifa").read(tmp_path / "tifa")
    images = [np.random.default_rng(i).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8) for i in range(len(prompts))]
    vqa = scorer.judge("vqa")
    for p, ims, (a,) in zip(prompts, images, scorer.score(prompts, images), strict=True):
        mc = [q for q in p.questions if q.choices and set(q.choices) != {"yes", "no"}]
        picks = vqa.choose([ims[0]], [[(q.text, list(q.choices)) for q in mc]])[0]
        for q, (choice, method) in zip(mc, picks, strict=True):
            i = a.questions.index(q.text)
            assert a.answers[i] == choice and method == "likelihood" and a.correct[i] == float(choice == q.answer)
            assert np.isnan(a.p_yes[i])
    identity = scorer.identity_of(run)
    assert identity["multiple_choice"] == "the VQA model's likelihood of each choice"
    assert identity["checkpoints"]["vqa"]["path"] == str(judges["vqa"]) and len(identity["checkpoints"]["vqa"]["hash"]) == 16


def test_changing_only_the_scorer_rescores_the_stored_images(tiny_checkpoints, tmp_path, judges, monkeypatch):
    from silmm.backends.janus import JanusBackend

    write_dpg(tmp_path / "dpg")
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "executor.kind=debug", "eval.batch_size=4",
                   f"eval.benchmarks.dpg_bench.path={tmp_path / 'dpg'}", "eval.benchmarks.dpg_bench.images_per_prompt=2")
    run_eval_driver(run, [0], ["dpg_bench"])
    before = _stored(run, "dpg_bench")
    run._accept(C.load(run.path / "config.yaml", ["eval.benchmarks.dpg_bench.scorer=expert", *experts(judges)]))

    def no_sampling(*_args, **_kw):
        raise AssertionError("the images were drawn again")

    monkeypatch.setattr(JanusBackend, "sample", no_sampling)
    run_eval_driver(run, [0], ["dpg_bench"])
    after = _stored(run, "dpg_bench")
    assert [p.id for p in after[0]] == [p.id for p in before[0]]
    for a, b in zip(after[1], before[1], strict=True):
        assert np.array_equal(a, b)  # the same images, re-scored
    assert read_results(results_path(run.path, "dpg_bench", 0)).scorer == "expert"
    assert all(not np.isnan(x.p_yes).all() for answers in after[2] for x in answers)
