import subprocess
import sys
from pathlib import Path

import pytest

from silmm import config as C


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    return d


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def base_yaml(ckpt: Path, backend: str = "janus", extra: str = "") -> str:
    return f"model:\n  backend: {backend}\n  path: {ckpt}\n{extra}"


def test_paper_defaults_per_family(tmp_path, ckpt):
    d = C.load(write(tmp_path, base_yaml(ckpt, "janus")))
    assert (d.sampling.samples_per_prompt, d.pairs.top_k, d.pairs.bottom_k) == (10, 1, 1)
    assert (d.train.loss, d.train.lr, d.train.warmup_steps, d.train.max_steps) == (C.Loss.dpo, 5e-5, 100, 1000)
    c = C.load(write(tmp_path, base_yaml(ckpt, "dream"), "c.yaml"))
    assert (c.sampling.samples_per_prompt, c.pairs.top_k, c.pairs.bottom_k) == (30, 10, 10)
    assert (c.train.loss, c.train.lr, c.train.warmup_steps, c.train.max_steps) == (C.Loss.kcdpo, 8e-6, 200, 2000)
    for cfg in (d, c):
        assert (cfg.train.beta, cfg.train.gamma) == (0.2, 3.0)
        assert (cfg.train.lora.r, cfg.train.lora.alpha) == (32, 32)
        assert (cfg.train.batch_size, cfg.train.grad_accum) == (32, 4)
        assert cfg.prompts.count == 16000


def test_overrides_win_over_file_and_explicit_values_are_kept(tmp_path, ckpt):
    path = write(tmp_path, base_yaml(ckpt, extra="train:\n  lr: 1.0e-4\nsampling:\n  samples_per_prompt: 6\n"))
    cfg = C.load(path, ["train.lr=1e-5", "run.seed=7"])
    assert cfg.train.lr == 1e-5 and cfg.run.seed == 7
    assert cfg.sampling.samples_per_prompt == 6  # not replaced by the family default


@pytest.mark.parametrize(
    "yaml_extra, override, key, phrase",
    [
        ("train:\n  lrr: 0.1\n", None, "train.lrr", "not in"),  # unknown key in the file
        ("", "sampling.topp=0.5", "sampling.topp", "not in"),  # unknown key on the command line
        ("train:\n  lr: fast\n", None, "train.lr", "could not be converted"),  # wrong type
        ("", "train.max_steps=1.5", "train.max_steps", "could not be converted"),
        ("feedback:\n  method: vibes\n", None, "feedback.method", "expected one of"),  # bad enum
        ("", "train.loss=kcdpo", "train.loss", "does not fit the discrete backend"),  # incompatible
        ("sampling:\n  top_p: 1.5\n", None, "sampling.top_p", "(0, 1]"),
        ("pairs:\n  rejected_ranks: [5, 20]\n", None, "pairs.rejected_ranks", "samples_per_prompt"),
        ("executor:\n  stages:\n    sampling: {}\n", None, "executor.stages.sampling", "unknown stage"),
        # label smoothing belongs to cdpo / rdpo only; they need a flip rate in (0, 0.5)
        ("train:\n  label_smoothing: 0.1\n", None, "train.label_smoothing", "only used by train.loss=cdpo"),
        ("train:\n  loss: cdpo\n", None, "train.label_smoothing", "needs a label-flip rate in (0, 0.5)"),
        ("train:\n  loss: rdpo\n", "train.label_smoothing=0.5", "train.label_smoothing", "(0, 0.5)"),
        ("", "train.ipo_normalization=tokens", "train.ipo_normalization", "expected one of"),
        ("", "train.heldout_fraction=0.7", "train.heldout_fraction", "[0, 0.5)"),
        ("", "train.eval_every=0", "train.eval_every", "must be > 0"),
        ("", "train.prefetch=-1", "train.prefetch", "0 = off"),
        ("", "feedback.judge_path=/does/not/exist", "feedback.judge_path", "does not exist"),
    ],
)
def test_errors_name_the_key_and_the_source(tmp_path, ckpt, yaml_extra, override, key, phrase):
    path = write(tmp_path, base_yaml(ckpt, extra=yaml_extra))
    with pytest.raises(C.ConfigError) as err:
        C.load(path, [override] if override else [])
    msg = str(err.value)
    assert f"'{key}'" in msg and phrase in msg
    assert (f"command-line override '{override}'" in msg) if override else msg.startswith(str(path))


