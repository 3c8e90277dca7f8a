"""A run directory: the frozen config, its hash, and where every stage's output lives.

    <root>/<name>/config.yaml               resolved config, frozen at creation
    <root>/<name>/state.json                config hash, creation time, what the driver finished
    <root>/<name>/iter_01/<stage>/shard_00000.h5
    <root>/<name>/iter_01/pairs.h5
    <root>/<name>/iter_01/train/  iter_01/model/
    <root>/<name>/logs/

Re-opening a run with a config that differs in a key that can change results is refused, with the
differing keys listed; keys that cannot (executor resources, logging, file locking) may change.
`silmm run` opens a run in two steps, so that a driver refused by the run's lock changes nothing:
:meth:`RunDir.prepare` (checks, writes nothing but a new run's empty directory), then the driver lock,
then :meth:`RunDir.create_or_open` (writes or rewrites config.yaml).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silmm import __version__
from silmm import config as C
from silmm.fsutil import atomic_write_text

log = logging.getLogger(__name__)

SHARD_STAGES = ("prompts", "questions", "samples", "scores")  # sharded stages, in driver order
# written last into iter_K/model/ by the train job: JSON listing every file of the model (bytes, sha256)
MODEL_DONE = "DONE"


@dataclass
class RunDir:
    path: Path
    config: C.SilmmConfig
    config_hash: str

    # ---------------------------------------------------------------------------- opening
    @classmethod
    def location(cls, cfg: C.SilmmConfig) -> Path:
        return Path(cfg.run.root) / cfg.run.name

    @classmethod
    def prepare(cls, cfg: C.SilmmConfig) -> RunDir:
        """The run `cfg` names, before its config is written: an existing run, opened and checked against
        `cfg` (a key that would change its results is refused; nothing is rewritten), or a new run's empty
        directory, where the driver lock lives. Take the lock on it, then call :meth:`create_or_open`."""
        path = cls.location(cfg)
        if (path / "config.yaml").is_file():
            run = cls.open(path)
            run.check_reopen(cfg)
            return run
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, cfg, C.config_hash(cfg))

    @classmethod
    def create_or_open(cls, cfg: C.SilmmConfig) -> RunDir:
        """Create the run `cfg` names (config.yaml, state.json) or re-open it, writing the keys that may
        change (:meth:`check_reopen`). A driver should hold the run's lock: this writes."""
        run = cls.prepare(cfg)
        if (run.path / "config.yaml").is_file():
            run._accept(cfg)
            return run
        path, digest = run.path, run.config_hash
        atomic_write_text(path / "config.yaml", C.to_yaml(cfg))
        state = {"config_hash": digest, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "silmm_version": __version__, "done": {}}
        atomic_write_text(path / "state.json", json.dumps(state, indent=2) + "\n")
        log.info("created run %s (config %s)", path, digest)
        return cls(path, cfg, digest)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path)
        cfg_file = path / "config.yaml"
        if not cfg_file.is_file():
            raise C.ConfigError(f"{path}: not a run directory (no config.yaml)")
        cfg = C.from_yaml_text(cfg_file.read_text(encoding="utf-8"), str(cfg_file))
        digest = C.config_hash(cfg)
        recorded = json.loads((path / "state.json").read_text()).get("config_hash")
        if recorded != digest:
            raise C.ConfigError(f"{cfg_file}: edited by hand? its hash {digest} differs from the one recorded "
                                f"at creation ({recorded}) in {path / 'state.json'}")
        return cls(path, cfg, digest)

    def check_reopen(self, new: C.SilmmConfig) -> dict[str, tuple[Any, Any]]:
        """The keys in which `new` differs from the run's config; ConfigError when one of them could change
        the run's results. Writes nothing (but gives `new` the run's own relative paths, see keep_run_paths)."""
        C.keep_run_paths(self.config, new)
        diffs = C.differing_keys(self.config, new)
        fixed = {k: v for k, v in diffs.items() if not C.is_mutable_key(k)}
        if fixed:
            lines = "\n".join(f"  {k}: {old!r} (run) -> {val!r} (given)" for k, (old, val) in fixed.items())
            if any(k.startswith("prompts.files_sha256") for k in fixed):
                lines += "\n(prompts.files_sha256: the prompt files were edited since the run was created)"
            raise C.ConfigError(
                f"{self.path / 'config.yaml'}: the run exists with a different config; these keys would "
                f"change its results:\n{lines}\nUse another run.name, or the run's own config.")
        return diffs

    def _accept(self, new: C.SilmmConfig) -> None:
        """Re-open with `new`: checked (:meth:`check_reopen`), then its changed keys written to config.yaml."""
        diffs = self.check_reopen(new)
        if diffs:
            log.info("run %s: updating keys that do not change results: %s", self.path, ", ".join(diffs))
            atomic_write_text(self.path / "config.yaml", C.to_yaml(new))
            self.config = new

    # ---------------------------------------------------------------------------- layout
    def iter_dir(self, iteration: int) -> Path:
        return self.path / f"iter_{iteration:02d}"

    def stage_dir(self, iteration: int, stage: str) -> Path:
        return self.iter_dir(iteration) / stage

    def shard_path(self, iteration: int, stage: str, index: int) -> Path:
        return self.stage_dir(iteration, stage) / f"shard_{index:05d}.h5"

    def pairs_path(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "pairs.h5"

    def train_dir(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "train"

    def model_dir(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "model"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def num_shards(self, iteration: int) -> int | None:
        """Shards of each sharded stage: from the config for generated prompts; with prompt files the
        files decide, as recorded by the first prompts shard (None until it exists)."""
        from silmm.config import PromptSource
        from silmm.store import ShardError, read_shard

        if self.config.prompts.source is not PromptSource.files:
            return self.config.num_shards
        try:
            first = read_shard(self.shard_path(iteration, "prompts", 0), "prompts", self.config_hash, iteration,
                               columns=())
        except ShardError:
            return None
        return first.meta.shard_count

    def iterations_on_disk(self) -> list[int]:
        out = []
        for p in self.path.glob("iter_*"):
            suffix = p.name.removeprefix("iter_")
            if p.is_dir() and suffix.isdigit():
                out.append(int(suffix))
        return sorted(out)

    # ---------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "state.json").read_text())

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.path / "state.json", json.dumps(state, indent=2) + "\n")
