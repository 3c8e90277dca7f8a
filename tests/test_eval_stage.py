"""The eval stage (jobs/eval.py, jobs/eval_results.py, silmm/eval/stage.py): benchmark prompts through an
iteration's model into eval shards, results.json and the official exports; seeds shared by iterations;
resume after SIGKILL; `silmm eval` exit codes; config checks before anything runs. Benchmark fixtures are
small files in each benchmark's official format, written here and read by silmm's benchmark modules."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from silmm import config as C
from silmm.driver import run_eval_driver
from silmm.eval import stage as E
from silmm.eval.benchmarks import get_benchmark
from silmm.eval.results import read_results, results_path
from silmm.images import from_png
from silmm.store import read_shard
from silmm.tasks import StageTask, is_done
from tests.helpers import mark_model_done, tiny_run

ROOT = Path(__file__).resolve().parents[1]
T2I_CATEGORIES = ("color", "shape", "texture", "spatial", "3d_spatial", "numeracy", "non_spatial", "complex")
DPG_CSV = """item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,question_natural_language
truck7,x,,1,0,entity,whole,entity - whole (truck),Is there a truck?
truck7,x,,2,1,attribute,color,attribute - color (truck red),Is the truck red?
truck7,x,,3,0,global,,global - (dusk),Is it dusk?
cats_2,y,,1,0,entity,whole,entity - whole (cat),Is there a cat?
cats_2,y,,2,0,entity,whole,entity - whole (dog),Is there a dog?
cats_2,y,,3,"1,2",relation,spatial,"relation - spatial (cat, dog, left of)",Is the cat left of the dog?
"""
FAST = ("executor.kind=debug", "eval.batch_size=4", "eval.prompts_per_shard=2")


def write_t2i(root: Path, extra_color: tuple[str, ...] = ()) -> Path:
    """T2I-CompBench's examples/dataset/{category}_val.txt (2 prompts each) and 3-in-1's complex splits."""
    base = root / "examples" / "dataset"
    base.mkdir(parents=True)
    for cat in T2I_CATEGORIES:
        lines = [f"a red {cat} apple", f"a blue_green {cat} cup", *(extra_color if cat == "color" else ())]
        (base / f"{cat}_val.txt").write_text("\n".join(lines) + "\n")
    (base / "complex_val_spatial.txt").write_text("a red complex apple\n")
    (base / "complex_val_action.txt").write_text("a blue_green complex cup\n")
    return root


def write_dpg(root: Path) -> Path:
    """ELLA's dpg_bench/prompts/{item_id}.txt and dpg_bench.csv (questions with parents)."""
    prompts = root / "dpg_bench" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "truck7.txt").write_text("A red truck on a beach at dusk.\n")
    (prompts / "cats_2.txt").write_text("A cat to the left of a dog.")
    (root / "dpg_bench" / "dpg_bench.csv").write_text(DPG_CSV)
    return root


def t2i_run(tmp_path: Path, ckpt: Path, *overrides: str, name: str = "run"):
    bench = tmp_path / "t2i"
    if not bench.exists():
        write_t2i(bench)
    return tiny_run(tmp_path, ckpt, "janus", f"run.name={name}", *FAST, f"eval.benchmarks.t2i_compbench.path={bench}",
                    "eval.benchmarks.t2i_compbench.images_per_prompt=2", "eval.benchmarks.t2i_compbench.max_prompts=3",
                    *overrides)


