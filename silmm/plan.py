"""`silmm plan`: what a configured run will cost, before anything is submitted.

Two halves, kept apart so the second can be tested exactly:

* **Calibration** (:func:`calibrate`): a short measured run of the configured model on this machine. A copy of
  the config in a temporary directory (K prompts in one shard, one iteration, the debug executor, a few
  optimizer steps) runs every stage in-process; each stage's time is split into model loads (timed around
  ``silmm.models.load_backend``), work per prompt (per optimizer step for train) and, for the prompts stage,
  the vocabulary written once per iteration. It records the bytes and files each stage leaves, its peak
  memory and the model's size, as :class:`UnitCosts`, cached as JSON under ``$XDG_CACHE_HOME/silmm/plan/``.
* **Arithmetic** (:func:`plan_run`, pure): unit costs x the config x N GPUs x the cluster's limits -> per
  stage and iteration the shards, tasks, model loads, GPU-hours, wall time on N GPUs, disk (with and without
  clean-up), files, array sizes and the Slurm resources each stage asks for, with warnings naming the key to
  change when a task would outlive its time limit.

Approximations, said where they are used: ``depth_scale`` (a reduced-depth calibration model: its per-prompt
compute is multiplied by real layers / calibrated layers, including the parts that do not scale with depth);
Slurm runs a stage's tasks as waves of ``min(array_parallelism, N // GPUs per task)``; training ranks run
their micro-batches in parallel (no communication cost); the unit costs of iteration 1 hold for every one.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from silmm import __version__
from silmm import config as C
from silmm.executors import SlurmLimits, array_size_limit, split_arrays, stages_side_by_side
from silmm.fsutil import atomic_write_text, human_bytes
from silmm.rundir import SHARD_STAGES, RunDir

PLAN_STAGES = (*SHARD_STAGES, "pairs", "train")
# stages whose work is the model's forward passes: what --depth-scale multiplies
MODEL_STAGES = ("prompts", "questions", "samples", "scores", "train")
DEFAULT_PROMPTS = 4  # calibration prompts (one shard) when the categories do not ask for more
DEFAULT_STEPS = 2  # calibration optimizer steps


class PlanError(RuntimeError):
    """The calibration run could not measure a stage; the message names it."""


# ------------------------------------------------------------------------------------------- unit costs
@dataclass
class StageCost:
    """What one stage costs on the calibration machine."""

    load_s: float = 0.0  # fixed seconds of one task: model load(s); train: also engine set-up and export
    unit_s: float = 0.0  # seconds per prompt; train: per calibration step (one micro-batch, see calibration_config)
    once_s: float = 0.0  # prompts: the vocabulary, computed by each task of an iteration's first wave
    bytes_per_prompt: float = 0.0  # bytes of the stage's outputs per prompt (sharded stages and pairs)
    files_per_task: int = 0  # files one task (one shard) leaves: outputs, log, stats, progress record
    peak_mem_bytes: int = 0  # see UnitCosts.memory_kind


@dataclass
class UnitCosts:
    stages: dict[str, StageCost]
    model_bytes: int = 0  # the base model on disk: what every load reads
    export_bytes: int = 0  # the model the train job writes per iteration (iter_K/model)
    checkpoint_bytes: int = 0  # the newest training checkpoint kept per iteration (gc category "checkpoints")
    train_other_bytes: int = 0  # the rest of iter_K/train: adapter, metrics
    checkpoint_save_s: float = 0.0  # one training checkpoint save
    device: str = ""  # what the costs were measured on, e.g. "cpu: AMD EPYC 7B13 (2 threads), float32"
    memory_kind: str = ""  # what peak_mem_bytes measures
    prompts: int = 0  # calibration prompts
    train_steps: int = 0  # calibration optimizer steps
    train_micro_batch: int = 0  # pairs per calibration step (the configured micro-batch)
    calibrated_at: str = ""
    source: str = "calibration"  # or the --unit-costs file that replaced or amended it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str, partial: bool = False) -> UnitCosts:
        """Checked: unknown keys, a missing stage or field (unless ``partial``), non-numbers are ConfigErrors."""
        check_fields(data, where, partial)
        stages = {s: StageCost(**v) for s, v in data.get("stages", {}).items()}
        return cls(stages=stages, **{k: v for k, v in data.items() if k != "stages"})


_NUMERIC_TOP = tuple(f.name for f in fields(UnitCosts) if f.type in ("int", "float"))
_STAGE_FIELDS = tuple(f.name for f in fields(StageCost))


def check_fields(data: Any, where: str, partial: bool) -> None:
    if not isinstance(data, dict):
        raise C.ConfigError(f"{where}: expected a JSON object of unit costs")
    known = {f.name for f in fields(UnitCosts)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise C.ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    stages = data.get("stages", {})
    if not isinstance(stages, dict) or set(stages) - set(PLAN_STAGES):
        raise C.ConfigError(f"{where}: 'stages' must map stage names {list(PLAN_STAGES)} to their costs")
    missing = [] if partial else [k for k in _NUMERIC_TOP if k not in data]
    for stage in PLAN_STAGES:
        given = stages.get(stage)
        if given is None:
            missing += [] if partial else [f"stages.{stage}"]
            continue
        bad = sorted(set(given) - set(_STAGE_FIELDS))
        if bad:
            raise C.ConfigError(f"{where}: stages.{stage}: unknown keys {bad}; known: {list(_STAGE_FIELDS)}")
        missing += [] if partial else [f"stages.{stage}.{k}" for k in _STAGE_FIELDS if k not in given]
        for k, v in given.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise C.ConfigError(f"{where}: stages.{stage}.{k} must be a finite number >= 0, got {v!r}")
    for k in _NUMERIC_TOP:
        v = data.get(k, 0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise C.ConfigError(f"{where}: {k} must be a finite number >= 0, got {v!r}")
    if missing:
        raise C.ConfigError(f"{where}: without a calibration (--no-calibrate) every cost is needed; missing "
                            f"{', '.join(missing)}")


def read_unit_costs(path: str | Path, partial: bool) -> dict[str, Any]:
    """A --unit-costs file, checked (a whole UnitCosts, or with ``partial`` only the fields to replace)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise C.ConfigError(f"--unit-costs {path}: not a readable JSON file ({exc})") from None
    check_fields(data, f"--unit-costs {path}", partial)
    return data