def test_continuous_backend_with_discrete_loss_is_refused(tmp_path, ckpt):
    with pytest.raises(C.ConfigError, match="'train.loss'.*'dpo' does not fit the continuous backend 'dream'"):
        C.load(write(tmp_path, base_yaml(ckpt, "dream", "train:\n  loss: dpo\n")))


def test_missing_model_path(tmp_path, ckpt):
    with pytest.raises(C.ConfigError, match="'model.path': is required"):
        C.load(write(tmp_path, "run:\n  name: x\n"))
    with pytest.raises(C.ConfigError, match=f"'model.path': checkpoint directory {tmp_path}/nope does not exist"):
        C.load(write(tmp_path, f"model:\n  path: {tmp_path}/nope\n"))
    # tiny configs may name a checkpoint that the driver builds on first use
    cfg = C.load(write(tmp_path, f"model:\n  path: {tmp_path}/nope\n  build_tiny_if_missing: true\n"))
    assert cfg.model.path == f"{tmp_path}/nope"


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load(tmp_path / "absent.yaml")
    with pytest.raises(C.ConfigError, match="top level must be a mapping"):
        C.load(write(tmp_path, "- a\n- b\n"))


def test_hash_ignores_keys_that_cannot_change_results(tmp_path, ckpt):
    path = write(tmp_path, base_yaml(ckpt))
    h = C.config_hash(C.load(path))
    assert C.config_hash(C.load(path, ["executor.default.mem_gb=99", "logging.progress=false",
                                       "store.file_locking=false", "executor.kind=slurm",
                                       "run.iterations=3", "run.name=other"])) == h
    assert C.config_hash(C.load(path, ["train.lr=1e-6"])) != h
    assert C.config_hash(C.load(path, ["sampling.batch_size=3"])) != h


def test_stage_resources_merge_default_and_override(tmp_path, ckpt):
    cfg = C.load(write(tmp_path, base_yaml(ckpt, extra=(
        "executor:\n  default:\n    partition: gpu\n    mem_gb: 8\n"
        "  stages:\n    train:\n      mem_gb: 64\n      tasks_per_node: 2\n"))))
    train, samples = cfg.resources("train"), cfg.resources("samples")
    assert (train.partition, train.mem_gb, train.tasks_per_node) == ("gpu", 64, 2)
    assert (samples.partition, samples.mem_gb, samples.tasks_per_node) == ("gpu", 8, 1)


def test_shipped_configs_load(tmp_path):
    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert "tiny_discrete.yaml" in names and "tiny_dream.yaml" in names
    for p in root.glob("*.yaml"):
        C.validate(C.resolve(_load_unchecked(p)),
                   str(p), check_paths=False)


def _load_unchecked(path: Path) -> C.SilmmConfig:
    """Load a shipped config without requiring its checkpoint on this machine."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(C.SilmmConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def test_cli_exit_status_2_and_nothing_written(tmp_path, ckpt):
    root = tmp_path / "runs"
    path = write(tmp_path, base_yaml(ckpt, extra=f"run:\n  root: {root}\n"))
    proc = subprocess.run([sys.executable, "-m", "silmm", "run", str(path), "train.loss=kcdpo"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.loss" in proc.stderr and "command-line override 'train.loss=kcdpo'" in proc.stderr
    assert not root.exists()
    proc = subprocess.run([sys.executable, "-m", "silmm", "config", "show", str(path), "train.lr=1e-5"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 1.0e-05" in proc.stdout and proc.stdout.startswith("# config hash ")


def test_stage_override_with_bad_key_is_refused(tmp_path, ckpt):
    path = write(tmp_path, base_yaml(ckpt, extra="executor:\n  stages:\n    train:\n      gpus: 4\n"))
    with pytest.raises(C.ConfigError, match="'executor.stages.train.gpus'"):
        C.load(path)
