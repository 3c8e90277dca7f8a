"""Seeds derived from (run seed, iteration, prompt id, sample index, purpose).

A derived seed depends on nothing else (not on shard layout, batch position or how often a task was
restarted), so a resumed or re-sharded task draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(run_seed: int, iteration: int, prompt_id: int, sample_index: int = 0, purpose: str = "sample") -> int:
    """A 63-bit seed; `purpose` separates streams (e.g. "sample", "decode", "question", "prompt")."""
    key = f"silmm|{run_seed}|{iteration}|{prompt_id}|{sample_index}|{purpose}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def decode_seed(run_seed: int, iteration: int, prompt_id: int, sample_index: int, noise: str = "per_sample") -> int:
    """The decoder's noise seed of a training sample (samples stage; the scores stage re-decodes with it).
    ``noise`` is sampling.decoder_noise: "per_sample", each its own; "per_prompt", every sample of a prompt
    starts from the same noise; "fixed", every image of the run does (see :func:`fixed_decode_seed`)."""
    if noise == "fixed":
        return fixed_decode_seed(run_seed)
    if noise not in ("per_sample", "per_prompt"):
        raise ValueError(f"sampling.decoder_noise: unknown value {noise!r} (per_sample, per_prompt or fixed)")
    return derive_seed(run_seed, iteration, prompt_id, 0 if noise == "per_prompt" else sample_index, "decode")


def fixed_decode_seed(run_seed: int) -> int:
    """The one decoder noise seed of a run with sampling.decoder_noise=fixed: training and evaluation."""
    return derive_seed(run_seed, 0, 0, 0, "decode-fixed")


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
