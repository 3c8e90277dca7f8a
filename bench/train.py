"""Training throughput: reference values stored in pairs.h5 vs a reference forward every micro-batch.

Same run, same tiny Janus model, same pairs, DPO with DeepSpeed ZeRO-2 on CPU. With stored values
(the default) training runs no reference forward at all; ``reference="forward"`` runs one no-grad forward
of the model as loaded (``backend.reference()``) for chosen + rejected of every micro-batch.

    .venv/bin/python bench/train.py [--pairs 32] [--batch-size 8] [--steps 60] [--repeats 2] [--threads 1]

One intra-op thread by default: the tiny matrices gain nothing from more, and on a shared 2-core machine
two OpenMP threads slow down many times over as soon as another process takes a core, which swamps the
comparison.

Each measurement runs in a fresh process, so that its peak memory belongs to one mode: peak RSS from
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the process's high-water mark of resident memory. It counts
torch's tensor memory, which ``tracemalloc`` would miss (it sees Python allocations only); it also counts
the interpreter, libraries and model, the same in both modes, so the difference between the modes is
what the reference forward adds. Pairs per second are measured over the training loop only (the job's
own figure: model loading and DeepSpeed set-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from silmm import config as C  # noqa: E402
from silmm.models import build_tiny, load_backend  # noqa: E402
from silmm.rundir import RunDir  # noqa: E402
from silmm.store import ShardMeta, write_shard  # noqa: E402

COLORS = ["red", "blue", "green", "yellow"]
OBJECTS = ["cube", "sphere", "cat", "dog", "car", "tree", "bird", "ball"]


def make_run(root: Path, pairs: int, batch_size: int, steps: int) -> RunDir:
    """A tiny Janus run whose pairs.h5 holds samples of the model itself and their reference log-probs."""
    ckpt = build_tiny("janus", root / "tiny_janus", seed=0)
    cfg = C.load(None, [f"run.root={root}", "run.name=bench", "model.backend=janus", f"model.path={ckpt}",
                        f"train.max_steps={steps}", "train.warmup_steps=2", f"train.batch_size={batch_size}",
                        "train.grad_accum=1", "train.lora.r=8", "train.lora.alpha=8", "train.log_every=10",
                        f"train.checkpoint_every={steps}", "logging.progress=false"])
    run = RunDir.create_or_open(cfg)
    backend = load_backend(run, 1)
    prompts = [f"a {COLORS[i % 4]} {OBJECTS[i % 8]} and a {COLORS[(i // 4) % 4]} {OBJECTS[(i + 3) % 8]}"
               for i in range(pairs)]
    tokens, ref = [], []
    for start in range(0, 2 * pairs, 16):
        batch = (prompts * 2)[start:start + 16]
        z = backend.sample(batch, list(range(start, start + len(batch))))
        with torch.no_grad(), backend.reference():
            ref.append(backend.sequence_logprobs(batch, z))
        tokens.append(z)
    z, lp = torch.cat(tokens).numpy(), torch.cat(ref).numpy()
    data = {"prompt_id": np.arange(pairs), "text": prompts, "category": ["color"] * pairs,
            "chosen_index": np.zeros(pairs, np.int32), "rejected_index": np.ones(pairs, np.int32),
            "chosen_score": np.ones(pairs, np.float32), "rejected_score": np.zeros(pairs, np.float32),
            "chosen_tokens": z[:pairs], "rejected_tokens": z[pairs:],
            "chosen_ref_logprob": lp[:pairs], "rejected_ref_logprob": lp[pairs:]}
    write_shard(run.pairs_path(1), ShardMeta("pairs", 1, 0, 1, run.config_hash), data)
    return run


def child(run_dir: str, reference: str) -> None:
    """One training run in this process; prints its figures as JSON."""
    import jobs.train as J

    run = RunDir.open(run_dir)
    for d in (run.train_dir(1), run.model_dir(1)):
        shutil.rmtree(d, ignore_errors=True)
    stats = J.run(run, 1, reference=reference)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"reference": stats["reference"], "pairs_per_second": stats["pairs_per_second"],
                      "train_seconds": stats["train_seconds"], "peak_rss_mib": round(peak_mib, 1),
                      "final_loss": stats["loss"]}))


def measure(run: RunDir, reference: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--child", reference, "--run", str(run.path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{reference} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per mode; the best is reported")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the measured runs")
    p.add_argument("--child", choices=("stored", "forward"), help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.run, args.child)
        return
    with tempfile.TemporaryDirectory(prefix="silmm_bench_train_") as tmp:
        run = make_run(Path(tmp), args.pairs, args.batch_size, args.steps)
        results: dict[str, list[dict]] = {"stored": [], "forward": []}
        for _ in range(args.repeats):
            for mode in results:
                results[mode].append(measure(run, mode, args.threads))
    best = {mode: max(rs, key=lambda r: r["pairs_per_second"]) for mode, rs in results.items()}
    print(f"tiny Janus, DPO, ZeRO-2, {args.pairs} pairs, batch {args.batch_size}, {args.steps} steps, "
          f"{args.threads} thread(s), best of {args.repeats}")
    for mode, r in best.items():
        runs = ", ".join(f"{x['pairs_per_second']:.1f}" for x in results[mode])
        print(f"  reference {mode:8s} {r['pairs_per_second']:8.1f} pairs/s  (runs: {runs})  "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB  final loss {r['final_loss']:.6f}")
    ratio = best["stored"]["pairs_per_second"] / best["forward"]["pairs_per_second"]
    print(f"  stored / forward: {ratio:.2f}x pairs/s; peak RSS difference "
          f"{best['forward']['peak_rss_mib'] - best['stored']['peak_rss_mib']:+.0f} MiB")


if __name__ == "__main__":
    main()
