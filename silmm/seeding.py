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


def decode_seed(run_seed: int, iteration: int, prompt_id: int, sample_index: int, per_prompt: bool) -> int:
    """The decoder's noise seed of a training sample (samples stage; the scores stage re-decodes with it).
    ``per_prompt`` (sampling.decoder_noise): every sample of a prompt starts from the same noise."""
    return derive_seed(run_seed, iteration, prompt_id, 0 if per_prompt else sample_index, "decode")


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
