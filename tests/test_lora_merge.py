"""LoRA merging (silmm.backends.lora): float32 merge from master values, written in the checkpoint's dtype.

The merged model is the next iteration's policy and reference, so its outputs must be those of the base
model with the adapter applied unmerged, within what its storage precision can hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from silmm.backends.common import apply_lora
from silmm.backends.fusion import FusionBackend
from silmm.backends.lora import lora_delta, merged_state_dict, stored_dtype
from silmm.config import Dtype, LoraConfig, ModelConfig, SamplingConfig

PROMPTS = ["a red circle", "two blue squares"]
LORA = LoraConfig(r=4, alpha=8, dropout=0.0,
                  target_regex=r".*model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")


class TwoLayers(nn.Module):
    def __init__(self, n: int = 64):
        super().__init__()
        self.first = nn.Linear(n, n, bias=False)
        self.second = nn.Linear(n, n)


def _perturb(model: nn.Module, scale: float) -> None:
    """Give every LoRA B a value (peft starts it at zero), as training would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)


def test_merge_is_one_float32_sum_then_one_cast():
    torch.manual_seed(0)
    model = TwoLayers().to(torch.bfloat16)
    peft = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_regex=r"first"))
    _perturb(peft, 1e-3)
    layer = peft.base_model.model.first
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    masters = {id(a): a.detach().float() + 1e-4, id(b): b.detach().float() - 1e-4}  # differ from the bf16 copies

    def master(p):
        return masters.get(id(p), p.detach().float())

    state = merged_state_dict(peft.base_model.model, torch.bfloat16, master)
    assert set(state) == {"first.weight", "second.weight", "second.bias"}  # original names, no LoRA tensors
    w = model.first.base_layer.weight.detach().float()
    expected = (w + (masters[id(b)] @ masters[id(a)]) * (8 / 4)).to(torch.bfloat16)  # one rounding, at the end
    assert torch.equal(state["first.weight"], expected)
    assert torch.equal(state["second.weight"], model.second.weight)  # untouched weights are copied exactly
    assert torch.equal(lora_delta(layer, master), (masters[id(b)] @ masters[id(a)]) * 2.0)
    assert len(list(peft.parameters())) == 5  # nothing merged into the live model
    assert torch.equal(model.first.base_layer.weight.float(), w)


def test_stored_dtype_reads_headers(tmp_path):
    model = TwoLayers(8)
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert stored_dtype(tmp_path) is torch.bfloat16
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"first.weight": model.first.weight.detach()}, str(sharded / "a.safetensors"))
    save_file({"second.weight": model.second.weight.detach(), "second.bias": model.second.bias.detach()},
              str(sharded / "b.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "first.weight": "a.safetensors", "second.weight": "b.safetensors", "second.bias": "b.safetensors"}}))
    assert stored_dtype(sharded) is torch.float32
    assert stored_dtype(tmp_path / "missing") is None


@pytest.fixture(scope="module")
def bf16_fusion(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny early-fusion checkpoint stored in bf16, as real releases (Janus-Pro, Emu3) are."""
    src = Path(tiny_checkpoints("fusion"))
    backend = FusionBackend.load(ModelConfig(path=str(src)), SamplingConfig(guidance_scale=1.0))
    out = tmp_path_factory.mktemp("bf16_fusion")
    from silmm.backends.fusion import save_checkpoint

    save_checkpoint(out, backend.model.to(torch.bfloat16), backend.tokenizer, backend.codec, backend.spec)
    return out


def _weights_dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize(("storage", "compute"), [
    ("fp32", torch.float32),  # fp32 checkpoint, fp32 compute: exact up to summation order
    ("bf16", torch.float32),  # bf16 checkpoint computed in fp32 on a CPU: written back in bf16
    ("bf16", torch.bfloat16),  # the CUDA path, on the CPU
])
def test_merged_model_outputs_equal_base_plus_unmerged_adapter(tiny_checkpoints, bf16_fusion, tmp_path, storage,
                                                               compute):
    ckpt = Path(tiny_checkpoints("fusion")) if storage == "fp32" else bf16_fusion
    dtype = Dtype.float32 if compute is torch.float32 else Dtype.bfloat16
    backend = FusionBackend.load(ModelConfig(path=str(ckpt), dtype=dtype), SamplingConfig(guidance_scale=1.0))
    tokens = backend.sample(PROMPTS, [0, 1])
    backend.add_lora(LORA)
    torch.manual_seed(1)
    _perturb(backend.peft, 0.2)
    with torch.no_grad():
        unmerged = backend.sequence_logprobs(PROMPTS, tokens)
    backend.merge_and_save(tmp_path / "merged")
    assert _weights_dtypes(tmp_path / "merged") == {torch.float32 if storage == "fp32" else torch.bfloat16}
    reloaded = FusionBackend.load(ModelConfig(path=str(tmp_path / "merged"), dtype=dtype),
                                  SamplingConfig(guidance_scale=1.0))
    with torch.no_grad():
        merged = reloaded.sequence_logprobs(PROMPTS, tokens)
        kept = backend.sequence_logprobs(PROMPTS, tokens)  # the backend keeps what it wrote
    torch.testing.assert_close(kept, merged, atol=1e-5, rtol=0)
    if storage == "fp32":
        torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
        return
    # bf16 storage: every weight is within half a bf16 step (2^-9 relative) of base + update, so a sum of
    # log-probs moves by a few bf16 steps of its size; the adapter itself moves it far more
    rtol = 4 * 2.0 ** -8
    effect = (unmerged - backend_base_logps(ckpt, dtype, tokens)).abs()
    assert (effect > 5 * rtol * unmerged.abs()).all(), (effect, unmerged)
    torch.testing.assert_close(merged, unmerged, atol=0, rtol=rtol)


def backend_base_logps(ckpt: Path, dtype: Dtype, tokens: torch.Tensor) -> torch.Tensor:
    base = FusionBackend.load(ModelConfig(path=str(ckpt), dtype=dtype), SamplingConfig(guidance_scale=1.0))
    with torch.no_grad():
        return base.sequence_logprobs(PROMPTS, tokens)