def shard_content(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {name: [bytes(x) if isinstance(x, np.ndarray) else x for x in f[name][...]] for name in f}


def make_iteration_model(run, iteration: int, ckpt: Path) -> None:
    """Stand in for training: iteration K's model is a copy of the base checkpoint."""
    shutil.copytree(ckpt, run.model_dir(iteration))
    mark_model_done(run.model_dir(iteration))


# ------------------------------------------------------------------------- shards, export, results
def test_ids_categories_questions_survive_into_shards_export_and_results(tiny_checkpoints, tmp_path):
    write_dpg(tmp_path / "dpg")
    run = t2i_run(tmp_path, tiny_checkpoints("janus"), f"eval.benchmarks.dpg_bench.path={tmp_path / 'dpg'}",
                  "eval.benchmarks.dpg_bench.images_per_prompt=2")
    run_eval_driver(run, [0], ["dpg_bench", "t2i_compbench"])

    # DPG: the benchmark's own questions (ids, parents, categories) and item ids, in the shard and the export
    dpg = get_benchmark("dpg_bench").read(tmp_path / "dpg")
    plan = E.plan(run, 0, "dpg_bench")
    assert plan.shard_count == 1 and is_done(run, StageTask(str(run.path), 0, "eval", 0, "dpg_bench"))
    shard = read_shard(plan.shard_path(0), "eval", run.config_hash, 0, verify_checksums=True)
    held = E.read_prompts(shard)
    assert [sp.prompt for sp in held] == dpg  # every field, questions included
    assert sorted(shard["prompt_id"]) == ["cats_2", "truck7"] and list(shard["prompt_id"]) == [p.id for p in dpg]
    assert list(shard["category"]) == [p.category for p in dpg]
    assert [json.loads(x) for x in shard["question_parents"]].count(["1", "2"]) == 1
    for sp in held:
        assert len(sp.answers) == 2 and len(sp.seeds) == 2
        for a in sp.answers:  # the scorer answered the benchmark's questions, in order
            assert a.questions == [q.text for q in sp.prompt.questions]
            assert all(0 <= y <= 1 and 0 <= n <= 1 for y, n in zip(a.p_yes, a.p_no, strict=True))
    export = plan.export_dir
    assert sorted(p.name for p in export.iterdir()) == ["cats_2.png", "truck7.png"]
    grid = np.asarray(Image.open(export / f"{dpg[0].id}.png").convert("RGB"))
    first = from_png(shard["image_png"][0])
    side = first.shape[0]
    assert grid.shape == (2 * side, 2 * side, 3) and np.array_equal(grid[:side, :side], first)

    # results.json holds what the benchmark's aggregate computes from the shard
    res = read_results(results_path(run.path, "dpg_bench", 0))
    want = plan.bench.aggregate(dpg, {sp.prompt.id: sp.answers for sp in held})
    assert res.overall == want["overall"] and res.per_category == pytest.approx(want["per_category"], nan_ok=True)
    assert (res.benchmark, res.iteration, res.scorer, res.prompts, res.images_per_prompt) == ("dpg_bench", 0, "self", 2, 2)
    assert not res.official_recipe and any("own yes/no VQA" in d for d in res.deviations)
    assert any("2 images per prompt instead of the benchmark's 4" in d for d in res.deviations)
    assert res.eval_hash == plan.eval_hash() and res.config_hash == run.config_hash
    assert res.model == str(tiny_checkpoints("janus")) and res.model_hash == E.model_fingerprint(res.model)

    # T2I-CompBench: no questions of its own, so the judge's decomposition; a 3-prompt subset across categories
    t2i = E.plan(run, 0, "t2i_compbench")
    assert t2i.shard_count == 2  # 3 prompts, 2 per shard
    held = [sp for s in range(2) for sp in E.read_prompts(read_shard(t2i.shard_path(s), "eval"))]
    assert [sp.prompt.id for sp in held] == ["color_val:1", "shape_val:1", "texture_val:1"]
    assert all(sp.prompt.questions == () and sp.answers[0].questions for sp in held)
    names = sorted(p.name for p in (t2i.export_dir / "color_val" / "samples").iterdir())
    assert names == ["a red color apple_000000.png", "a red color apple_000001.png"]
    res = read_results(results_path(run.path, "t2i_compbench", 0))
    assert any("subset: 3 of the benchmark's 16" in d for d in res.deviations) and res.benchmark_prompts == 16
    assert any("questions the judge wrote" in d for d in res.deviations)
    assert list(res.per_category) == ["color", "shape", "texture"]


def test_iterations_share_seeds_and_the_same_model_draws_the_same_images(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("janus")
    run = t2i_run(tmp_path, ckpt, "eval.benchmarks.t2i_compbench.max_prompts=2")
    make_iteration_model(run, 1, ckpt)
    run_eval_driver(run, [0, 1], ["t2i_compbench"])
    shards = [read_shard(E.plan(run, k, "t2i_compbench").shard_path(0), "eval", run.config_hash, k) for k in (0, 1)]
    assert list(shards[0]["seed"]) == list(shards[1]["seed"]) and len(set(shards[0]["seed"])) == 4
    assert list(shards[0]["decode_seed"]) == list(shards[1]["decode_seed"])
    for a, b in zip(shards[0]["image_png"], shards[1]["image_png"], strict=True):
        assert np.array_equal(from_png(a), from_png(b))
    # the seeds depend on the benchmark id and image index only
    p = E.plan(run, 1, "t2i_compbench").prompts[0]
    key = E.stable_int("t2i_compbench", p.id)
    assert int(shards[1]["seed"][1]) == E.derive_seed(run.config.run.seed, 0, key, 1, "eval")


def test_fixed_decoder_noise_decodes_every_eval_image_from_the_runs_one_noise(tiny_checkpoints, tmp_path):
    """sampling.decoder_noise=fixed: evaluation decodes with the noise training decoded with, so what KC-DPO
    taught is measured on the same deterministic decoder; the sampling seeds stay per image."""

    from silmm.models import load_backend
    from silmm.seeding import fixed_decode_seed

    bench = tmp_path / "t2i"
    write_t2i(bench)
    run = tiny_run(tmp_path, tiny_checkpoints("dream"), "dream", *FAST, f"eval.benchmarks.t2i_compbench.path={bench}",
                   "eval.benchmarks.t2i_compbench.images_per_prompt=2", "eval.benchmarks.t2i_compbench.max_prompts=2",
                   "sampling.decoder_noise=fixed")
    run_eval_driver(run, [0], ["t2i_compbench"])
    plan = E.plan(run, 0, "t2i_compbench")
    shard = read_shard(plan.shard_path(0), "eval", run.config_hash, 0)
    assert set(shard["decode_seed"]) == {fixed_decode_seed(run.config.run.seed)}
    assert len(set(shard["seed"])) == len(shard["seed"]) == 4
    model = load_backend(run, 1)  # iteration 1 starts from the model iteration 0 evaluates
    texts = [sp.prompt.text for sp in E.read_prompts(shard) for _ in range(2)]  # one batch of 4 images
    want = model.decode(model.generate(texts, [0] * 4), [fixed_decode_seed(run.config.run.seed)] * 4)
    got = np.stack([from_png(png) for png in shard["image_png"]])
    assert np.array_equal(got, want)
    assert np.array_equal(got[0], got[1]) and not np.array_equal(got[0], got[2])  # one H and noise, one image


def test_toy_evaluation_decodes_from_the_fixed_noise_too(tiny_checkpoints, tmp_path):
    """The toy evaluation (jobs/evaluate.py) draws what the toy benchmark draws: with decoder_noise=fixed, every
    image from the run's one noise."""
    import jobs.evaluate
    from silmm.models import load_backend
    from silmm.seeding import fixed_decode_seed

    run = tiny_run(tmp_path, tiny_checkpoints("dream"), "dream", "sampling.decoder_noise=fixed", "toy.eval_prompts=3",
                   "toy.eval_samples=2", "toy.grid_prompts=3")
    jobs.evaluate.run(run, 0, 0)
    model = load_backend(run, 1)
    with np.load(run.path / "eval" / "iter_00_images.npz", allow_pickle=False) as data:
        prompts, images = [str(p) for p in data["prompts"]], data["images"]
    flat = [p for p in prompts for _ in range(2)]  # decoded in the evaluation's batches (sampling.batch_size 4)
    want = np.concatenate([model.decode(model.generate(flat[b:b + 4], [0] * len(flat[b:b + 4])),
                                        [fixed_decode_seed(0)] * len(flat[b:b + 4])) for b in (0, 4)])
    assert np.array_equal(images.reshape(want.shape), want)
    assert all(np.array_equal(images[i, 0], images[i, 1]) for i in range(3))  # one H, one noise: one image


# ---------------------------------------------------------------------------------- resume, hash
def test_killed_task_resumes_to_an_identical_shard(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("janus")
    settings = ["eval.benchmarks.t2i_compbench.max_prompts=8", "eval.prompts_per_shard=8", "eval.batch_size=2",
                "sharding.flush_every=1"]
    whole = t2i_run(tmp_path, ckpt, *settings, name="whole")
    cut = t2i_run(tmp_path, ckpt, *settings, name="cut")
    args = ["--iteration", "0", "--benchmark", "t2i_compbench", "--shard", "0"]
    subprocess.run([sys.executable, "-m", "jobs.eval", "--run", str(whole.path), *args], cwd=ROOT, check=True,
                   capture_output=True)

    path = E.plan(cut, 0, "t2i_compbench").shard_path(0)
    progress = path.with_name(path.name + ".progress")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.eval", "--run", str(cut.path), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (progress / "part_00001.h5").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not path.exists() and 2 <= len(list(progress.glob("part_*.h5"))) < 8  # killed mid-shard
    subprocess.run([sys.executable, "-m", "jobs.eval", "--run", str(cut.path), *args], cwd=ROOT, check=True,
                   capture_output=True)
    assert shard_content(path) == shard_content(E.plan(whole, 0, "t2i_compbench").shard_path(0))
    assert not progress.exists()


def test_other_eval_settings_make_shards_stale(tiny_checkpoints, tmp_path):
    run = t2i_run(tmp_path, tiny_checkpoints("janus"), "eval.benchmarks.t2i_compbench.max_prompts=2")
    run_eval_driver(run, [0], ["t2i_compbench"])
    task = StageTask(str(run.path), 0, "eval", 0, "t2i_compbench")
    before = E.plan(run, 0, "t2i_compbench").eval_hash()
    assert is_done(run, task)
    run.config.eval.benchmarks["t2i_compbench"].images_per_prompt = 3
    assert E.plan(run, 0, "t2i_compbench").eval_hash() != before and not is_done(run, task)
    assert not is_done(run, StageTask(str(run.path), 0, "eval_results", 0, "t2i_compbench"))


# ------------------------------------------------------------------------------------ context
def test_overlong_prompt_is_an_error_naming_its_id_unless_truncated(tiny_checkpoints, tmp_path):
    write_t2i(tmp_path / "t2i", extra_color=(" ".join(["red"] * 600),))
    ckpt = tiny_checkpoints("janus")
    run = t2i_run(tmp_path, ckpt, "eval.benchmarks.t2i_compbench.max_prompts=null")
    plan = E.plan(run, 0, "t2i_compbench")
    long = next(p for p in plan.prompts if p.id == "color_val:3")
    from silmm.models import load_backend

    backend = load_backend(run, 1)
    with pytest.raises(E.EvalError, match="t2i_compbench prompt color_val:3 .* needs 6\\d\\d positions, the model has 512"):
        E.fit_to_context(backend, [plan.prompts[0], long], C.OverlongPolicy.reject)
    short, cut = E.fit_to_context(backend, [plan.prompts[0], long], C.OverlongPolicy.truncate)
    assert short == plan.prompts[0].text and 0 < len(cut.split()) < 600 and long.text.startswith(cut)
    assert E.generation_positions(backend)(cut) <= 512 < E.generation_positions(backend)(cut + " red")


# ------------------------------------------------------------------------------------------ CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "silmm", "eval", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_eval_exit_codes(tiny_checkpoints, tmp_path):
    write_t2i(tmp_path / "t2i", extra_color=(" ".join(["red"] * 600),))
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", *FAST, "executor.retries=0",
                   "executor.kind=local", "executor.poll_interval_s=0.1")
    path = str(run.path)
    bench = [f"eval.benchmarks.t2i_compbench.path={tmp_path / 't2i'}", "eval.benchmarks.t2i_compbench.images_per_prompt=2"]

    proc = _cli(path)  # nothing configured
    assert proc.returncode == 2 and "no benchmark configured" in proc.stderr
    proc = _cli(path, "eval.benchmarks.nope.path=/x")
    assert proc.returncode == 2 and "key 'eval.benchmarks.nope'" in proc.stderr and "unknown benchmark" in proc.stderr
    proc = _cli(path, "run.seed=3", *bench)
    assert proc.returncode == 2 and "eval.* keys only" in proc.stderr
    proc = _cli(path, *bench, "--iterations", "1")
    assert proc.returncode == 2 and "no finished model" in proc.stderr
    proc = _cli(path, *bench, "--benchmarks", "dpg_bench")
    assert proc.returncode == 2 and "not configured" in proc.stderr

    # the overlong prompt (color_val:3, in shard 1) fails its task: exit 1, the report names the benchmark id
    proc = _cli(path, *bench)
    assert proc.returncode == 1 and "color_val:3" in proc.stderr and "overlong=truncate" in proc.stderr
    assert "a task failed for good" in proc.stderr

    proc = _cli(path, *bench, "eval.benchmarks.t2i_compbench.max_prompts=2")
    assert proc.returncode == 0, proc.stderr
    assert "t2i_compbench iteration 0: overall" in proc.stdout
    assert C.from_yaml_text((run.path / "config.yaml").read_text(), "x").eval.benchmarks["t2i_compbench"].max_prompts == 2
    book = json.loads((run.path / "jobs.json").read_text())
    assert "iter_00/eval/t2i_compbench/00000" in book and "iter_00/eval_results/t2i_compbench/00000" in book
    stamp = results_path(run.path, "t2i_compbench", 0).stat().st_mtime_ns
    proc = _cli(path)  # again, as configured now: everything is done, nothing is submitted
    assert proc.returncode == 0 and results_path(run.path, "t2i_compbench", 0).stat().st_mtime_ns == stamp
    assert "all 1 done" in proc.stderr


# --------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("overrides", "key", "message"), [
    (["eval.benchmarks.nope.path=/x"], "eval.benchmarks.nope", "unknown benchmark 'nope'; known: dpg_bench"),
    (["eval.benchmarks.dpg_bench.images_per_prompt=2"], "eval.benchmarks.dpg_bench.path", "is required"),
    (["eval.benchmarks.dpg_bench.path=/does/not/exist"], "eval.benchmarks.dpg_bench.path", "does not exist"),
    (["eval.benchmarks.dpg_bench.path=.", "eval.benchmarks.dpg_bench.scorer=blip"], "eval.benchmarks.dpg_bench.scorer",
     "unknown scorer 'blip'"),
    (["eval.benchmarks.dpg_bench.path=.", "eval.benchmarks.dpg_bench.scorer=oracle"],
     "eval.benchmarks.dpg_bench.scorer", "only scores toy"),
    (["eval.benchmarks.toy.scorer=oracle"], "eval.benchmarks.toy", "needs toy.enabled=true"),
    (["eval.benchmarks.dpg_bench.path=.", "eval.benchmarks.dpg_bench.max_prompts=0"],
     "eval.benchmarks.dpg_bench.max_prompts", "must be > 0"),
    (["eval.prompts_per_shard=0"], "eval.prompts_per_shard", "must be > 0"),
])
def test_eval_config_errors_name_the_key(tmp_path, overrides, key, message):
    with pytest.raises(C.ConfigError, match=f"key '{key}'.*{message}"):
        C.load(ROOT / "configs" / "tiny_discrete.yaml", [f"run.root={tmp_path}", *overrides])


