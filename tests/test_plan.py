"""`silmm plan`: the arithmetic against hand computation, the calibration's split of time under a fake clock
(a real tiny Janus run), its cache, and the command end to end."""

import json

import pytest
import torch

from silmm import cli
from silmm import config as C
from silmm import plan as PL
from silmm.executors import SlurmLimits
from tests.helpers import tiny_config

# ------------------------------------------------------------------------------------------- arithmetic


def paper_config(tmp_path, *overrides):
    """1000 prompts in 16 shards of 64 (the last 40), one GPU per task, 5 tasks at once, 3 iterations."""
    return C.load(None, [f"run.root={tmp_path}", f"model.path={tmp_path / 'none'}", "model.build_tiny_if_missing=true",
                         "run.iterations=3", "prompts.count=1000", "sharding.prompts_per_shard=64",
                         "executor.kind=slurm", "executor.default.gpus_per_node=1",
                         "executor.default.array_parallelism=5", "executor.default.time_min=600",
                         "executor.stages.pairs.gpus_per_node=0", "executor.stages.pairs.cpus_per_task=4",
                         "executor.stages.train.gpus_per_node=4", "executor.stages.train.tasks_per_node=4",
                         "train.batch_size=32", "train.grad_accum=4", "train.max_steps=100",
                         "train.checkpoint_every=30", *overrides])


def fake_costs(**stage_overrides) -> PL.UnitCosts:
    stages = {s: PL.StageCost(load_s=30.0, unit_s=2.0, bytes_per_prompt=1000.0, files_per_task=3,
                              peak_mem_bytes=2**30) for s in PL.PLAN_STAGES}
    stages["pairs"] = PL.StageCost(unit_s=0.5, bytes_per_prompt=200.0, files_per_task=4)
    stages["train"] = PL.StageCost(load_s=60.0, unit_s=0.5, files_per_task=20)
    for stage, values in stage_overrides.items():
        for k, v in values.items():
            setattr(stages[stage], k, v)
    return PL.UnitCosts(stages=stages, model_bytes=10**9, export_bytes=5 * 10**8, checkpoint_bytes=10**8,
                        train_other_bytes=10**6, checkpoint_save_s=2.0, device="cuda: fake", memory_kind="fake")


def test_sharded_stage_shards_tasks_waves_hours_disk(tmp_path):
    cfg = paper_config(tmp_path, "executor.stages.samples.shards_per_task=3")
    plan = PL.plan_run(cfg, fake_costs(), gpus=4, limits=SlurmLimits(), limits_source="test")
    by = {p.stage: p for p in plan.stages}
    q, s = by["questions"], by["samples"]
    # questions: 16 tasks of 64 prompts (the last 40), min(5 throttle, 4 GPUs) = 4 at once -> 4 waves
    assert (q.shards, q.tasks, q.loads, q.concurrent, q.waves) == (16, 16, 16, 4, 4)
    assert q.task_s == 64 * 2.0 + 30 and q.wall_s == 4 * (64 * 2.0 + 30)
    assert q.device_hours == (15 * (64 * 2.0 + 30) + (40 * 2.0 + 30)) / 3600
    # samples: 3 shards a task -> 6 tasks (5 x 192 prompts, then one shard of 40), 2 waves of 4 and 2
    assert (s.shards, s.tasks, s.loads, s.units_per_task, s.waves) == (16, 6, 6, 192, 2)
    assert s.wall_s == 2 * (192 * 2.0 + 30)
    assert s.device_hours == (5 * (192 * 2.0 + 30) + (40 * 2.0 + 30)) / 3600
    assert s.arrays == [6] and s.disk_bytes == 1000.0 * 1000 and s.files == 16 * 3