def amend(costs: UnitCosts, data: dict[str, Any], source: str) -> UnitCosts:
    """``costs`` with the fields ``data`` gives replaced (a checked partial --unit-costs file)."""
    out = copy.deepcopy(costs)
    for k, v in data.items():
        if k != "stages":
            setattr(out, k, v)
    for stage, values in data.get("stages", {}).items():
        for k, v in values.items():
            setattr(out.stages.setdefault(stage, StageCost()), k, v)
    out.source = f"{costs.source}, amended by {source}"
    return out


# ------------------------------------------------------------------------------------------- calibration
def calibration_config(cfg: C.SilmmConfig, root: Path, prompts: int, steps: int) -> C.SilmmConfig:
    """The config of the calibration run: ``prompts`` prompts in one shard, one iteration, in-process (debug
    executor), no evaluation or clean-up. Training runs ``steps`` optimizer steps of one micro-batch each (the
    configured train.batch_size / (grad_accum x ranks) pairs, accumulation 1, no held-out split): the plan
    multiplies a step by grad_accum, since the ranks run their micro-batches side by side."""
    cal = copy.deepcopy(cfg)
    cal.run.root, cal.run.name, cal.run.iterations = str(root), "calibration", 1
    cal.prompts.count, cal.sharding.prompts_per_shard = prompts, prompts
    cal.executor.kind = C.ExecutorKind.debug
    cal.eval.after_each_iteration = False
    cal.store.gc_after_iteration = []
    t = cal.train
    ranks, _ = C.train_world_size(cfg)
    t.batch_size, t.grad_accum = max(1, t.batch_size // (t.grad_accum * ranks)), 1
    t.max_steps, t.warmup_steps, t.checkpoint_every, t.log_every, t.eval_every = steps, 0, steps, 1, steps
    t.heldout_fraction = 0.0
    C.validate(cal, "silmm plan (calibration run)")
    return cal


def default_prompts(cfg: C.SilmmConfig) -> int:
    """Calibration prompts: one per category of generated prompts (their exact mix: the model writes some,
    templates the rest), at least DEFAULT_PROMPTS."""
    if cfg.prompts.source is not C.PromptSource.generate:
        return DEFAULT_PROMPTS
    return max(DEFAULT_PROMPTS, sum(1 for w in cfg.prompts.categories.values() if w > 0))


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(cfg: C.SilmmConfig) -> str:
    """The device the model runs on, its name and dtype (and the CPU threads when on CPU)."""
    import torch

    from silmm.backends.base import resolve_device

    device, dtype = resolve_device(cfg.model)
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(0)}, {dtype_name}"
    return f"cpu: {host_cpu()} ({len(os.sched_getaffinity(0))} threads), {dtype_name}"