def test_run_with_an_unknown_benchmark_fails_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "silmm", "run", "configs/tiny_discrete.yaml", f"run.root={tmp_path}",
                           "eval.after_each_iteration=true", "eval.benchmarks.t2i_compbnech.path=/x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown benchmark 't2i_compbnech'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- the toy
def test_toy_benchmark_with_the_oracle_matches_the_toy_evaluation(tmp_path):
    import jobs.evaluate
    import jobs.pretrain
    from silmm.rundir import RunDir
    from tests.test_toy import TINY_PRETRAIN, toy_config

    cfg = toy_config(tmp_path, "t", tmp_path / "lmm", *TINY_PRETRAIN, "executor.kind=debug",
                     "eval.benchmarks.toy.scorer=oracle", "eval.prompts_per_shard=4")
    assert cfg.eval.batch_size == cfg.sampling.batch_size == 8  # configs/toy_smoke.yaml: the same batches
    run = RunDir.create_or_open(cfg)
    jobs.pretrain.run(run, 0, 0)
    old = jobs.evaluate.run(run, 0, 0)
    run_eval_driver(run, [0], ["toy"])
    new = read_results(results_path(run.path, "toy", 0))
    assert new.overall == old["overall"] and new.per_category == old["per_category"]
    assert new.tables["strict"]["overall"] == old["strict"] and new.tables["partial"]["overall"] == old["partial"]
    assert new.official_recipe and new.deviations == [] and new.prompts == cfg.toy.eval_prompts
    plan = E.plan(run, 0, "toy")
    held = {sp.prompt.text: sp for s in range(plan.shard_count)
            for sp in E.read_prompts(read_shard(plan.shard_path(s), "eval"))}
    images = {p.text: np.stack([from_png(b) for b in read_shard(plan.shard_path(int(p.id) // 4), "eval")["image_png"][
        held[p.text].image_rows]]) for p in plan.prompts}
    with np.load(run.path / "eval" / "iter_00_images.npz", allow_pickle=False) as data:  # the toy evaluation's
        for prompt, imgs in zip(data["prompts"], data["images"], strict=True):
            assert np.array_equal(images[str(prompt)], imgs)
    ev = json.loads((run.path / "eval" / "iter_00.json").read_text())
    for r in ev["results"]:
        assert [a.score for a in held[r["prompt"]].answers] == r["oracle"]
        assert [a.extra["partial"] for a in held[r["prompt"]].answers] == r["partial"]
    assert all(math.isnan(x) for x in held[ev["results"][0]["prompt"]].answers[0].p_yes)
    assert sorted(os.listdir(plan.export_dir)) == ["prompts.jsonl", "samples"]


# ------------------------------------------------------------------------------------ scorers
class _StubJudge:
    """A judge whose p(yes) for a question is fixed by a table (and 1 - p(yes) for p(no))."""

    def __init__(self, p_yes: dict[str, float], written: str = ""):
        self.p_yes, self.written, self.asked = p_yes, written, []

    def yes_no(self, images, questions):
        self.asked.append((len(images), questions[0]))
        return [(np.array([self.p_yes[q] for q in qs], np.float32), np.array([1 - self.p_yes[q] for q in qs], np.float32))
                for qs in questions]

    def write_text(self, prompts, seeds, max_new_tokens, temperature=1.0, top_p=1.0):
        assert temperature == 0.0  # the decomposition is written greedily
        return [self.written] * len(prompts)


def test_self_scorer_asks_yes_no_choices_and_its_own_questions(tiny_checkpoints, tmp_path):
    from silmm.eval.records import BenchmarkPrompt, BenchmarkQuestion
    from silmm.eval.scorers import ScorerContext, get_scorer
    from silmm.eval.scorers.self_vqa import DECOMPOSITION, MC_DEVIATION, SelfVQA, choice_question

    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "feedback.batch_size=4")
    mc = BenchmarkQuestion("1", "what color is the board?", answer="white", choices=("white", "red"))
    yn = BenchmarkQuestion("0", "is this a surfer?", answer="yes", choices=("yes", "no"))
    tifa = BenchmarkPrompt("tifa", "coco_1", "A surfer carries a white board.", "coco", questions=(yn, mc))
    plain = BenchmarkPrompt("t2i_compbench", "color_val:1", "a red apple", "color")
    judge = _StubJudge({"is this a surfer?": 0.9, choice_question(mc.text, "white"): 0.3,
                        choice_question(mc.text, "red"): 0.6, "Is there an apple?": 0.8, "Is the apple red?": 0.2},
                       written=" Is there an apple?\n2. Is the apple red?\n")
    scorer = get_scorer("self", ScorerContext(run, 0, judge))
    images = np.zeros((3, 8, 8, 3), np.uint8)
    (t, p) = scorer.score([tifa, plain], [images, images])
    a = t[0]
    assert a.questions == [yn.text, mc.text] and a.answers == ["yes", "red"] and a.correct == [1.0, 0.0]
    assert a.p_yes[0] == pytest.approx(0.9) and math.isnan(a.p_yes[1]) and math.isnan(a.p_no[1])
    assert a.score == pytest.approx(((0.9 - 0.1) + (0.6 - 0.4)) / 2)
    b = p[2]
    assert b.questions == ["Is there an apple?", "Is the apple red?"] and b.answers == ["yes", "no"]
    assert b.correct == [1.0, 0.0] and b.score == pytest.approx(((0.8 - 0.2) + (0.2 - 0.8)) / 2)
    assert judge.asked[0][0] == 1  # feedback.batch_size=4 over 3 question texts: one image per forward
    assert SelfVQA.deviations("tifa", [tifa])[1:] == [MC_DEVIATION]
    assert SelfVQA.deviations("t2i_compbench", [plain])[1:] == [DECOMPOSITION]


def test_results_round_trip_keeps_nan_as_null(tmp_path):
    from silmm.eval.results import BenchmarkResults, ResultsError, find_results, is_current, write_results

    res = BenchmarkResults(benchmark="dpg_bench", display="DPG-Bench", iteration=2, scorer="self", official_recipe=False,
                           deviations=["x"], model="m", model_hash="h", silmm_version="v", config_hash="c",
                           eval_hash="e", prompts=3, images_per_prompt=4, max_prompts=None, overall=0.5,
                           per_category={"entity": 0.25, "other": math.nan}, tables={"t": {"a": 1.0}})
    path = write_results(results_path(tmp_path, "dpg_bench", 2), res)
    assert json.loads(path.read_text())["per_category"]["other"] is None  # strict JSON
    back = read_results(path, "e")
    assert math.isnan(back.per_category.pop("other")) and back.per_category == {"entity": 0.25}
    assert back.finished and is_current(path, "e") and not is_current(path, "other")
    with pytest.raises(ResultsError, match="differs from the current settings"):
        read_results(path, "other")
    assert list(find_results(tmp_path)) == [("dpg_bench", 2)]
