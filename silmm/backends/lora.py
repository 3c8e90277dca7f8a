"""Merging a trained LoRA adapter into the weights without losing it to rounding.

On CUDA the model is bf16. Adding a small LoRA update to bf16 weights in bf16 drops most of it: bf16 keeps
8 bits of mantissa, so an update below ~1/256 of a weight's magnitude rounds away (for a 2048 x 2048 matrix,
93% of an update with |dW|/|W| = 3.6e-4 is lost). The loss compounds, because each merged model is the next
iteration's policy and reference. So here:

- the adapter's values come from the optimizer's float32 master copy (DeepSpeed keeps one under bf16), not
  from the bf16 module copy (:data:`Master` says how to read a trainable parameter's float32 value);
- every merged weight is ``(W.float() + scale * B @ A).to(storage dtype)``: one rounding, at the end;
- the storage dtype is the dtype of the checkpoint the model was loaded from, whatever it was computed in
  (a bf16 checkpoint loaded in float32 on a CPU is written back in bf16, not doubled in size).

What this cannot do: an update below bf16's resolution is lost by the final cast however it was merged
(measured on a 2048 x 2048 bf16 matrix: at |dW|/|W| = 3.6e-4 the relative error of the stored update is
0.926 with peft's bf16 merge and 0.926 with a float32 merge; at 3.6e-3, 0.422 and 0.422), and a bf16
forward of the merged weights would lose it again. So each merge logs the share of the update its storage
rounds away, and the float32 adapter is kept beside the merged model. Keeping such updates in a bf16 run
needs the adapters applied unmerged (or float32 weights); see the README.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)

# The float32 value of a trainable parameter: DeepSpeed's master copy when it keeps one, else the
# parameter itself. The default reads the parameter.
Master = Callable[[nn.Parameter], torch.Tensor]


def own_values(p: nn.Parameter) -> torch.Tensor:
    return p.detach().float()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def stored_dtype(directory: str | Path) -> torch.dtype | None:
    """The floating dtype most tensors of a safetensors checkpoint are stored in (headers only: no weights
    are read); None when the directory holds no safetensors weights."""
    counts: Counter[torch.dtype] = Counter()
    for path in _weight_files(Path(directory)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    counts[dtype] += 1
    return counts.most_common(1)[0][0] if counts else None


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every peft LoRA layer in ``model`` (the name is the wrapped Linear's)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_delta(layer: nn.Module, master: Master = own_values) -> torch.Tensor:
    """The float32 update ``scale * B @ A`` of one LoRA layer, summed over its active adapters, from the
    master values of A and B (never from a bf16 copy)."""
    delta = None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a, b = master(layer.lora_A[name].weight), master(layer.lora_B[name].weight)
        d = (b @ a) * layer.scaling[name]
        if getattr(layer, "fan_in_fan_out", False):  # Conv1D-style layers store the weight transposed
            d = d.T
        delta = d if delta is None else delta + d
    if delta is None:
        raise ValueError(f"{type(layer).__name__} has no active LoRA adapter")
    return delta


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None, master: Master = own_values
                      ) -> dict[str, torch.Tensor]:
    """``model``'s weights under their original names (peft's ``.base_layer.`` removed, LoRA tensors left
    out) with every LoRA update merged in float32, floating tensors cast to ``dtype`` (None: kept as they
    are). ``model`` is not modified. Tensors that share storage (tied embeddings) stay shared, so
    ``save_pretrained`` recognises the tie."""
    merged, update_sq, lost_sq = {}, 0.0, 0.0
    for name, layer in lora_layers(model):
        weight = layer.get_base_layer().weight.detach()
        delta = lora_delta(layer, master).to(weight.device)
        merged[f"{name}.base_layer.weight"] = weight.float() + delta
        if dtype is not None and dtype != torch.float32:  # what the storage cast will round away
            stored = merged[f"{name}.base_layer.weight"].to(dtype).float()
            update_sq += delta.pow(2).sum().item()
            lost_sq += (stored - weight.float() - delta).pow(2).sum().item()
    if update_sq > 0:
        lost = math.sqrt(lost_sq / update_sq)
        # merging in float32 removes the double rounding, but no merge keeps an update that is smaller than
        # the storage dtype's resolution; the float32 adapter beside the merged model keeps it exactly
        (log.warning if lost > 0.1 else log.info)(
            "LoRA merge: %.1f%% of the update (relative L2 error) is rounded away by storing in %s", 100 * lost, dtype)
    out: dict[str, torch.Tensor] = {}
    cast: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}  # shared storage -> one cast
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        value = merged.get(key, value.detach())
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            tag = (value.data_ptr(), value.dtype, tuple(value.shape))
            if key in merged or tag not in cast:
                cast[tag] = value.to(dtype)
            value = cast[tag]
        out[key.replace(".base_layer.", ".")] = value.contiguous()
    return out


def adapter_state_dict(model: nn.Module, master: Master = own_values) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every trainable parameter replaced by its float32 master value: what
    peft's ``save_pretrained(state_dict=...)`` filters the adapter from."""
    state = dict(model.state_dict())
    for name, p in model.named_parameters():
        if p.requires_grad:
            state[name] = master(p).to(p.device)
    return state
