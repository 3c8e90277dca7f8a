"""`silmm inspect` and `silmm verify`: summaries and full validation of shards and runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from silmm.fsutil import human_bytes
from silmm.rundir import SHARD_STAGES, RunDir
from silmm.store import ShardError, read_shard, validate_shard


def describe_shard(path: str | Path) -> str:
    path = Path(path)
    shard = read_shard(path, columns=())
    m = shard.meta
    lines = [
        f"shard {path}",
        f"  stage {m.stage} · iteration {m.iteration} · shard {m.shard_index} of {m.shard_count} · "
        f"config {m.config_hash}",
        f"  created {shard.attrs['created']} by silmm {shard.attrs['silmm_version']} · "
        f"file {human_bytes(path.stat().st_size)}",
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

    @property
    def missing(self) -> int:
        return max(self.expected - len(self.done) - len(self.bad), 0)


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
    """Validate every shard of every iteration on disk (checksums included); return the bad ones."""
    bad: list[tuple[Path, str]] = []
    for it in run.iterations_on_disk():
        for stage in SHARD_STAGES:
            for f in sorted(run.stage_dir(it, stage).glob("shard_*.h5")):
                problem = validate_shard(f, stage=stage, config_hash=run.config_hash, iteration=it)
                if problem:
                    bad.append((f, problem))
        pairs = run.pairs_path(it)
        if pairs.exists():
            problem = validate_shard(pairs, stage="pairs", config_hash=run.config_hash, iteration=it)
            if problem:
                bad.append((pairs, problem))
    for f in sorted(run.path.glob("eval/*/iter_*/shard_*.h5")):  # benchmark evaluation (jobs/eval.py)
        problem = validate_shard(f, stage="eval", config_hash=run.config_hash,
                                 iteration=int(f.parent.name.removeprefix("iter_")))
        if problem:
            bad.append((f, problem))
    return bad
