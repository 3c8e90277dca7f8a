"""`silmm inspect` and `silmm verify`: summaries and full validation of shards and runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from silmm.fsutil import human_bytes
from silmm.rundir import SHARD_STAGES, RunDir
from silmm.store import ShardError, indexed_samples, read_shard, validate_shard

REMOVED_BY_GC = "removed by gc"  # verify's note (not a problem) for a shard `silmm gc` removed (silmm/gc.py)


def describe_shard(path: str | Path) -> str:
    path = Path(path)
    shard = read_shard(path, columns=(), verify_checksums=False)  # describes a damaged shard too
    m = shard.meta
    problem = validate_shard(path)
    lines = [
        f"shard {path}",
        f"  stage {m.stage} · iteration {m.iteration} · shard {m.shard_index} of {m.shard_count} · "
        f"config {m.config_hash}",
        f"  created {shard.attrs['created']} by silmm {shard.attrs['silmm_version']} · "
        f"file {human_bytes(path.stat().st_size)}",
        f"  integrity: {'checksums ok' if problem is None else problem}",
        "  rows: " + ", ".join(f"{k}={v}" for k, v in json.loads(shard.attrs["row_counts"]).items()),
        "  datasets:",
    ]
    with h5py.File(path, "r") as f:
        for name in f:
            d = f[name]
            comp = d.compression or "-"
            lines.append(f"    {name:22s} {str(d.dtype):12s} {str(d.shape):18s} "
                         f"{human_bytes(d.id.get_storage_size()):>10s}  {comp}")
    if m.extra:
        lines.append(f"  extra: {json.dumps(m.extra, sort_keys=True)}")
    return "\n".join(lines)


@dataclass
class StageStatus:
    stage: str
    expected: int
    done: list[Path] = field(default_factory=list)
    in_progress: list[Path] = field(default_factory=list)  # a progress directory, no final file
    bad: list[tuple[Path, str]] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    size: int = 0
    removed: list[Path] = field(default_factory=list)  # by `silmm gc` (iter_K/gc.json), not there any more

    @property
    def missing(self) -> int:
        return max(self.expected - len(self.done) - len(self.bad) - len(self.removed), 0)


def stage_status(run: RunDir, iteration: int, stage: str, full: bool = False) -> StageStatus:
    """Look at one stage of one iteration on disk. `full` also checks checksums."""
    expected = run.num_shards(iteration) or 1  # prompt files: unknown until the first prompts shard exists
    if stage == "pairs":
        files = [run.pairs_path(iteration)] if run.pairs_path(iteration).exists() else []
        expected = 1
    else:
        files = sorted(run.stage_dir(iteration, stage).glob("shard_*.h5"))
    status = StageStatus(stage, expected)
    for f in files:
        try:
            shard = read_shard(f, stage=stage, config_hash=run.config_hash, iteration=iteration,
                               verify_checksums=full, columns=None if full else ())
        except ShardError as exc:
            status.bad.append((f, str(exc)))
            continue
        status.expected = max(status.expected, shard.meta.shard_count)
        status.done.append(f)
        status.size += f.stat().st_size
        for k, v in json.loads(shard.attrs["row_counts"]).items():
            status.rows[k] = status.rows.get(k, 0) + int(v)
    if stage != "pairs":
        from silmm.gc import removed_by_gc

        status.removed = sorted(p for p in removed_by_gc(run, iteration) if p.parent == run.stage_dir(iteration, stage)
                                and _shard_index(p) is not None and not p.exists())
        done_names = {p.name for p in status.done}
        for prog in sorted(run.stage_dir(iteration, stage).glob("shard_*.h5.progress")):
            if prog.name.removesuffix(".progress") not in done_names:
                status.in_progress.append(prog)
    return status


def describe_run(run: RunDir) -> str:
    state = run.state()
    lines = [f"run {run.path}  config {run.config_hash}  created {state.get('created')}  "
             f"backend {run.config.model.backend.value}  iterations {run.config.run.iterations}"]
    iterations = sorted(set(run.iterations_on_disk()) | {1})
    for it in iterations:
        lines.append(f"iter_{it:02d}")
        for stage in (*SHARD_STAGES, "pairs"):
            s = stage_status(run, it, stage)
            parts = [f"{len(s.done)}/{s.expected} done"]
            if s.in_progress:
                parts.append(f"{len(s.in_progress)} in progress")
            if s.bad:
                parts.append(f"{len(s.bad)} BAD")
            if s.removed:
                parts.append(f"{len(s.removed)} {REMOVED_BY_GC}")
            if s.missing:
                parts.append(f"{s.missing} missing")
            rows = ", ".join(f"{k}={v}" for k, v in sorted(s.rows.items()))
            lines.append(f"  {stage:10s} {', '.join(parts):40s} {rows:40s} {human_bytes(s.size):>10s}")
        model = run.model_dir(it)
        lines.append(f"  {'model':10s} {'done' if (model / 'DONE').exists() else 'missing'}")
    return "\n".join(lines)


def inspect_path(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        return describe_run(RunDir.open(path))
    return describe_shard(path)


def verify_run(run: RunDir) -> list[tuple[Path, str]]:
    """Every problem of a run in one pass, never stopping at the first: bad shards (checksums included),
    missing and leftover shards, progress and temporary files, moved-aside files, a missing or damaged model
    of a finished iteration, bad benchmark shards. Returns (path, problem) pairs; empty when all is well.
    A shard of a finished iteration that `silmm gc` removed (iter_K/gc.json) comes as a note starting with
    REMOVED_BY_GC instead of "missing"; `silmm verify` prints it and does not fail for it."""
    from silmm.gc import removed_by_gc
    from silmm.tasks import expectations, model_problem

    problems: list[tuple[Path, str]] = []
    finished = set(run.state().get("done", {}))
    for it in run.iterations_on_disk():
        done_iter = f"iter_{it:02d}" in finished
        removed = removed_by_gc(run, it) if done_iter else {}  # a finished iteration's samples need not stay
        n = run.num_shards(it)
        for stage in SHARD_STAGES:
            folder = run.stage_dir(it, stage)
            present: set[int] = set()
            for f in sorted(folder.glob("shard_*.h5")):
                index = _shard_index(f)
                if index is None or (n is not None and index >= n):
                    problems.append((f, f"leftover: not one of the run's {n} {stage} shards"))
                    continue
                present.add(index)
                problem = validate_shard(f, **expectations(run, it, stage, index))
                if problem:
                    problems.append((f, f"bad: {problem}"))
            if n is not None and (done_iter or folder.is_dir()):
                for i in sorted(set(range(n)) - present):
                    path = run.shard_path(it, stage, i)
                    problems.append((path, f"{REMOVED_BY_GC} at {removed[path]} (a note, not a problem)"
                                     if path in removed else "missing"))
            for prog in sorted(folder.glob("shard_*.h5.progress")):
                final = prog.with_name(prog.name.removesuffix(".progress"))
                what = "left beside a finished shard" if final.is_file() else "of an unfinished task"
                problems.append((prog, f"progress: {what}"))
        pairs = run.pairs_path(it)
        if pairs.exists():
            problem = validate_shard(pairs, **expectations(run, it, "pairs"))
            if problem:
                problems.append((pairs, f"bad: {problem}"))
            elif not run.config.discrete and model_problem(run.model_dir(it)):  # training still reads them
                pairs_shard = read_shard(pairs, columns=(), verify_checksums=False)
                problems += [(pairs, f"indexes a bad samples shard: {p}")
                             for p in indexed_samples(pairs_shard, expectations(run, it, "pairs")["options"])[1]]
        elif done_iter:
            problems.append((pairs, "missing"))
        model = run.model_dir(it)
        if done_iter or model.exists():
            problem = model_problem(model) if model.exists() else f"{model}: missing"
            if problem:
                problems.append((model, f"model: {problem}"))
    for f in sorted(run.path.glob("eval/*/iter_*/shard_*.h5")):  # benchmark evaluation (jobs/eval.py)
        problem = validate_shard(f, stage="eval", config_hash=run.config_hash,
                                 iteration=int(f.parent.name.removeprefix("iter_")))
        if problem:
            problems.append((f, f"bad: {problem}"))
    for f in sorted(run.path.rglob(".*.tmp-*")):
        problems.append((f, "temporary: left by an interrupted write"))
    for f in sorted(run.path.rglob("*.lease")):
        problems.append((f, "lease: a task is writing this output, or was killed while it did (the next task "
                            "takes a dead holder's lease over)"))
    for f in sorted(run.path.rglob("*.bad-*")):
        problems.append((f, "moved aside: found bad and replaced; inspect it, then delete it"))
    return problems


def _shard_index(path: Path) -> int | None:
    digits = path.name.removeprefix("shard_").removesuffix(".h5")
    return int(digits) if digits.isdigit() else None