def tree_fingerprint(path: str | Path | None) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime in ns) of every file under ``path``: a changed checkpoint changes it."""
    if not path or not Path(path).exists():
        return []
    root = Path(path)
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.is_file())


def cache_key(cal: C.SilmmConfig, device: str) -> dict[str, Any]:
    """What changes the unit costs: every key of the calibration run's config hash (the model path, backend,
    dtype, sampling, questions, feedback, pairs, train, store... a superset of what changes the work per
    prompt; prompts.count, sharding and train.max_steps are the calibration's own), the model's files, the
    device and the host CPU, silmm's version."""
    fb = cal.feedback.judge_path
    return {"silmm": __version__, "page_in": PAGE_IN_VERSION, "config_hash": C.config_hash(cal),
            "model_files": hashed(tree_fingerprint(cal.model.path)),
            "judge_files": hashed(tree_fingerprint(fb)) if fb else None, "device": device, "host_cpu": host_cpu()}


def hashed(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "silmm" / "plan"


def cache_path(key: dict[str, Any], folder: Path | None = None) -> Path:
    return (folder or cache_dir()) / f"{hashed(key)}.json"


def read_cache(path: Path, key: dict[str, Any]) -> UnitCosts | None:
    """The cached costs of ``key``; None when absent, unreadable or another key's (then recalibrated)."""
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        return UnitCosts.from_json(data["costs"], str(path))
    except (OSError, ValueError, KeyError, TypeError, C.ConfigError):
        return None


class PeakMemory:
    """Peak memory of a stage: CUDA's max allocated on a GPU, else the process's peak RSS (VmHWM, reset
    before each stage through /proc/self/clear_refs; where that is refused, the growth of ru_maxrss, a
    lower bound)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._start = 0
        self._resettable = not cuda and _reset_vmhwm()
        if cuda:
            self.kind = "CUDA max allocated (torch.cuda.max_memory_allocated)"
        elif self._resettable:
            self.kind = "peak RSS of the process (VmHWM, reset before each stage)"
        else:
            self.kind = "growth of the process's peak RSS during the stage (ru_maxrss; a lower bound)"

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self._resettable:
            _reset_vmhwm()
        else:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated())
        if self._resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._start


def _reset_vmhwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: "5" resets the peak RSS (VmHWM)
        return True
    except OSError:
        return False


@dataclass
class _Timings:
    """Seconds accumulated by the hooks of one calibration (read before and after each stage)."""

    load_s: float = 0.0
    vocab_s: float = 0.0
    save_s: float = 0.0
    saves: int = 0
    export_s: float = 0.0
    loop_start: float | None = None
    export_start: float | None = None


PAGE_IN_VERSION = 1  # in the cache key: calibrations from before the page-in timed the reads per prompt


def backend_modules(backend: Any) -> list:
    """The torch modules a backend holds: its module attributes and the components of a diffusers pipeline
    it holds (a pipeline is not a module: SEED-LLaMA's unCLIP decoder)."""
    import torch

    found = []
    for value in vars(backend).values():
        parts = getattr(value, "components", None)
        for v in [value, *(parts.values() if isinstance(parts, dict) else ())]:
            if isinstance(v, torch.nn.Module):
                found.append(v)
    return found


def page_in(backend: Any) -> int:
    """Read every weight of the backend's modules once; returns the bytes read. Safetensors files are
    memory-mapped, so a load returns before the weights are read and the first forward pays for the reads:
    calibrating on a few prompts would count them as per-prompt work. Read inside the timed load, they count
    as the task's fixed cost, which they are."""
    seen: set[int] = set()
    total = 0
    for module in backend_modules(backend):
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) in seen or tensor.device.type == "meta":
                continue
            seen.add(id(tensor))
            tensor.detach().sum()  # touches every page of the tensor
            total += tensor.numel() * tensor.element_size()
    return total


@contextmanager
def timing_hooks(clock: Callable[[], float], t: _Timings) -> Iterator[None]:
    """Time the model loads (silmm.models.load_backend, also where a job imported it by name), the prompts
    stage's vocabulary, and the train loop: from its Prefetcher (created right before the first step) to the
    export, less the checkpoint saves. Everything restored on exit."""
    import jobs.prompts
    import jobs.questions
    import jobs.samples
    import jobs.scores
    import jobs.train
    from silmm import models as M
    from silmm import prompts as P
    from silmm import trainer as T

    def timed(fn: Callable, name: str, count: str = "", start: str = "") -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            if start:
                setattr(t, start, t0)
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(t, name, getattr(t, name) + clock() - t0)
                if count:
                    setattr(t, count, getattr(t, count) + 1)
        return wrapper

    class TimedPrefetcher(T.Prefetcher):
        def __init__(self, *args: Any, **kwargs: Any):
            t.loop_start = clock()
            super().__init__(*args, **kwargs)

    load = M.load_backend

    def load_and_page_in(*args: Any, **kwargs: Any) -> Any:
        backend = load(*args, **kwargs)
        page_in(backend)
        return backend

    timed_load = timed(functools.wraps(load)(load_and_page_in), "load_s")
    patches = [(m, "load_backend", timed_load) for m in (M, jobs.prompts, jobs.questions, jobs.samples,
               jobs.scores, jobs.train) if getattr(m, "load_backend", None) is load]
    patches += [(P, "build_vocabulary", timed(P.build_vocabulary, "vocab_s")),
                (T, "Prefetcher", TimedPrefetcher),
                (T, "export_model", timed(T.export_model, "export_s", start="export_start")),
                (T.Checkpoints, "save", timed(T.Checkpoints.save, "save_s", count="saves"))]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def run_stage(run: RunDir, stage: str) -> None:
    """One calibration stage: its single task, in this process, as the debug executor runs it."""
    from silmm.tasks import StageTask, run_task

    stats = run_task(StageTask(str(run.path), 1, stage, 0))
    if "held_by" in stats or stats.get("skipped"):
        raise PlanError(f"calibration stage {stage}: its task did not run ({stats})")


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path`` (a file: itself)."""
    if path.is_file():
        return path.stat().st_size, 1
    files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return sum(p.stat().st_size for p in files), len(files)


def icl_share(count: int, categories: dict[str, float]) -> float:
    """The share of prompts the model writes from in-context examples (the rest are templates, ~free)."""
    from silmm.prompts import ICL_CATEGORIES, apportion

    counts = apportion(count, categories)
    return sum(counts.get(c, 0) for c in ICL_CATEGORIES) / max(count, 1)


def calibrate(cfg: C.SilmmConfig, prompts: int = DEFAULT_PROMPTS, steps: int = DEFAULT_STEPS, *,
              recalibrate: bool = False, folder: Path | None = None, clock: Callable[[], float] = time.perf_counter,
              stage_runner: Callable[[RunDir, str], None] = run_stage,
              say: Callable[[str], None] = print) -> UnitCosts:
    """Unit costs of ``cfg``'s model on this machine: from the cache, or measured by a calibration run
    (:func:`calibration_config`) in a temporary directory that is removed afterwards."""
    from silmm.models import ensure_base_model

    ensure_base_model(cfg)  # a tiny config's checkpoint is built first: its files are part of the key
    with tempfile.TemporaryDirectory(prefix="silmm-plan-") as tmp:
        cal = calibration_config(cfg, Path(tmp), prompts, steps)
        device = device_description(cal)
        key = cache_key(cal, device)
        path = cache_path(key, folder)
        cached = None if recalibrate else read_cache(path, key)
        if cached is not None:
            say(f"unit costs from the cache: {path} (calibrated {cached.calibrated_at}; --recalibrate to measure "
                "again)")
            return cached
        say(f"calibrating on {device}: {prompts} prompt(s) in one shard, {steps} training step(s) "
            f"(run directory {tmp}, removed afterwards)")
        costs = measure(cfg, RunDir.create_or_open(cal), device, clock, stage_runner, say)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "costs": costs.to_json()}, indent=1) + "\n")
    say(f"unit costs cached in {path}")
    return costs


def measure(cfg: C.SilmmConfig, run: RunDir, device: str, clock: Callable[[], float],
            stage_runner: Callable[[RunDir, str], None], say: Callable[[str], None]) -> UnitCosts:
    """Run every stage of ``run`` (the calibration run) once and split its time, bytes and memory."""
    cal, k = run.config, run.config.prompts.count
    memory = PeakMemory(device.startswith("cuda"))
    timings, stages = _Timings(), {}
    costs = UnitCosts(stages=stages, device=device, memory_kind=memory.kind, prompts=k,
                      train_steps=cal.train.max_steps, train_micro_batch=cal.train.batch_size,
                      model_bytes=tree_size(Path(cal.model.path))[0])
    with timing_hooks(clock, timings):
        for stage in PLAN_STAGES:
            before, files_before = copy.copy(timings), tree_size(run.path)[1]
            memory.reset()
            t0 = clock()
            stage_runner(run, stage)
            seconds = clock() - t0
            cost = StageCost(load_s=timings.load_s - before.load_s, once_s=timings.vocab_s - before.vocab_s,
                             files_per_task=tree_size(run.path)[1] - files_before, peak_mem_bytes=memory.peak())
            if stage == "train":
                _train_costs(run, cost, costs, timings, seconds)
            else:
                out = run.pairs_path(1) if stage == "pairs" else run.shard_path(1, stage, 0)
                cost.bytes_per_prompt = tree_size(out)[0] / k
                cost.unit_s = max(0.0, seconds - cost.load_s - cost.once_s) / k
            if stage == "prompts" and cal.prompts.source is C.PromptSource.generate:
                cost.unit_s *= _icl_ratio(cfg, k, say)
            stages[stage] = cost
            say(f"  {stage:9s} {seconds:8.2f} s: load {cost.load_s:.2f} s, {cost.unit_s:.4g} s per "
                f"{'step' if stage == 'train' else 'prompt'}, peak {human_bytes(cost.peak_mem_bytes)}")
    costs.calibrated_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return costs


def _train_costs(run: RunDir, cost: StageCost, costs: UnitCosts, t: _Timings, seconds: float) -> None:
    """Train: per step = the loop (Prefetcher to export) less its checkpoint saves, over the steps; the rest of
    the job (load, LoRA, engine, export) is its fixed cost."""
    if t.loop_start is None or t.export_start is None:
        raise PlanError("calibration stage train: its loop was not seen (no Prefetcher or export_model call)")
    loop = t.export_start - t.loop_start - t.save_s
    cost.unit_s = max(0.0, loop) / run.config.train.max_steps
    cost.load_s = max(0.0, seconds - loop - t.save_s)
    costs.checkpoint_save_s = t.save_s / max(t.saves, 1)
    checkpoints = tree_size(run.train_dir(1) / "checkpoints")[0]
    costs.checkpoint_bytes = checkpoints
    costs.train_other_bytes = tree_size(run.train_dir(1))[0] - checkpoints
    costs.export_bytes = tree_size(run.model_dir(1))[0]


def _icl_ratio(cfg: C.SilmmConfig, k: int, say: Callable[[str], None]) -> float:
    """The prompts stage's work is the model-written (in-context) prompts: scale the calibration's share of
    them to the configured run's."""
    cal, full = icl_share(k, cfg.prompts.categories), icl_share(cfg.prompts.count, cfg.prompts.categories)
    if cal == 0:
        say(f"  note: none of the {k} calibration prompts is model-written (in-context categories); the prompts "
            "stage's per-prompt cost is that of templates only: raise --calibrate-prompts")
        return 1.0
    return full / cal


# ------------------------------------------------------------------------------------------- arithmetic
@dataclass
class StagePlan:
    stage: str
    gpu: bool  # asks for GPUs (device-hours are GPU-hours) or not (CPU-hours)
    shards: int
    tasks: int
    loads: int
    units_per_task: int  # prompts of a full task; train: optimizer steps
    task_s: float  # the longest task
    concurrent: int  # tasks at once
    waves: int
    wall_s: float
    task_hours: float  # sum of the tasks' durations
    device_hours: float  # task hours x GPUs per task (GPU stage) or x CPUs per task (CPU stage)
    disk_bytes: float
    files: int
    arrays: list[int]  # array sizes as submitted ([] for a single job)
    peak_mem_bytes: int
    resources: dict[str, Any]


@dataclass
class RunPlan:
    stages: list[StagePlan]
    iterations: int
    gpus: int
    prompts: int
    iteration_wall_s: float
    run_wall_s: float
    gpu_hours_iteration: float
    cpu_hours_iteration: float
    disk_iteration: float
    disk_no_cleanup: float  # the run's total, nothing removed
    disk_cleanup: float  # the peak when each finished iteration's samples shards and checkpoints are removed
    disk_configured: float  # the peak with store.gc_after_iteration as configured
    gc_configured: list[str]
    concurrent_stages: bool
    concurrency_note: str
    array_limit: int
    array_limit_source: str
    depth_scale: float
    costs: UnitCosts
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def waves_wall(durations: list[float], concurrent: int) -> tuple[int, float]:
    """Tasks in order, ``concurrent`` at a time: (waves, wall seconds = the sum of each wave's longest)."""
    groups = [durations[i: i + concurrent] for i in range(0, len(durations), concurrent)]
    return len(groups), sum(max(g) for g in groups)


def shard_prompts(count: int, per_shard: int) -> list[int]:
    """Prompts of each shard (the last may be short)."""
    return [min(per_shard, count - start) for start in range(0, count, per_shard)]


def concurrency(res: C.StageResources, gpus: int) -> int:
    """Tasks of a stage that run at once: its array throttle, and for a GPU stage the tasks N GPUs hold
    (0: not even one)."""
    if res.gpus_per_node == 0:
        return res.array_parallelism
    return min(res.array_parallelism, gpus // (res.gpus_per_node * res.nodes))


def devices_per_task(res: C.StageResources) -> int:
    return res.gpus_per_node * res.nodes if res.gpus_per_node else res.cpus_per_task * res.nodes * res.tasks_per_node


def resources_of(res: C.StageResources) -> dict[str, Any]:
    return {"partition": res.partition, "nodes": res.nodes, "gpus_per_node": res.gpus_per_node,
            "tasks_per_node": res.tasks_per_node, "cpus_per_task": res.cpus_per_task, "mem_gb": res.mem_gb,
            "time_min": res.time_min, "array_parallelism": res.array_parallelism,
            "shards_per_task": res.shards_per_task}


def _scale(stage: str, cfg: C.SilmmConfig, depth_scale: float) -> float:
    model_work = stage in MODEL_STAGES and not (stage == "prompts" and cfg.prompts.source is not C.PromptSource.generate)
    return depth_scale if model_work else 1.0


def sharded_stage(cfg: C.SilmmConfig, stage: str, cost: StageCost, gpus: int, array_limit: int,
                  depth_scale: float, warnings: list[str]) -> StagePlan:
    res = cfg.resources(stage)
    per_shard = shard_prompts(cfg.prompts.count, cfg.sharding.prompts_per_shard)
    spt = res.shards_per_task
    task_prompts = [sum(per_shard[i: i + spt]) for i in range(0, len(per_shard), spt)]
    concurrent = concurrency(res, gpus)
    if concurrent == 0:
        warnings.append(f"stage {stage}: a task needs {res.gpus_per_node * res.nodes} GPU(s), --gpus {gpus} holds "
                        "none; planned as if one ran at a time")
        concurrent = 1
    per_prompt = cost.unit_s * _scale(stage, cfg, depth_scale)
    # each task of the first wave computes the vocabulary (the first to finish writes it, later tasks read it)
    durations = [n * per_prompt + cost.load_s + (cost.once_s if i < concurrent else 0.0)
                 for i, n in enumerate(task_prompts)]
    waves, wall = waves_wall(durations, concurrent)
    task_hours = sum(durations) / 3600
    return StagePlan(stage, res.gpus_per_node > 0, len(per_shard), len(task_prompts), len(task_prompts),
                     max(task_prompts), max(durations), concurrent, waves, wall, task_hours,
                     task_hours * devices_per_task(res), cost.bytes_per_prompt * cfg.prompts.count,
                     len(per_shard) * cost.files_per_task, [len(a) for a in split_arrays(task_prompts, array_limit)],
                     cost.peak_mem_bytes, resources_of(res))


def pairs_stage(cfg: C.SilmmConfig, cost: StageCost) -> StagePlan:
    res = cfg.resources("pairs")
    seconds = cost.load_s + cost.unit_s * cfg.prompts.count
    return StagePlan("pairs", res.gpus_per_node > 0, 1, 1, 0, cfg.prompts.count, seconds, 1, 1, seconds,
                     seconds / 3600, seconds / 3600 * devices_per_task(res), cost.bytes_per_prompt * cfg.prompts.count,
                     cost.files_per_task, [], cost.peak_mem_bytes, resources_of(res))


def train_stage(cfg: C.SilmmConfig, costs: UnitCosts, gpus: int, depth_scale: float,
                warnings: list[str]) -> StagePlan:
    res, t, cost = cfg.resources("train"), cfg.train, costs.stages["train"]
    needed = res.gpus_per_node * res.nodes
    if needed > gpus:
        warnings.append(f"stage train: asks for {needed} GPUs (executor.stages.train nodes x gpus_per_node), "
                        f"more than --gpus {gpus}")
    step = cost.unit_s * t.grad_accum * depth_scale  # ranks run their micro-batches side by side
    saves = math.ceil(t.max_steps / t.checkpoint_every)
    seconds = cost.load_s + t.max_steps * step + saves * costs.checkpoint_save_s
    disk = costs.export_bytes + costs.checkpoint_bytes + costs.train_other_bytes
    ranks = res.nodes * res.tasks_per_node
    return StagePlan("train", needed > 0, 1, 1, ranks, t.max_steps, seconds, 1, 1, seconds, seconds / 3600,
                     seconds / 3600 * devices_per_task(res), disk, cost.files_per_task, [], cost.peak_mem_bytes,
                     resources_of(res))


def disk_peak(per_iteration: float, removable: float, iterations: int) -> float:
    """The run's disk at its peak, the end of the last iteration: every finished iteration without what is
    removed after it, plus the last iteration whole."""
    return (iterations - 1) * (per_iteration - removable) + per_iteration


def removable_bytes(stages: dict[str, StagePlan], costs: UnitCosts, categories: list[str] | tuple[str, ...]) -> float:
    """Bytes of one iteration that clean-up removes (silmm gc's categories; progress sidecars and moved-aside
    files are transient and not in the plan)."""
    return (stages["samples"].disk_bytes if "samples" in categories else 0.0) + \
        (costs.checkpoint_bytes if "checkpoints" in categories else 0.0)


def plan_run(cfg: C.SilmmConfig, costs: UnitCosts, gpus: int, limits: SlurmLimits, limits_source: str,
             depth_scale: float = 1.0) -> RunPlan:
    """The configured run's costs from ``costs`` (pure: no I/O)."""
    warnings: list[str] = []
    missing = [s for s in PLAN_STAGES if s not in costs.stages]
    if missing:
        raise C.ConfigError(f"unit costs ({costs.source}) lack stages {missing}")
    limit = array_size_limit(cfg.executor.max_array_size, limits)
    plans = [sharded_stage(cfg, s, costs.stages[s], gpus, limit, depth_scale, warnings) for s in SHARD_STAGES]
    plans += [pairs_stage(cfg, costs.stages["pairs"]), train_stage(cfg, costs, gpus, depth_scale, warnings)]
    by = {p.stage: p for p in plans}
    concurrent = stages_side_by_side(cfg.executor)
    walls = {p.stage: p.wall_s for p in plans}
    if concurrent:
        q, s = by["questions"], by["samples"]
        shared = sum(p.device_hours * 3600 for p in (q, s) if p.gpu) / gpus
        walls["questions"], walls["samples"] = 0.0, max(q.wall_s, s.wall_s, shared)
        note = (f"questions and samples side by side ({cfg.executor.kind.value} executor): the longer of the two, "
                "or their GPU time shared by the N GPUs when that is longer")
    else:
        note = (f"questions, then samples ({cfg.executor.kind.value} executor"
                + (", local_parallelism 1)" if cfg.executor.kind is C.ExecutorKind.local else ")"))
    for p in plans:
        if p.task_s > p.resources["time_min"] * 60:
            warnings.append(f"stage {p.stage}: a task takes ~{duration(p.task_s)}, more than its time limit of "
                            f"{p.resources['time_min']} min: raise executor.stages.{p.stage}.time_min"
                            + ("" if p.stage in ("pairs", "train") else
                               " (or lower sharding.prompts_per_shard / executor.stages."
                               f"{p.stage}.shards_per_task); tasks requeue and resume, each time loading the model"))
        if p.peak_mem_bytes > p.resources["mem_gb"] * 2**30 and costs.memory_kind.startswith(("peak RSS", "growth")):
            warnings.append(f"stage {p.stage}: measured peak RSS {human_bytes(p.peak_mem_bytes)} exceeds "
                            f"mem_gb={p.resources['mem_gb']}: raise executor.stages.{p.stage}.mem_gb")
    iteration_wall = sum(walls.values())
    per_iteration = sum(p.disk_bytes for p in plans)
    gc_cfg = list(cfg.store.gc_after_iteration)
    return RunPlan(
        stages=plans, iterations=cfg.run.iterations, gpus=gpus, prompts=cfg.prompts.count,
        iteration_wall_s=iteration_wall, run_wall_s=iteration_wall * cfg.run.iterations,
        gpu_hours_iteration=sum(p.device_hours for p in plans if p.gpu),
        cpu_hours_iteration=sum(p.device_hours for p in plans if not p.gpu),
        disk_iteration=per_iteration, disk_no_cleanup=per_iteration * cfg.run.iterations,
        disk_cleanup=disk_peak(per_iteration, removable_bytes(by, costs, ("samples", "checkpoints")),
                               cfg.run.iterations),
        disk_configured=disk_peak(per_iteration, removable_bytes(by, costs, gc_cfg), cfg.run.iterations),
        gc_configured=gc_cfg, concurrent_stages=concurrent, concurrency_note=note, array_limit=limit,
        array_limit_source=limits_source, depth_scale=depth_scale, costs=costs, warnings=warnings)


def cluster_limits(max_array_size: int) -> tuple[SlurmLimits, str]:
    """The cluster's limits when `scontrol` is here, else none (executor.max_array_size alone); and which."""
    import shutil

    from silmm.executors import slurm_limits

    if shutil.which("scontrol"):
        limits = slurm_limits()
        if limits.max_array_size or limits.max_job_count:
            return limits, (f"scontrol: MaxArraySize={limits.max_array_size}, MaxJobCount={limits.max_job_count}; "
                            f"executor.max_array_size={max_array_size}")
    return SlurmLimits(), f"executor.max_array_size={max_array_size} (no scontrol here: the cluster's MaxArraySize " \
                          "is not known)"


# ------------------------------------------------------------------------------------------- output
def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def format_plan(plan: RunPlan) -> str:
    c = plan.costs
    cpu_calibrated = not c.device.startswith("cuda")
    hours = "h on this CPU" if cpu_calibrated else "GPU-h"
    out = [f"unit costs: {c.source}, {c.device}, {c.prompts} prompt(s), {c.train_steps} step(s) of "
           f"{c.train_micro_batch} pair(s), {c.calibrated_at}"]
    if plan.depth_scale != 1:
        out.append(f"depth scale x{plan.depth_scale:g}: model stages' per-prompt (per-step) compute multiplied by "
                   "real layers / calibrated layers (approximation: also multiplies what does not scale with depth)")
    if cpu_calibrated:
        out.append("calibrated on a CPU: hours are hours of this CPU at the model's compute, not GPU-hours; "
                   "calibrate on the cluster's GPU (or pass --unit-costs) for GPU-hours")
    out += ["", f"per iteration: {plan.prompts} prompts, {plan.gpus} GPUs "
            f"(x {plan.iterations} iteration(s))", ""]
    rows = []
    for p in plan.stages:
        unit = "steps" if p.stage == "train" else "prompts"
        dev = f"{p.device_hours:.1f} {hours if p.gpu else 'CPU-h'}"
        rows.append([p.stage, str(p.shards), str(p.tasks), str(p.loads), f"{p.units_per_task} {unit}",
                     duration(p.task_s), f"{p.concurrent} x {p.waves}", duration(p.wall_s), dev,
                     human_bytes(p.disk_bytes), str(p.files), human_bytes(p.peak_mem_bytes)])
    out.append(table(["stage", "shards", "tasks", "loads", "per task", "task time", "at once x waves", "wall",
                      "device time", "disk", "files", "peak mem"], rows))
    out += ["", f"wall per iteration {duration(plan.iteration_wall_s)}; run ({plan.iterations} iterations) "
            f"{duration(plan.run_wall_s)}; {plan.concurrency_note}",
            f"per iteration {plan.gpu_hours_iteration:.1f} {hours} of GPU stages, {plan.cpu_hours_iteration:.1f} "
            f"CPU-h; run {plan.gpu_hours_iteration * plan.iterations:.1f} {hours}",
            f"disk per iteration {human_bytes(plan.disk_iteration)}; run without clean-up "
            f"{human_bytes(plan.disk_no_cleanup)}, with clean-up (samples shards and checkpoints of finished "
            f"iterations removed: store.gc_after_iteration=[samples, checkpoints] or silmm gc) peak "
            f"{human_bytes(plan.disk_cleanup)}"
            + (f"; as configured ({plan.gc_configured}) {human_bytes(plan.disk_configured)}"
               if plan.gc_configured else ""),
            f"peak memory: {c.memory_kind}; model on disk {human_bytes(c.model_bytes)}", "",
            f"Slurm resources (arrays split at {plan.array_limit}: {plan.array_limit_source})", ""]
    rows = []
    for p in plan.stages:
        r = p.resources
        gpus = f"{r['nodes']}x{r['gpus_per_node']}" if r["gpus_per_node"] else "-"
        arrays = " + ".join(map(str, p.arrays)) if p.arrays else "one job"
        rows.append([p.stage, r["partition"] or "-", gpus, str(r["cpus_per_task"]), f"{r['mem_gb']:g}G",
                     f"{r['time_min']} min", arrays, f"%{r['array_parallelism']}" if p.arrays else "-",
                     str(r["shards_per_task"]) if p.arrays else "-"])
    out.append(table(["stage", "partition", "GPUs", "CPUs", "mem", "time", "arrays", "throttle", "shards/task"],
                     rows))
    if plan.warnings:
        out += ["", "warnings:", *[f"  - {w}" for w in plan.warnings]]
    return "\n".join(out) + "\n"