def test_pairs_train_totals_and_disk_with_and_without_cleanup(tmp_path):
    cfg = paper_config(tmp_path)
    costs = fake_costs()
    plan = PL.plan_run(cfg, costs, gpus=4, limits=SlurmLimits(), limits_source="test")
    by = {p.stage: p for p in plan.stages}
    pairs, train = by["pairs"], by["train"]
    assert (pairs.gpu, pairs.loads, pairs.wall_s) == (False, 0, 1000 * 0.5)
    assert pairs.device_hours == 1000 * 0.5 / 3600 * 4  # CPU-hours: x cpus_per_task
    # train: a step = calibrated micro-step x grad_accum; 100 steps, ceil(100 / 30) = 4 checkpoint saves
    train_s = 60.0 + 100 * 0.5 * 4 + 4 * 2.0
    assert (train.wall_s, train.loads) == (train_s, 4)
    assert train.device_hours == train_s / 3600 * 4
    stage_wall = 4 * (64 * 2.0 + 30)  # a sharded stage: 4 waves of 4 tasks (the last wave's short shard hidden)
    # on Slurm questions and samples run side by side: the longer of the two, or both stages' GPU time
    # (15 full tasks + one of 40 prompts each) over the 4 GPUs, when that is longer, as here
    side_by_side = max(stage_wall, 2 * (15 * (64 * 2.0 + 30) + (40 * 2.0 + 30)) / 4)
    assert side_by_side == 1240.0 and plan.concurrent_stages
    assert plan.iteration_wall_s == 2 * stage_wall + side_by_side + 1000 * 0.5 + train_s
    local = PL.plan_run(paper_config(tmp_path, "executor.kind=local"), costs, gpus=4, limits=SlurmLimits(),
                        limits_source="test")
    assert not local.concurrent_stages  # local_parallelism 1: one stage after the other
    assert local.iteration_wall_s == 4 * stage_wall + 1000 * 0.5 + train_s
    assert plan.run_wall_s == 3 * plan.iteration_wall_s
    per_iteration = 4 * 1000 * 1000.0 + 1000 * 200.0 + 5 * 10**8 + 10**8 + 10**6
    removable = 1000 * 1000.0 + 10**8  # samples shards + checkpoints
    assert plan.disk_iteration == per_iteration and plan.disk_no_cleanup == 3 * per_iteration
    assert plan.disk_cleanup == 2 * (per_iteration - removable) + per_iteration
    assert plan.disk_configured == plan.disk_no_cleanup  # store.gc_after_iteration = []
    gpu_hours = sum(p.device_hours for p in plan.stages if p.stage != "pairs")
    assert plan.gpu_hours_iteration == pytest.approx(gpu_hours, rel=1e-15) and plan.warnings == []


def test_configured_cleanup_and_depth_scale(tmp_path):
    cfg = paper_config(tmp_path, "store.gc_after_iteration=[checkpoints]")
    plan = PL.plan_run(cfg, fake_costs(), gpus=4, limits=SlurmLimits(), limits_source="test", depth_scale=15)
    by = {p.stage: p for p in plan.stages}
    assert plan.disk_configured == 2 * (plan.disk_iteration - 10**8) + plan.disk_iteration
    assert by["samples"].task_s == 64 * 2.0 * 15 + 30  # model stages: compute x depth, the load as measured
    assert by["pairs"].wall_s == 1000 * 0.5  # no model: not scaled
    assert by["train"].wall_s == 60.0 + 100 * 0.5 * 4 * 15 + 4 * 2.0


def test_arrays_split_at_max_array_size_and_the_vocabulary_once_per_first_wave(tmp_path):
    cfg = paper_config(tmp_path)
    costs = fake_costs(prompts={"once_s": 100.0})
    plan = PL.plan_run(cfg, costs, gpus=8, limits=SlurmLimits(max_array_size=6), limits_source="test")
    by = {p.stage: p for p in plan.stages}
    assert plan.array_limit == 6 and by["scores"].arrays == [6, 6, 4]
    p = by["prompts"]  # 5 at once (throttle < 8 GPUs): the first 5 tasks compute the vocabulary
    assert (p.concurrent, p.waves) == (5, 4)
    # waves of 5, 5, 5 and the last, short task (40 prompts)
    assert p.wall_s == (64 * 2.0 + 30 + 100) + 2 * (64 * 2.0 + 30) + (40 * 2.0 + 30)
    assert p.device_hours == (15 * (64 * 2.0 + 30) + (40 * 2.0 + 30) + 5 * 100) / 3600


