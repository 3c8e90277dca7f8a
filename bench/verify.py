"""What verifying every read costs: a shard read with all checksums vs the same read without them.

Every reader verifies the CRC32 of every dataset (and of the attributes); a column a reader does not load is
checksummed block by block, so memory stays at one block. This prints, for a samples shard of continuous
features (paper scale: H of 64 x 4096 per sample) and one of discrete tokens with PNGs:
    write      seconds to write the shard (the baseline a task pays anyway)
    plain      a full read without checksums
    verified   the same read with every checksum
    validate   the completion check: every dataset checksummed, nothing kept (peak memory vs file size)

    .venv/bin/python bench/verify.py [--samples 240] [--L 64] [--D 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from silmm import store as S


def samples_continuous(n: int, L: int, D: int, prompts: int) -> dict:
    rng = np.random.default_rng(0)
    per = n // prompts
    return {"prompt_id": np.repeat(np.arange(prompts), per), "sample_index": np.tile(np.arange(per), prompts),
            "seed": np.arange(n), "features": rng.standard_normal((n, L, D), dtype=np.float32),
            "image_png": [b""] * n, "ref_prompt_id": np.arange(prompts),
            "ref_features": rng.standard_normal((prompts, L, D), dtype=np.float32)}


def samples_discrete(n: int, T: int, prompts: int) -> dict:
    rng = np.random.default_rng(0)
    per = n // prompts
    png = [rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes() for _ in range(n)]  # PNG-sized blobs
    return {"prompt_id": np.repeat(np.arange(prompts), per), "sample_index": np.tile(np.arange(per), prompts),
            "seed": np.arange(n), "tokens": rng.integers(0, 16384, (n, T)), "ref_logprob": rng.random(n, np.float32),
            "image_png": png}


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def peak(fn) -> int:
    tracemalloc.start()
    fn()
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return top


def measure(name: str, data: dict, folder: Path) -> None:
    path = folder / f"{name}.h5"
    meta = S.ShardMeta("samples", 1, 0, 1, "bench")
    write = timed(lambda: S.write_shard(path, meta, data), repeats=1)
    size = path.stat().st_size
    plain = timed(lambda: S.read_shard(path, verify_checksums=False))
    verified = timed(lambda: S.read_shard(path))
    validate = timed(lambda: S.validate_shard(path))
    mem = peak(lambda: S.validate_shard(path))
    mb = size / 2**20
    print(f"{name}: {mb:.0f} MiB on disk; write {write:.2f} s; full read {plain:.2f} s plain, {verified:.2f} s "
          f"verified ({verified / plain:.2f}x, {mb / verified:.0f} MiB/s); completion check {validate:.2f} s "
          f"({validate / write:.2f}x the write), peak traced memory {mem / 2**20:.1f} MiB "
          f"({mem / size:.3f} of the file)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=240)
    p.add_argument("--L", type=int, default=64)
    p.add_argument("--D", type=int, default=4096)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measure("continuous", samples_continuous(args.samples, args.L, args.D, args.samples // 30), Path(tmp))
        measure("discrete", samples_discrete(args.samples * 4, 576, args.samples * 4 // 10), Path(tmp))


if __name__ == "__main__":
    main()
