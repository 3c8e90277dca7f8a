"""Pair selection at real shapes without a model: peak memory against the number of prompts.

Builds a synthetic continuous run (prompts, samples with feature matrices H[L, D] and reference features,
scores; correct metadata, so every check passes) and runs the pairs job on it in a fresh process, at two
prompt counts with the same shard size. The pairs job holds one scores shard's selected matrices at a time
(store.StreamWriter), so its peak RSS should stay flat as prompts grow, while the bytes it writes grow.

    .venv/bin/python bench/scale.py [--prompts 128 512] [--per-shard 64] [--samples 30] [--L 64] [--D 4096]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from silmm import config as C
from silmm import store as S
from silmm.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def synthetic_run(root: Path, prompts: int, per_shard: int, samples: int, L: int, D: int, top_k: int = 10,
                  seed: int = 0) -> RunDir:
    """A continuous run whose iteration 1 has prompts, samples and scores shards (random H, random scores)."""
    cfg = C.load(None, [f"run.root={root}", "run.name=scale", "model.backend=dream", f"model.path={root / 'none'}",
                        "model.build_tiny_if_missing=true", f"prompts.count={prompts}",
                        f"sharding.prompts_per_shard={per_shard}", f"sampling.samples_per_prompt={samples}",
                        f"pairs.top_k={top_k}", "store.compression=none"])
    run = RunDir.create_or_open(cfg)
    rng = np.random.default_rng(seed)
    shards = math.ceil(prompts / per_shard)
    for i in range(shards):
        ids = np.arange(i * per_shard, min((i + 1) * per_shard, prompts))
        n = len(ids)

        def meta(stage: str, i: int = i) -> S.ShardMeta:
            return S.ShardMeta(stage, 1, i, shards, run.config_hash)

        S.write_shard(run.shard_path(1, "prompts", i), meta("prompts"),
                      {"prompt_id": ids, "text": [f"prompt {p}" for p in ids], "category": ["color"] * n})
        pid = np.repeat(ids, samples)
        index = np.tile(np.arange(samples), n)
        S.write_shard(run.shard_path(1, "samples", i), meta("samples"),
                      {"prompt_id": pid, "sample_index": index, "seed": np.arange(len(pid)),
                       "features": rng.standard_normal((len(pid), L, D), dtype=np.float32),
                       "image_png": [b""] * len(pid), "ref_prompt_id": ids,
                       "ref_features": rng.standard_normal((n, L, D), dtype=np.float32)},
                      S.StoreOptions("none"))
        S.write_shard(run.shard_path(1, "scores", i), meta("scores"),
                      {"prompt_id": pid, "sample_index": index, "score": rng.random(len(pid), dtype=np.float32),
                       "question_count": np.ones(len(pid), np.int32), "p_yes": np.zeros(len(pid), np.float32),
                       "p_no": np.zeros(len(pid), np.float32)})
    return run


def pairs_peak_rss(run: RunDir) -> tuple[float, float]:
    """Seconds and peak RSS (bytes) of the pairs job on `run`, in a fresh process."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report this process's peak
    code = ("import re, sys, time; from silmm.rundir import RunDir; import jobs.pairs as J; "
            "t = time.time(); J.run(RunDir.open(sys.argv[1]), 1); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
            "print(time.time() - t, int(hwm) * 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(run.path)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--L", type=int, default=64)
    p.add_argument("--D", type=int, default=4096)
    args = p.parse_args()
    print(f"H[{args.L}, {args.D}] float32, {args.samples} samples per prompt, {args.per_shard} prompts per shard, "
          f"top-10 x last-10 pairs")
    for n in args.prompts:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            run = synthetic_run(Path(tmp), n, args.per_shard, args.samples, args.L, args.D)
            built = time.time() - t0
            seconds, rss = pairs_peak_rss(run)
            written = run.pairs_path(1).stat().st_size
            inputs = sum(f.stat().st_size for f in run.stage_dir(1, "samples").glob("*.h5"))
        print(f"{n:6d} prompts: samples shards {inputs / 2**30:.2f} GiB (built in {built:.0f} s); pairs job "
              f"{seconds:.1f} s, peak RSS {rss / 2**20:.0f} MiB, wrote {written / 2**30:.2f} GiB "
              f"(peak RSS / bytes written {rss / written:.2f})")


if __name__ == "__main__":
    main()