def test_time_limit_and_gpu_warnings_name_the_key(tmp_path):
    cfg = paper_config(tmp_path, "executor.stages.samples.time_min=5",
                       "executor.stages.samples.shards_per_task=3")  # a task: 3 x 64 x 2 s + 30 s > 300 s
    plan = PL.plan_run(cfg, fake_costs(), gpus=2, limits=SlurmLimits(), limits_source="test")
    text = "\n".join(plan.warnings)
    assert "stage samples" in text and "executor.stages.samples.time_min" in text
    assert "stage train: asks for 4 GPUs" in text and len(plan.warnings) == 2
    formatted = PL.format_plan(plan)
    assert "warnings:" in formatted and "executor.stages.samples.time_min" in formatted


def test_unit_costs_file_checked(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"stages": {"samples": {"unit_s": 1.0, "typo": 2}}}))
    with pytest.raises(C.ConfigError, match="stages.samples: unknown keys"):
        PL.read_unit_costs(path, partial=True)
    path.write_text(json.dumps({"stages": {"samples": {"unit_s": 1.0}}}))
    with pytest.raises(C.ConfigError, match="missing .*model_bytes"):
        PL.read_unit_costs(path, partial=False)
    amended = PL.amend(fake_costs(), PL.read_unit_costs(path, partial=True), "f")
    assert amended.stages["samples"].unit_s == 1.0 and amended.stages["samples"].load_s == 30.0
    whole = fake_costs().to_json()
    assert PL.UnitCosts.from_json(json.loads(json.dumps(whole)), "x") == fake_costs()


# ------------------------------------------------------------------------------------------- calibration
LOAD, VOCAB, STEP, SAVE = 8.0, 16.0, 0.5, 4.0
TICK = {"prompts": 0.25, "questions": 0.5, "samples": 2.0, "scores": 1.0, "pairs": 0.125}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoints, tmp_path_factory):
    """A real calibration of the tiny Janus under a fake clock: loads, the vocabulary, every training step and
    checkpoint save advance it by known amounts, and each stage by K x its tick per prompt."""
    from silmm import prompts as P
    from silmm import trainer as T
    from silmm.backends.janus import JanusBackend

    tmp = tmp_path_factory.mktemp("plan")
    # two categories, one model-written: half of the 4 calibration prompts, as of the run's 8
    off = [f"prompts.categories.{c}=0" for c in ("shape", "texture", "spatial", "3d_spatial", "numeracy", "complex")]
    cfg = tiny_config(tmp / "runs", tiny_checkpoints("janus"), "janus", "prompts.count=8", *off)
    k = PL.default_prompts(cfg)
    clock, sizes, seen = FakeClock(), {}, []
    mp = pytest.MonkeyPatch()

    def advancing(fn, amount):
        def wrapper(*args, **kwargs):
            clock.now += amount
            return fn(*args, **kwargs)
        return wrapper

    load = JanusBackend.load
    mp.setattr(JanusBackend, "load", classmethod(lambda cls, *a, **kw: advancing(load, LOAD)(*a, **kw)))
    mp.setattr(P, "build_vocabulary", advancing(P.build_vocabulary, VOCAB))
    mp.setattr(T.Prefetcher, "next", advancing(T.Prefetcher.next, STEP))
    mp.setattr(T.Checkpoints, "save", advancing(T.Checkpoints.save, SAVE))

    def runner(run, stage):
        seen.append(stage)
        PL.run_stage(run, stage)
        if stage != "train":
            clock.now += k * TICK[stage]
            out = run.pairs_path(1) if stage == "pairs" else run.shard_path(1, stage, 0)
            sizes[stage] = out.stat().st_size

    try:
        costs = PL.calibrate(cfg, k, 2, folder=tmp / "cache", clock=clock, stage_runner=runner, say=lambda _: None)
    finally:
        mp.undo()
    return cfg, costs, k, sizes, seen, tmp


