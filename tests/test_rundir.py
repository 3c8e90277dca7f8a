import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from silmm import config as C
from silmm import store as S
from silmm.inspection import describe_run, stage_status, verify_run
from silmm.rundir import RunDir


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    p = tmp_path / "cfg.yaml"
    p.write_text(f"run:\n  name: r1\n  root: {tmp_path / 'runs'}\nmodel:\n  path: {ckpt}\n"
                 "prompts:\n  count: 20\nsharding:\n  prompts_per_shard: 8\n")
    return p


def test_create_freezes_config_and_hash(cfg_file):
    cfg = C.load(cfg_file)
    run = RunDir.create_or_open(cfg)
    assert run.path == Path(cfg.run.root) / "r1"
    frozen = C.from_yaml_text((run.path / "config.yaml").read_text(), "frozen")
    assert frozen == cfg
    assert json.loads((run.path / "state.json").read_text())["config_hash"] == C.config_hash(cfg) == run.config_hash
    assert RunDir.open(run.path).config == cfg


def test_reopen_refuses_result_changes_and_lists_keys(cfg_file):
    RunDir.create_or_open(C.load(cfg_file))
    with pytest.raises(C.ConfigError) as err:
        RunDir.create_or_open(C.load(cfg_file, ["train.lr=1e-3", "run.seed=5"]))
    msg = str(err.value)
    assert "train.lr: 5e-05 (run) -> 0.001 (given)" in msg and "run.seed: 0 (run) -> 5 (given)" in msg
    assert "config.yaml" in msg


def test_reopen_accepts_resource_and_logging_changes(cfg_file):
    first = RunDir.create_or_open(C.load(cfg_file))
    again = RunDir.create_or_open(C.load(cfg_file, ["executor.default.mem_gb=32", "logging.progress=false"]))
    assert again.config_hash == first.config_hash
    assert RunDir.open(first.path).config.executor.default.mem_gb == 32  # the new resources are kept


def test_hand_edited_frozen_config_is_detected(cfg_file):
    run = RunDir.create_or_open(C.load(cfg_file))
    text = (run.path / "config.yaml").read_text().replace("seed: 0", "seed: 9")
    (run.path / "config.yaml").write_text(text)
    with pytest.raises(C.ConfigError, match="edited by hand"):
        RunDir.open(run.path)


def make_prompts_shard(run: RunDir, index: int, config_hash: str | None = None) -> Path:
    ids = np.arange(index * 8, index * 8 + 8)
    meta = S.ShardMeta("prompts", 1, index, run.config.num_shards, config_hash or run.config_hash)
    return S.write_shard(run.shard_path(1, "prompts", index), meta,
                         {"prompt_id": ids, "text": [f"a red cube {i}" for i in ids], "category": ["color"] * 8})


def test_status_inspect_and_verify(cfg_file):
    run = RunDir.create_or_open(C.load(cfg_file))
    assert run.config.num_shards == 3
    make_prompts_shard(run, 0)
    foreign = make_prompts_shard(run, 1, config_hash="0000")
    (run.stage_dir(1, "prompts") / "shard_00002.h5.progress").mkdir()
    s = stage_status(run, 1, "prompts")
    assert [p.name for p in s.done] == ["shard_00000.h5"] and s.rows == {"prompts": 8}
    assert [p.name for p in s.in_progress] == ["shard_00002.h5.progress"]
    assert [p for p, _ in s.bad] == [foreign] and s.missing == 1
    text = describe_run(run)
    assert "prompts    1/3 done, 1 in progress, 1 BAD, 1 missing" in text
    problems = dict(verify_run(run))  # every problem in one pass
    progress = run.stage_dir(1, "prompts") / "shard_00002.h5.progress"
    assert set(problems) == {foreign, run.shard_path(1, "prompts", 2), progress}
    assert problems[foreign].startswith("bad: ") and "config hash 0000 differs" in problems[foreign]
    assert problems[run.shard_path(1, "prompts", 2)] == "missing"
    assert problems[progress] == "progress: of an unfinished task"

    proc = subprocess.run([sys.executable, "-m", "silmm", "verify", str(run.path)], capture_output=True, text=True)
    assert proc.returncode == 1 and str(foreign) in proc.stdout and "3 problem(s)" in proc.stdout
    foreign.unlink()
    progress.rmdir()
    make_prompts_shard(run, 1)
    make_prompts_shard(run, 2)
    proc = subprocess.run([sys.executable, "-m", "silmm", "verify", str(run.path)], capture_output=True, text=True)
    assert proc.returncode == 0 and "all shards, pairs and models valid" in proc.stdout
    shard = run.shard_path(1, "prompts", 0)
    proc = subprocess.run([sys.executable, "-m", "silmm", "inspect", str(shard)], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "stage prompts · iteration 1 · shard 0 of 3" in proc.stdout
    assert "rows: prompts=8" in proc.stdout and "text" in proc.stdout and "prompt_id" in proc.stdout


def test_make_tiny_cli_builds_a_loadable_deterministic_checkpoint(tmp_path):
    import hashlib

    digests = []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, "-m", "silmm", "make-tiny", "janus", str(tmp_path / name)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    cfg = C.load(None, [f"model.path={tmp_path / 'a'}"])
    from silmm.backends.janus import JanusBackend

    backend = JanusBackend.load(cfg.model, cfg.sampling)
    assert backend.sample(["a red cube"], [1]).shape[1] == backend.num_image_tokens
