"""`silmm gc RUN`: remove what no later stage reads, by category; the driver runs the same after an iteration.

Categories (``config.GC_CATEGORIES``), each with the one test that makes a path removable:

- ``progress``: a shard's ``<shard>.progress/`` folder, ``.<name>.tmp-<pid>`` files and ``<output>.lease``
  files, once their output is complete and verified (the driver's completion check, :func:`tasks.output_problem`;
  for a file of the model or of training: the exported model's manifest) and no live writer holds its lease
  (silmm/lease.py proves a holder gone or counts it alive). A temporary file no single output owns (the
  iteration's ``vocabulary.json``) goes once the iteration's model is finished and nothing in it is leased.
- ``checkpoints``: ``iter_K/train/checkpoints`` once iteration K's exported model is complete
  (:func:`tasks.model_problem` is None): training never resumes a finished model.
- ``samples``: ``iter_K/samples/`` once iteration K is finished: its model complete and the iteration marked
  done in state.json. Until then they are training's input (continuous pairs.h5 indexes their feature
  rows, jobs/pairs.py), and a driver re-runs the stages of an iteration not marked done, which would
  regenerate them. Nothing reads them afterwards: the next iteration samples from the new model; reports
  read scores, pairs.h5 and the eval files; `silmm verify`, `inspect` and `status` read ``iter_K/gc.json``
  and say "removed by gc" instead of "missing".
- ``bad``: outputs moved aside as ``<name>.bad-<UTC time>`` (tasks.settle, store.quarantine); never read.

Never removed: the config, state.json, jobs.json, the driver lock, logs/, eval/, any model, prompts,
questions and scores shards, pairs.h5, and anything of an unfinished output or iteration. Every removal is
recorded in ``iter_K/gc.json`` (``<run>/gc.json`` for paths outside an iteration): path, category, bytes, when.

While a driver holds the run's lock, ``--yes`` removes ``bad``, ``checkpoints`` and ``samples`` (they belong
to finished iterations or to nothing: no task of the driver writes or reads them) but refuses ``progress``:
those files belong to the tasks the driver is settling and submitting. Otherwise ``--yes`` takes the lock
itself, so no driver starts half-way through a collection.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from silmm import lease as L
from silmm.config import GC_CATEGORIES, ConfigError
from silmm.fsutil import atomic_write_text, human_bytes
from silmm.rundir import SHARD_STAGES, RunDir
from silmm.tasks import StageTask, model_problem, output_path, output_problem

log = logging.getLogger(__name__)

RECORD = "gc.json"
SAFE_WHILE_DRIVER_RUNS = ("bad", "checkpoints", "samples")  # see the module docstring
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-\d+$")  # fsutil.atomic_write_text, store: ".<name>.tmp-<pid>"
_SHARD = re.compile(r"^shard_(\d{5})\.h5$")
_ORDER = ("bad", "checkpoints", "samples", "progress")  # a path both select is listed under the first


class GcRefused(RuntimeError):
    """`silmm gc --yes` would remove what a running driver may need; the message says what to do."""


@dataclass(frozen=True)
class Removal:
    path: Path
    category: str
    iteration: int | None  # None: outside an iteration directory
    bytes: int
    folder: bool = False


@dataclass
class Plan:
    removals: list[Removal] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # what was not collected, and why

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removals)


def select(only: str | None, keep: str | None) -> tuple[str, ...]:
    """The categories of ``--only`` (default: all) less those of ``--keep``; ConfigError naming an unknown one."""
    def names(text: str | None, flag: str) -> list[str]:
        items = [s.strip() for s in (text or "").split(",") if s.strip()]
        unknown = [s for s in items if s not in GC_CATEGORIES]
        if unknown:
            raise ConfigError(f"silmm gc {flag}: unknown categories {unknown}; known: {list(GC_CATEGORIES)}")
        return items

    chosen = names(only, "--only") or list(GC_CATEGORIES)
    dropped = names(keep, "--keep")
    return tuple(c for c in GC_CATEGORIES if c in chosen and c not in dropped)


# ------------------------------------------------------------------------------------------ facts
class _Facts:
    """What the plan asks about a run, each answered once (a model's check hashes every file)."""

    def __init__(self, run: RunDir, verified_models: Iterable[int] = ()):
        self.run = run
        self.done = set(run.state().get("done", {}))
        self._model: dict[int, str | None] = {k: None for k in verified_models}
        self._output: dict[tuple[int, str, int], bool] = {}
        self.me = _me()

    def model(self, iteration: int) -> str | None:
        """None when iteration K's exported model is complete, else what is wrong with it."""
        if iteration not in self._model:
            self._model[iteration] = model_problem(self.run.model_dir(iteration))
        return self._model[iteration]

    def finished(self, iteration: int) -> bool:
        return f"iter_{iteration:02d}" in self.done and self.model(iteration) is None

    def complete(self, task: StageTask) -> bool:
        key = (task.iteration, task.stage, task.shard)
        if key not in self._output:
            self._output[key] = self.model(task.iteration) is None if task.stage == "train" else \
                output_problem(self.run, task) is None
        return self._output[key]

    def live(self, lease_file: Path) -> bool:
        """A lease whose holder may still write (unreadable or unprovable holders count as alive)."""
        holder = L.read_holder(lease_file)
        return holder is not None and L.gone_reason(holder, self.me) is None

    def leased(self, task: StageTask) -> bool:
        out = output_path(self.run, task)
        return self.live(L.lease_path(out.parent if task.stage == "train" else out))

    def iteration_leased(self, iteration: int) -> bool:
        return any(self.live(p) for p in _under(self.run.iter_dir(iteration), "*.lease"))


def _me() -> L.Holder:
    """gc as a lease holder would see it; no job, so a holder is never "this job before a requeue"."""
    return L.Holder(socket.gethostname(), os.getpid(), L.process_start(os.getpid()), "", "", "gc", "")


def _under(folder: Path, pattern: str) -> Iterator[Path]:
    """Matches of ``pattern`` under ``folder``, never inside a moved-aside (``.bad-``) path: those are `bad`."""
    for p in sorted(folder.rglob(pattern)):
        if not any(".bad-" in part for part in p.relative_to(folder).parts):
            yield p


def _base(name: str) -> str:
    """The output a helper file belongs to: ``.x.h5.tmp-12`` / ``x.h5.lease`` / ``x.h5.progress`` -> ``x.h5``."""
    m = _TMP.match(name)
    name = m["name"] if m else name
    for suffix in (".lease", ".progress"):
        name = name.removesuffix(suffix)
    return name


def _owner(run: RunDir, iteration: int, path: Path) -> StageTask | None:
    """The task whose output ``path`` (a progress folder, temporary file or lease) belongs to; None when no
    single output owns it (a temporary file of the iteration's vocabulary.json)."""
    rel = path.relative_to(run.iter_dir(iteration)).parts
    head = _base(rel[0])
    if rel[0] in SHARD_STAGES and len(rel) > 1:
        m = _SHARD.match(_base(rel[1]))
        return StageTask(str(run.path), iteration, rel[0], int(m[1])) if m else None
    if head in ("pairs.h5", "pairs_summary.json"):
        return StageTask(str(run.path), iteration, "pairs")
    if head in ("model", "train"):
        return StageTask(str(run.path), iteration, "train")
    return None


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum((Path(d) / f).lstat().st_size for d, _, files in os.walk(path) for f in files)


def _iteration_of(run: RunDir, path: Path) -> int | None:
    first = path.relative_to(run.path).parts[0]
    digits = first.removeprefix("iter_")
    return int(digits) if first.startswith("iter_") and digits.isdigit() else None


# --------------------------------------------------------------------------------------- the plan
def plan(run: RunDir, categories: Iterable[str] = GC_CATEGORIES, iterations: Iterable[int] | None = None,
         verified_models: Iterable[int] = ()) -> Plan:
    """What removing ``categories`` would remove (read only). ``iterations``: those to look at (default: every
    one on disk; `bad` outside iterations only then); ``verified_models``: iterations whose model the caller
    has just verified (the driver), not hashed again."""
    cats = set(categories)
    its = sorted(iterations) if iterations is not None else run.iterations_on_disk()
    facts = _Facts(run, verified_models)
    out = Plan()
    found: list[Removal] = []
    for category in (c for c in _ORDER if c in cats):
        for path in _FINDERS[category](run, its, facts, out.kept, iterations is None):
            found.append(Removal(path, category, _iteration_of(run, path), 0))
    # a path inside another listed one (a moved-aside part inside a progress folder) goes with it
    listed, seen = {r.path for r in found}, set()
    for r in found:
        if r.path in seen or any(parent in listed for parent in r.path.parents):
            continue
        seen.add(r.path)
        _guard(run, r.path)
        folder = r.path.is_dir() and not r.path.is_symlink()
        out.removals.append(Removal(r.path, r.category, r.iteration, _size(r.path), folder))
    out.removals.sort(key=lambda r: (r.iteration or 0, _ORDER.index(r.category), str(r.path)))
    return out


def _bad(run: RunDir, its: list[int], facts: _Facts, kept: list[str], whole_run: bool) -> Iterator[Path]:
    roots = [run.iter_dir(k) for k in its] + ([run.path / "eval"] if whole_run else [])
    for root in roots:
        for p in sorted(root.rglob("*.bad-*")):
            if not any(".bad-" in part for part in p.relative_to(root).parts[:-1]):
                yield p


def _checkpoints(run: RunDir, its: list[int], facts: _Facts, kept: list[str], whole_run: bool) -> Iterator[Path]:
    for k in its:
        folder = run.train_dir(k) / "checkpoints"
        if not folder.exists():
            continue
        problem = facts.model(k)
        if problem is None and not facts.leased(StageTask(str(run.path), k, "train")):
            yield folder
        else:
            kept.append(f"iter_{k:02d} checkpoints: kept, training may resume from them "
                        f"({problem or 'the model is being written'})")


def _samples(run: RunDir, its: list[int], facts: _Facts, kept: list[str], whole_run: bool) -> Iterator[Path]:
    for k in its:
        folder = run.stage_dir(k, "samples")
        entries = sorted(p for p in folder.iterdir() if ".bad-" not in p.name) if folder.is_dir() else []
        if not entries:
            continue
        if not facts.finished(k):
            why = facts.model(k) or "the iteration is not marked done in state.json (a driver would re-run its stages)"
            kept.append(f"iter_{k:02d} samples: kept, training or a resumed driver reads them ({why})")
            continue
        for p in entries:
            owner = _owner(run, k, p)
            if owner is not None and facts.leased(owner):
                kept.append(f"{p}: kept, a live writer holds its lease")
                continue
            yield p


def _progress(run: RunDir, its: list[int], facts: _Facts, kept: list[str], whole_run: bool) -> Iterator[Path]:
    for k in its:
        root = run.iter_dir(k)
        candidates = [*(p for p in _under(root, "shard_*.h5.progress") if p.is_dir()),
                      *(p for p in _under(root, ".*.tmp-*") if _TMP.match(p.name)),
                      *(p for p in _under(root, "*.lease") if p.is_file())]
        held = 0
        for p in sorted(candidates):
            owner = _owner(run, k, p)
            if owner is not None:
                ok = not facts.leased(owner) and facts.complete(owner)
            else:
                ok = facts.model(k) is None and not facts.iteration_leased(k)
            if ok:
                yield p
            else:
                held += 1
        if held:
            kept.append(f"iter_{k:02d} progress: {held} kept, their output is unfinished or a live writer holds it")


_FINDERS = {"bad": _bad, "checkpoints": _checkpoints, "samples": _samples, "progress": _progress}


def _guard(run: RunDir, path: Path) -> None:
    """Defence in depth: a path a resumed stage or a reader needs is never removed, whatever selected it."""
    rel = path.relative_to(run.path).parts  # ValueError outside the run
    if ".bad-" in path.name:
        return
    protected = (len(rel) == 1 and not _TMP.match(rel[0])) or rel[0] == "logs" or (
        len(rel) == 2 and rel[1] in ("model", "pairs.h5")) or (
        len(rel) == 3 and rel[1] in SHARD_STAGES and rel[1] != "samples" and _SHARD.match(rel[2]))
    if protected:
        raise AssertionError(f"silmm gc: refusing to remove {path}: a run needs it (a bug in silmm.gc)")


# -------------------------------------------------------------------------------------- removing
def remove(run: RunDir, p: Plan, categories: Iterable[str], by: str) -> Plan:
    """Remove what ``p`` lists; record it in each iteration's gc.json; return what was removed. A lease is
    removed only if it still names a holder that is gone (another writer may have taken it meanwhile)."""
    me = _me()
    done: list[Removal] = []
    try:
        for r in p.removals:
            _guard(run, r.path)
            if r.path.name.endswith(".lease") and r.path.is_file():
                holder = L.read_holder(r.path)
                if holder is None or L.gone_reason(holder, me) is None:
                    continue
            if r.folder:
                shutil.rmtree(r.path)
            else:
                r.path.unlink(missing_ok=True)
            done.append(r)
            log.info("gc: removed %s (%s, %s)", r.path, r.category, human_bytes(r.bytes))
    finally:  # what was removed is recorded even when a removal fails
        _record(run, done, sorted(set(categories)), by)
    return Plan(done, p.kept)


def _record(run: RunDir, removed: list[Removal], categories: list[str], by: str) -> None:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    groups: dict[int | None, list[Removal]] = {}
    for r in removed:
        groups.setdefault(r.iteration, []).append(r)
    for k, items in groups.items():
        path = (run.iter_dir(k) if k is not None else run.path) / RECORD
        data = _read_record(path)
        data["collections"].append({
            "when": when, "by": by, "categories": categories, "bytes": sum(r.bytes for r in items),
            "removed": [{"path": str(r.path.relative_to(run.path)), "category": r.category, "bytes": r.bytes}
                        for r in items]})
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _read_record(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"collections": []}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not the JSON silmm gc writes ({exc}); move it aside to go on") from None
    if not isinstance(data, dict) or not isinstance(data.get("collections"), list):
        raise ConfigError(f"{path}: not the JSON silmm gc writes (no 'collections' list); move it aside to go on")
    return data


def removed_by_gc(run: RunDir, iteration: int) -> dict[Path, str]:
    """Paths of iteration K that gc removed -> when (from iter_K/gc.json; {} without one)."""
    path = run.iter_dir(iteration) / RECORD
    if not path.is_file():
        return {}
    return {run.path / item["path"]: c["when"] for c in _read_record(path)["collections"] for item in c["removed"]}


# -------------------------------------------------------------------------------- entry points
def after_iteration(run: RunDir, iteration: int) -> int:
    """The driver, once iteration K is marked done (its model just verified): remove the categories of
    ``store.gc_after_iteration`` for that iteration. Returns the bytes freed."""
    categories = list(run.config.store.gc_after_iteration)
    if not categories:
        return 0
    p = plan(run, categories, iterations=[iteration], verified_models=[iteration])
    done = remove(run, p, categories, "driver (store.gc_after_iteration)")
    if done.removals:
        log.info("iter %d: gc (store.gc_after_iteration: %s) removed %d path(s), %s freed", iteration,
                 ", ".join(categories), len(done.removals), human_bytes(done.bytes))
    return done.bytes


def collect(run: RunDir, categories: tuple[str, ...]) -> Plan:
    """`silmm gc --yes`: under the run's driver lock when it is free; while a driver holds it, only the
    categories in SAFE_WHILE_DRIVER_RUNS (GcRefused otherwise). Returns what was removed."""
    from silmm.driver import DriverError, driver_lock

    try:
        with driver_lock(run):
            return remove(run, plan(run, categories), categories, "silmm gc")
    except DriverError as exc:
        unsafe = [c for c in categories if c not in SAFE_WHILE_DRIVER_RUNS]
        if unsafe:
            raise GcRefused(f"{exc}\nwhile a driver runs, gc removes only {', '.join(SAFE_WHILE_DRIVER_RUNS)}: "
                            f"{', '.join(unsafe)} belong to the tasks it manages; add --keep {','.join(unsafe)}, "
                            "or run gc after the driver stops") from None
        log.info("a driver holds %s: removing %s only", run.path / "driver.lock", ", ".join(categories))
        return remove(run, plan(run, categories), categories, "silmm gc (driver running)")


def describe(run: RunDir, p: Plan, categories: tuple[str, ...], dry_run: bool) -> str:
    """The listing `silmm gc` prints: per iteration and category, each path with its size; then the totals
    per category and what was kept, and why."""
    head = "would remove (dry run; --yes removes)" if dry_run else "removed"
    lines = [f"silmm gc {run.path}: categories {', '.join(categories) or 'none'}; {head}:"]
    current: object = ()
    for r in p.removals:
        if r.iteration != current:
            current = r.iteration
            lines.append(f"iter_{r.iteration:02d}" if r.iteration is not None else "run")
        lines.append(f"  {r.category:11s} {human_bytes(r.bytes):>10s}  {r.path.relative_to(run.path)}"
                     f"{'/' if r.folder else ''}")
    per = {c: sum(r.bytes for r in p.removals if r.category == c) for c in categories}
    lines.append(f"total: {len(p.removals)} path(s), {human_bytes(p.bytes)} ({p.bytes} bytes)"
                 + (" -- " + ", ".join(f"{c} {human_bytes(n)}" for c, n in per.items()) if p.removals else ""))
    lines += [f"kept: {k}" for k in p.kept]
    return "\n".join(lines)