def test_calibration_splits_load_work_and_vocabulary_exactly(calibrated):
    cfg, costs, k, sizes, seen, _ = calibrated
    assert seen == list(PL.PLAN_STAGES) and k == 4 and costs.prompts == 4
    for stage in ("prompts", "questions", "samples", "scores", "pairs"):
        c = costs.stages[stage]
        assert c.unit_s == TICK[stage], stage
        assert c.load_s == (0.0 if stage == "pairs" else LOAD), stage  # one load per task, timed apart
        assert c.bytes_per_prompt == sizes[stage] / k
        assert c.files_per_task >= 2 and c.peak_mem_bytes > 0
    assert costs.stages["prompts"].once_s == VOCAB
    train = costs.stages["train"]
    assert (train.unit_s, costs.checkpoint_save_s, train.load_s) == (STEP, SAVE, LOAD)
    assert costs.train_steps == 2 and costs.train_micro_batch == cfg.train.batch_size  # grad_accum 1, one rank
    assert costs.export_bytes > 0 and costs.checkpoint_bytes > 0 and costs.model_bytes > 0
    assert costs.device.startswith("cpu: ") and costs.memory_kind.startswith("peak RSS")


@pytest.mark.parametrize("name", ["janus", "seed_llama"])
def test_page_in_reads_every_weight_once(tiny_checkpoints, name):
    """Each distinct parameter and buffer of every module the backend holds, shared ones once; with
    seed_llama, also the modules of its diffusers pipeline (not a module itself)."""
    import importlib

    from silmm.config import Backend, Device, ModelConfig, SamplingConfig
    from silmm.models import BACKENDS

    module, cls, _, _ = BACKENDS[Backend(name)]
    model = ModelConfig(backend=Backend(name), path=str(tiny_checkpoints(name)), device=Device.cpu)
    backend = getattr(importlib.import_module(module), cls).load(model, SamplingConfig(guidance_scale=1.0))
    modules = [v for v in vars(backend).values() if isinstance(v, torch.nn.Module)]
    if name == "seed_llama":
        unet = backend.decoder.unet
        assert unet in PL.backend_modules(backend) and unet not in modules
        modules += [v for v in backend.decoder.components.values() if isinstance(v, torch.nn.Module)]
    tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
    assert modules and PL.page_in(backend) == sum(t.numel() * t.element_size() for t in tensors.values())


def test_second_calibration_is_a_cache_hit(calibrated):
    cfg, costs, k, _, _, tmp = calibrated

    def no_stage(run, stage):
        raise AssertionError(f"stage {stage} ran despite the cache")

    again = PL.calibrate(cfg, k, 2, folder=tmp / "cache", stage_runner=no_stage, say=lambda _: None)
    assert again == costs


def test_cli_prints_the_tables_from_the_cache(calibrated, monkeypatch, capsys):
    cfg, costs, _, _, _, tmp = calibrated
    config = tmp / "plan.yaml"
    config.write_text(C.to_yaml(cfg))
    monkeypatch.setattr(PL, "cache_dir", lambda: tmp / "cache")
    monkeypatch.setattr(PL, "measure", lambda *a, **kw: pytest.fail("calibrated again despite the cache"))
    monkeypatch.setattr(PL, "cluster_limits", lambda n: (SlurmLimits(), "test"))
    assert cli.main(["plan", str(config), "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "unit costs from the cache" in out and "calibrated on a CPU" in out
    for stage in PL.PLAN_STAGES:
        assert f"\n{stage} " in out
    assert "Slurm resources" in out and "wall per iteration" in out
    assert cli.main(["plan", str(config), "--gpus", "2", "--json", "--depth-scale", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = PL.plan_run(cfg, costs, 2, SlurmLimits(), "test", 2.0)
    assert got["run_wall_s"] == want.run_wall_s and got["disk_cleanup"] == want.disk_cleanup
    samples = next(s for s in got["stages"] if s["stage"] == "samples")
    assert samples["task_s"] == 3 * (TICK["samples"] * 2) + LOAD  # 3 prompts a shard, depth x2


@pytest.mark.parametrize("args, message", [
    (["sampling.temperature=nan"], "sampling.temperature"),
    (["--gpus", "0"], "--gpus 0"),
    (["--no-calibrate"], "--no-calibrate needs --unit-costs"),
])
def test_bad_config_refused_before_calibration(tmp_path, monkeypatch, capsys, args, message):
    config = tmp_path / "c.yaml"
    config.write_text(C.to_yaml(paper_config(tmp_path)))
    monkeypatch.setattr(PL, "calibrate", lambda *a, **kw: pytest.fail("calibration started"))
    gpus = [] if "--gpus" in args else ["--gpus", "1"]
    assert cli.main(["plan", str(config), *args, *gpus]) == 2
    assert message in capsys.readouterr().err
