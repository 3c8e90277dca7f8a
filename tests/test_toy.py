"""The toy world loop: pretraining (resumable, cached), toy prompts, config checks, and a smoke run of
configs/toy_smoke.yaml through the driver (every stage's shards valid, evaluations and report written; the
eval stage's toy benchmark agrees exactly with the toy evaluation)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

import jobs.pretrain
import jobs.prompts
from silmm import config as C
from silmm.driver import run_driver
from silmm.eval.results import read_results, results_path
from silmm.images import from_png
from silmm.rundir import SHARD_STAGES, RunDir
from silmm.store import read_shard
from silmm.toy import world
from tests.helpers import check_toy_evaluations

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "toy_smoke.yaml"
TINY_PRETRAIN = ["toy.pretrain.steps=6", "toy.pretrain.batch_size=4", "toy.pretrain.hidden=16",
                 "toy.pretrain.layers=1", "toy.pretrain.heads=2", "toy.pretrain.checkpoint_every=3",
                 "toy.pretrain.warmup_steps=2"]


def toy_config(root: Path, name: str, model: Path, *overrides: str) -> C.SilmmConfig:
    return C.load(SMOKE, [f"run.root={root}", f"run.name={name}", f"model.path={model}", "logging.progress=false",
                          *overrides])


# ------------------------------------------------------------------------------------------ pretraining
def test_pretraining_resumed_equals_uninterrupted(tmp_path):
    whole = RunDir.create_or_open(toy_config(tmp_path, "a", tmp_path / "lmm_a", *TINY_PRETRAIN))
    jobs.pretrain.run(whole, 0, 0)
    split = RunDir.create_or_open(toy_config(tmp_path, "b", tmp_path / "lmm_b", *TINY_PRETRAIN))
    assert jobs.pretrain.run(split, 0, 0, stop_after=4) == {"stopped_at": 4}
    assert not (tmp_path / "lmm_b").exists() and (tmp_path / "lmm_b.partial" / "state.json").is_file()
    jobs.pretrain.run(split, 0, 0)  # a new process would do the same: resume from lmm_b.partial

    a, b = load_file(str(tmp_path / "lmm_a" / "model.safetensors")), load_file(str(tmp_path / "lmm_b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not (tmp_path / "lmm_b.partial").exists()  # progress is removed once the model is in place
    record = json.loads((tmp_path / "lmm_b" / "pretrain.json").read_text())
    assert record["key"]["pretrain"]["steps"] == 6
    for name in ("config.json", "tokenizer.json", "fusion_config.json", "image_codec/codec.json"):
        assert (tmp_path / "lmm_b" / name).is_file(), name


def test_cached_model_from_other_settings_is_refused_before_anything_is_written(tmp_path):
    run = RunDir.create_or_open(toy_config(tmp_path, "a", tmp_path / "lmm", *TINY_PRETRAIN))
    jobs.pretrain.run(run, 0, 0)
    args = [sys.executable, "-m", "silmm", "run", str(SMOKE), f"run.root={tmp_path}", "run.name=other",
            f"model.path={tmp_path / 'lmm'}", *TINY_PRETRAIN[1:], "toy.pretrain.steps=7"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pretrain.json" in proc.stderr and "pretrain" in proc.stderr
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("overrides", "key"), [
    (["model.backend=janus", "sampling.guidance_scale=5"], "model.backend"),
    (["toy.enabled=false", "model.build_tiny_if_missing=true"], "prompts.source"),
    (["prompts.categories.shape=1"], "prompts.categories"),
    (["toy.held_out_fraction=1.5"], "toy.held_out_fraction"),
    (["toy.pretrain.caption_noise=1.0"], "toy.pretrain.caption_noise"),
    (["sampling.guidance_scale=0.5"], "sampling.guidance_scale"),
])
def test_toy_config_errors_name_the_key(tmp_path, overrides, key):
    with pytest.raises(C.ConfigError, match=f"key '{key}'"):
        toy_config(tmp_path, "x", tmp_path / "lmm", *overrides)


# ------------------------------------------------------------------------------------------- prompts
def test_toy_prompts_are_unique_in_grammar_and_never_held_out(tmp_path):
    cfg = toy_config(tmp_path, "p", tmp_path / "lmm", "prompts.count=300", "sharding.prompts_per_shard=100")
    run = RunDir.create_or_open(cfg)
    texts, cats = [], []
    for shard in range(3):
        jobs.prompts.run(run, 1, shard)
        data = read_shard(run.shard_path(1, "prompts", shard), "prompts", run.config_hash, 1)
        texts += list(data["text"])
        cats += list(data["category"])
    assert len(set(t.lower() for t in texts)) == 300
    assert Counter(cats) == {"color": 100, "numeracy": 100, "spatial": 100}
    for text, cat in zip(texts, cats, strict=True):
        assert world.parse_prompt(text).category == cat
        assert not world.is_held_out(text, cfg.toy.held_out_fraction)


# ------------------------------------------------------------------------------------------ smoke run
def test_toy_smoke_run_writes_valid_shards_evaluations_and_report(tmp_path):
    """configs/toy_smoke.yaml end to end, as `silmm run` drives it (local executor, 2 tasks at once)."""
    cfg = toy_config(tmp_path, "toy_smoke", tmp_path / "lmm")
    run = RunDir.create_or_open(cfg)
    run_driver(run)

    assert json.loads((tmp_path / "lmm" / "pretrain.json").read_text())["key"]["pretrain"]["steps"] == 20
    for stage in SHARD_STAGES:
        for shard in range(run.num_shards(1)):
            read_shard(run.shard_path(1, stage, shard), stage, run.config_hash, 1, verify_checksums=True)
    samples = read_shard(run.shard_path(1, "samples", 0), "samples", run.config_hash, 1)
    for png in samples["image_png"][:4]:
        objects = world.parse(from_png(png))  # the codec decodes to exact toy-world cells
        assert all(o.shape != world.UNKNOWN for o in objects)
    read_shard(run.pairs_path(1), "pairs", run.config_hash, 1, verify_checksums=True)
    assert (run.model_dir(1) / "DONE").is_file()

    check_toy_evaluations(run)

    for iteration in (0, 1):  # the eval stage's toy benchmark (oracle) agrees exactly with the toy evaluation
        res = read_results(results_path(run.path, "toy", iteration))
        ev = json.loads((run.path / "eval" / f"iter_{iteration:02d}.json").read_text())
        assert (res.overall, res.per_category, res.tables["strict"]["overall"], res.tables["partial"]["overall"]) \
            == (ev["overall"], ev["per_category"], ev["strict"], ev["partial"])

    report = (run.path / "report" / "report.md").read_text()
    assert "eval/toy/iter_KK/results.json" in report
    rows = [line for line in report.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2
    for name in ("alignment.png", "score_distributions.png", "grid.png"):
        with Image.open(run.path / "report" / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert (run.path / "state.json").is_file() and "iter_01" in run.state()["done"]
