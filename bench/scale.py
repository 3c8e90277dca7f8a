"""Storage and memory at paper scale without a model: bytes per iteration, peak RSS of pairs and scores.

Builds a synthetic continuous run (prompts, questions, samples with feature matrices H[L, D] in
`store.features_dtype` and reference features, scores; correct metadata, so every check passes) and, at two
prompt counts with the same shard size:
- the bytes written per iteration by samples and pairs, now (float16 H, pairs.h5 indexing rows of the samples
  shards) and before (float32 H, pairs.h5 copying every selected matrix, computed from the selected rows),
  measured and extrapolated to 16k prompts;
- the pairs job's peak RSS (fresh process);
- the scores job's peak RSS on one shard of each size, with a stand-in judge (no model: the read path only,
  i.e. the stored PNGs, or the H it would decode, read prompt by prompt).
`--recompute` answers "recompute H instead of storing it" on the tiny dream model: the time to recompute H of
the selected samples (top-10 + last-10 of 30) as a share of the samples stage's time.

    .venv/bin/python bench/scale.py [--prompts 64 192] [--per-shard 64] [--samples 30] [--L 64] [--D 4096]
    .venv/bin/python bench/scale.py --recompute
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
from silmm.images import to_png
from silmm.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
PAPER_PROMPTS = 16_000


def synthetic_run(root: Path, prompts: int, per_shard: int, samples: int, L: int, D: int, top_k: int = 10,
                  seed: int = 0, features_dtype: str = "float16", image_side: int = 0, scores: bool = True,
                  store_images: str = "all") -> RunDir:
    """A continuous run whose iteration 1 has prompts, questions, samples and (``scores``) scores shards:
    random H, random scores, and with ``image_side`` a random PNG of that side per sample."""
    cfg = C.load(None, [f"run.root={root}", "run.name=scale", "model.backend=dream", f"model.path={root / 'none'}",
                        "model.build_tiny_if_missing=true", f"prompts.count={prompts}",
                        f"sharding.prompts_per_shard={per_shard}", f"sampling.samples_per_prompt={samples}",
                        f"pairs.top_k={top_k}", "store.compression=none", f"store.features_dtype={features_dtype}",
                        f"sampling.store_images={store_images}", "logging.progress=false"])
    run = RunDir.create_or_open(cfg)
    rng = np.random.default_rng(seed)
    shards = math.ceil(prompts / per_shard)
    for i in range(shards):
        ids = np.arange(i * per_shard, min((i + 1) * per_shard, prompts))
        n = len(ids)

        def meta(stage: str, i: int = i, extra: dict | None = None) -> S.ShardMeta:
            return S.ShardMeta(stage, 1, i, shards, run.config_hash, extra or {})

        S.write_shard(run.shard_path(1, "prompts", i), meta("prompts"),
                      {"prompt_id": ids, "text": [f"prompt {p}" for p in ids], "category": ["color"] * n})
        S.write_shard(run.shard_path(1, "questions", i), meta("questions"),
                      {"prompt_id": ids, "question_count": np.full(n, 2, np.int32), "fallback": np.zeros(n, bool),
                       "question": [f"is there {q} of prompt {p}?" for p in ids for q in ("a", "b")]})
        pid = np.repeat(ids, samples)
        index = np.tile(np.arange(samples), n)
        pngs = [to_png(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)) if image_side else b""
                for _ in pid]
        S.write_shard(run.shard_path(1, "samples", i),
                      meta("samples", extra={"samples_per_prompt": samples, "family": "continuous",
                                             "images": store_images if image_side else "none"}),
                      {"prompt_id": pid, "sample_index": index, "seed": np.arange(len(pid)),
                       "features": rng.standard_normal((len(pid), L, D), dtype=np.float32).astype(features_dtype),
                       "image_png": pngs, "ref_prompt_id": ids,
                       "ref_features": rng.standard_normal((n, L, D), dtype=np.float32).astype(features_dtype)},
                      S.StoreOptions("none"))
        if scores:
            S.write_shard(run.shard_path(1, "scores", i), meta("scores"),
                          {"prompt_id": pid, "sample_index": index, "score": rng.random(len(pid), dtype=np.float32),
                           "question_count": np.ones(len(pid), np.int32), "p_yes": np.zeros(len(pid), np.float32),
                           "p_no": np.zeros(len(pid), np.float32)})
    return run


class StandInJudge:
    """What the scores job asks of a model, without one: decode to a small image, answer p(yes) = p(no)."""

    def decode(self, values, seeds: list[int]) -> np.ndarray:
        assert values.dtype.is_floating_point and len(values) == len(seeds)  # H, as float32
        return np.zeros((len(seeds), 8, 8, 3), np.uint8)

    def yes_no(self, images: np.ndarray, questions: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(np.full(len(q), 0.5, np.float32), np.full(len(q), 0.25, np.float32)) for q in questions]


def peak_rss(statement: str, run: RunDir) -> tuple[float, float]:
    """Seconds and peak RSS (bytes) of ``statement`` (``run`` is the RunDir) in a fresh process."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report this process's peak
    code = ("import re, sys, time; from silmm.rundir import RunDir; run = RunDir.open(sys.argv[1]); "
            f"t = time.time(); {statement}; "
            "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
            "print(time.time() - t, int(hwm) * 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(run.path)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    return float(out[-2]), float(out[-1])


PAIRS = "import jobs.pairs as J; J.run(run, 1)"
SCORES = ("import jobs.scores as J; from bench.scale import StandInJudge; J.load_judge = lambda *a: StandInJudge(); "
          "J.run(run, 1, 0)")


def bytes_of(run: RunDir, stage: str) -> int:
    return sum(f.stat().st_size for f in run.stage_dir(1, stage).glob("*.h5"))


def old_pairs_bytes(run: RunDir) -> int:
    """pairs.h5 as the earlier job wrote it: this file's pair rows plus every selected H (each once per
    prompt) and each prompt's H_r copied as float32, uncompressed as the synthetic run stores them."""
    pairs = S.read_shard(run.pairs_path(1), columns=("samples_shard", "chosen_row", "rejected_row", "ref_row"))
    shard = pairs["samples_shard"]
    selected = set(zip(shard, pairs["chosen_row"], strict=True)) | set(zip(shard, pairs["rejected_row"], strict=True))
    refs = set(zip(shard, pairs["ref_row"], strict=True))
    L, D = S.read_shard(run.shard_path(1, "samples", 0), columns=("ref_features",))["ref_features"].shape[1:]
    return run.pairs_path(1).stat().st_size + (len(selected) + len(refs)) * L * D * 4


def storage(args: argparse.Namespace) -> None:
    print(f"H[{args.L}, {args.D}], {args.samples} samples per prompt, {args.per_shard} prompts per shard, top-10 x "
          f"last-10 pairs, uncompressed (random H does not compress; real H compresses a little with gzip)")
    for n in args.prompts:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            run = synthetic_run(Path(tmp), n, args.per_shard, args.samples, args.L, args.D)
            built = time.time() - t0
            seconds, rss = peak_rss(PAIRS, run)
            samples_new, pairs_new, pairs_old = bytes_of(run, "samples"), run.pairs_path(1).stat().st_size, \
                old_pairs_bytes(run)
            features = args.samples * args.L * args.D * 2 + args.L * args.D * 2  # per prompt, float16
            samples_old = samples_new + n * features  # the same shards with float32 H and H_r
        per_prompt = {"samples": (samples_old / n, samples_new / n), "pairs": (pairs_old / n, pairs_new / n)}
        print(f"{n:6d} prompts (built in {built:.0f} s): pairs job {seconds:.1f} s, peak RSS {rss / 2**20:.0f} MiB")
        for stage, (old, new) in per_prompt.items():
            print(f"    {stage:8s} old {old * n / 2**30:8.3f} GiB  new {new * n / 2**30:8.3f} GiB  "
                  f"-> 16k prompts: old {old * PAPER_PROMPTS / 1e9:7.1f} GB  new {new * PAPER_PROMPTS / 1e9:7.2f} GB")
    for per_shard in args.scores_shard:
        with tempfile.TemporaryDirectory() as tmp:
            for images in ("all", "none"):  # PNGs read per prompt; or H read per prompt to be decoded
                run = synthetic_run(Path(tmp) / images, per_shard, per_shard, args.samples, args.L, args.D,
                                    image_side=args.image_side if images == "all" else 0, scores=False,
                                    store_images=images)
                seconds, rss = peak_rss(SCORES, run)
                print(f"scores, one shard of {per_shard:4d} prompts ({bytes_of(run, 'samples') / 2**30:.2f} GiB), "
                      f"{'stored PNGs' if images == 'all' else 'H to decode'}: {seconds:.1f} s, peak RSS "
                      f"{rss / 2**20:.0f} MiB (stand-in judge: the read path only)")


def recompute(args: argparse.Namespace) -> None:
    """Samples stage vs recomputing H of the selected samples, tiny dream model, this CPU."""
    import torch

    import jobs.samples as J
    from silmm.models import load_backend
    from silmm.seeding import derive_seed

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.load(None, [f"run.root={tmp}", "run.name=r", "model.backend=dream", f"model.path={tmp}/tiny",
                            "model.build_tiny_if_missing=true", "prompts.count=4", "sharding.prompts_per_shard=4",
                            "sampling.samples_per_prompt=30", "sampling.batch_size=10", "logging.progress=false"])
        run = RunDir.create_or_open(cfg)
        import jobs.prompts as P

        P.run(run, 1, 0)
        t0 = time.time()
        J.run(run, 1, 0)
        stage = time.time() - t0
        prompts = S.read_shard(run.shard_path(1, "prompts", 0))
        backend = load_backend(run, 1)
        selected = list(range(10)) + list(range(20, 30))  # any 20 of 30: DropDiv costs the same per sample
        t0 = time.time()
        for pid, text in zip(prompts["prompt_id"].tolist(), prompts["text"], strict=True):
            seeds = [derive_seed(0, 1, pid, j, "sample") for j in selected]
            for b in range(0, len(seeds), 10):
                backend.sample([text] * len(seeds[b: b + 10]), seeds[b: b + 10])
        again = time.time() - t0
    print(f"tiny dream, 4 prompts x 30 samples, 1 thread: samples stage {stage:.2f} s; recomputing H of 20 selected "
          f"per prompt {again:.2f} s = {100 * again / stage:.0f}% of the stage")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[64, 192])
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--scores-shard", type=int, nargs="+", default=[16, 64], help="prompts of the scores shard")
    p.add_argument("--image-side", type=int, default=256, help="side of the random PNGs the scores bench reads")
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--L", type=int, default=64)
    p.add_argument("--D", type=int, default=4096)
    p.add_argument("--recompute", action="store_true", help="the recompute-vs-store figure instead")
    args = p.parse_args()
    recompute(args) if args.recompute else storage(args)


if __name__ == "__main__":
    main()
