"""What the real-width smokes (bench/seed_llama_real_width.py, bench/dreamllm_real_width.py) share: memory and
load readings, FLOP counts on the meta device, the ASSUMED H200 roofline, and the table they print."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# ASSUMPTIONS for the H200 column (not measured): dense bf16 peak and the fraction of it reached, HBM bandwidth
# and the fraction of it reached
H200_BF16_FLOPS, H200_MFU = 989e12, 0.35
H200_HBM_BYTES, H200_BW_UTIL = 4.8e12, 0.6


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def child_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def meta_flops(fn: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def vae_decode_flops(config: dict, resolution: int) -> float:
    """One image through an AutoencoderKL decoder of ``config`` at ``resolution`` px, on the meta device."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config).requires_grad_(False)
        return meta_flops(lambda: vae.decode(torch.zeros(1, 4, resolution // 8, resolution // 8)))


def h200_seconds(flops: float, weight_bytes: float) -> float:
    return max(flops / (H200_BF16_FLOPS * H200_MFU), weight_bytes / (H200_HBM_BYTES * H200_BW_UTIL))


def h200_assumption() -> str:
    return (f"max(FLOPs / ({H200_BF16_FLOPS / 1e12:.0f} TFLOP/s x {H200_MFU}), weight bytes read / "
            f"({H200_HBM_BYTES / 1e12:.1f} TB/s x {H200_BW_UTIL}))")


@dataclass
class Row:
    phase: str
    seconds: float
    per: str  # the unit of `seconds_per`
    seconds_per: float
    peak: float  # GiB, high-water mark after the phase
    full_cpu: float | None  # estimate at full depth (and the real decoder for decode), seconds per unit
    h200: float | None  # roofline estimate, seconds per unit


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(rows: list[Row], width: int = 38) -> None:
    print(f"{'phase':<{width}} {'s':>8} {'per':<10} {'s/per':>8} {'peak GiB':>9} {'32L CPU est':>12} {'H200 est':>9}")
    for r in rows:
        print(f"{r.phase:<{width}} {r.seconds:>8.2f} {r.per:<10} {r.seconds_per:>8.2f} {r.peak:>9.2f} "
              f"{fmt(r.full_cpu):>12} {fmt(r.h200, 4):>9}")


class Timed:
    """Wraps a callable and adds up the seconds it runs (to split a phase into its parts)."""

    def __init__(self, fn: Callable):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
