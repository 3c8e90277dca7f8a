"""Issue #14, loading: nothing pickled is unpickled by accident.

- every backend's load refuses a checkpoint whose weights are a pickle (``pytorch_model.bin``), naming it;
- a training resume loads only checkpoints this run wrote (manifest: config hash, sha256 of every file),
  checked before anything is unpickled, and DeepSpeed then unpickles weights-only;
- a DeepSpeed extension build left half-done (its ``lock`` file) does not make a training job wait.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from silmm import distributed as D
from silmm import trainer as T
from silmm.backends.base import CheckpointError
from silmm.config import ModelConfig, SamplingConfig, TrainConfig
from silmm.models import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
HASH = "0123456789abcdef"
PICKLED = {"model.safetensors": "pytorch_model.bin",
           "diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.bin"}  # what transformers/diffusers saved


class _Trap:
    """Unpickling it creates ``marker`` (stands for any code a pickle can run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _load(backend: str, path: Path):
    import importlib

    module, cls_name, _, _ = BACKENDS[backend]
    cls = getattr(importlib.import_module(module), cls_name)
    return cls.load(ModelConfig(path=str(path)), SamplingConfig())


# ------------------------------------------------------------------------------- pickled model weights
@pytest.mark.parametrize("backend, sub, weights", [
    ("janus", ".", "model.safetensors"),
    ("emu3", ".", "model.safetensors"),
    ("fusion", ".", "model.safetensors"),
    ("dream", "lmm", "model.safetensors"),
    ("dream", "decoder/unet", "diffusion_pytorch_model.safetensors"),
    ("dream", "decoder/vae", "diffusion_pytorch_model.safetensors"),
])
def test_pickled_weights_are_refused_not_unpickled(tiny_checkpoints, tmp_path, backend, sub, weights):
    ckpt = shutil.copytree(tiny_checkpoints(backend), tmp_path / backend)
    folder = ckpt / sub
    (folder / weights).unlink()
    pickled = folder / PICKLED[weights]
    marker = tmp_path / "unpickled"
    torch.save({"weight": _Trap(marker)}, pickled)
    with pytest.raises(CheckpointError, match=rf"{folder}: no weights .*only safetensors.*found {pickled.name}"):
        _load(backend, ckpt)
    assert not marker.exists()


def test_config_pointing_transformers_at_a_pickle_is_refused(tiny_checkpoints, tmp_path):
    import json

    ckpt = shutil.copytree(tiny_checkpoints("janus"), tmp_path / "janus")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "transformers_weights": "pytorch_model.bin"}))
    with pytest.raises(CheckpointError, match=r"config.json: transformers_weights='pytorch_model.bin'"):
        _load("janus", ckpt)


def test_pickled_lora_adapter_is_refused(tiny_checkpoints, tmp_path):
    backend = _load("janus", tiny_checkpoints("janus"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    marker = tmp_path / "unpickled"
    torch.save({"weight": _Trap(marker)}, adapter / "adapter_model.bin")
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"{adapter}: no weights \(adapter_model.safetensors;.*"
                                              r"found adapter_model.bin"):
        backend.load_adapter(adapter)
    assert not marker.exists()


# ----------------------------------------------------------------------------- DeepSpeed checkpoints
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x).square().mean()


def _engine(zero_stage: int, dtype: torch.dtype):
    import deepspeed

    D.init(torch.device("cpu"))
    torch.manual_seed(0)
    net = _Net().to(dtype)
    t = dataclasses.replace(TrainConfig(), batch_size=1, grad_accum=1, zero_stage=zero_stage, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()),
                                      config=T.deepspeed_config(t, 1, dtype))
    return engine


def _trained_checkpoint(root: Path, zero_stage: int = 2, dtype: torch.dtype = torch.float32):
    engine = _engine(zero_stage, dtype)
    loss = engine(torch.ones(2, 4, dtype=dtype))
    engine.backward(loss)
    engine.step()
    ckpts = T.Checkpoints(root, is_main=True, config_hash=HASH)
    ckpts.save(engine, {"step": 1, "world_size": 1})
    return ckpts, [p.detach().float().clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("zero_stage, dtype", [(0, torch.float32), (1, torch.float32), (2, torch.float32),
                                               (3, torch.float32), (2, torch.bfloat16)])
def test_deepspeed_checkpoint_resumes_weights_only(tmp_path, zero_stage, dtype):
    ckpts, trained = _trained_checkpoint(tmp_path, zero_stage, dtype)
    assert (tmp_path / "step_00000001" / T.MANIFEST).is_file()
    fresh = _engine(zero_stage, dtype)
    assert ckpts.resume(fresh, {"step": 1, "world_size": 1})["step"] == 1
    if zero_stage != 3:  # ZeRO-3 keeps the module's parameters partitioned (empty) outside a gather
        for a, b in zip(trained, fresh.module.parameters(), strict=True):
            assert torch.equal(a, b.detach().float())


def test_resume_unpickles_deepspeeds_files_weights_only(tmp_path, monkeypatch):
    ckpts, _ = _trained_checkpoint(tmp_path)
    monkeypatch.setattr(T, "deepspeed_safe_globals", lambda: [])  # DeepSpeed's own classes not allowed
    with pytest.raises(T.TrainingError, match=r"step_00000001: holds an object outside the weights-only allowlist"):
        ckpts.resume(_engine(2, torch.float32), {"step": 1, "world_size": 1})


def test_weights_only_loads_overrides_deepspeeds_own_weights_only_false(tmp_path):
    trap, marker = tmp_path / "trap.pt", tmp_path / "unpickled"
    torch.save({"optimizer": _Trap(marker)}, trap)
    with T.weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(trap, weights_only=False)  # what DeepSpeed's checkpoint engine passes
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_resume_refuses_a_changed_or_foreign_checkpoint_before_unpickling(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    ckpts, _ = _trained_checkpoint(root)
    folder = root / "step_00000001"
    files = sorted(p for p in folder.glob("*.pt"))
    assert files

    class NoLoad:  # verify must refuse before DeepSpeed reads anything
        def load_checkpoint(self, *args, **kwargs):
            raise AssertionError("loaded")

    expected = {"step": 1, "world_size": 1}
    # a byte appended to a file
    original = files[0].read_bytes()
    files[0].write_bytes(original + b"\0")
    with pytest.raises(T.TrainingError, match=rf"{files[0]}: .* bytes, .* were written"):
        ckpts.verify("step_00000001")
    # the same size, other content
    files[0].write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(T.TrainingError, match=rf"{files[0]}: content differs .*sha256"):
        ckpts.verify("step_00000001")
    files[0].write_bytes(original)
    # a file added beside them
    (folder / "extra_optim_states.pt").write_bytes(b"x")
    with pytest.raises(T.TrainingError, match=rf"{folder / 'extra_optim_states.pt'}: not written by this run"):
        ckpts.verify("step_00000001")
    (folder / "extra_optim_states.pt").unlink()
    # the checkpoint of another run, copied here
    other = T.Checkpoints(root, is_main=True, config_hash="fedcba9876543210")
    with pytest.raises(T.TrainingError, match=rf"{folder / T.MANIFEST}: written by another run \(config hash "
                                              rf"{HASH}, this run's fedcba9876543210\)"):
        other.verify("step_00000001")
    # no manifest: not written to the end by this run
    manifest = (folder / T.MANIFEST).read_bytes()
    (folder / T.MANIFEST).unlink()
    with pytest.raises(T.TrainingError, match=rf"{folder / T.MANIFEST}: missing or unreadable"):
        ckpts.verify("step_00000001")
    (folder / T.MANIFEST).write_bytes(manifest)
    assert ckpts.resume(_engine(2, torch.float32), expected)["step"] == 1  # restored: loads again
    # a resume that finds a damaged checkpoint moves it aside, loads nothing and starts over
    files[0].write_bytes(original + b"\0")
    with caplog.at_level("WARNING"):
        assert ckpts.resume(NoLoad(), expected) is None
    assert not root.exists() and len(list(tmp_path.glob("checkpoints.bad-*"))) == 1
    assert any(str(files[0]) in r.getMessage() and "moved" in r.getMessage() for r in caplog.records)




# --------------------------------------------------------------------------- extension build lock
def test_a_killed_extension_build_does_not_make_training_wait(tmp_path):
    # What a build killed midway leaves: torch's FileBaton `lock` in the op's build directory, which
    # every later build waits on without a time-out.
    lock = tmp_path / "ext" / D.SHM_OP / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(lock.parent.parent))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    code = "import torch; from silmm import distributed as D; print(D.init(torch.device('cpu')).world_size)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "1", proc.stderr[-2000:]
    assert sorted(p.name for p in lock.parent.iterdir()) == ["lock"]  # nothing built, nothing waited on
