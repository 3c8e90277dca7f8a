"""Training throughput and memory: stored reference values vs a reference forward, gradient checkpointing
on vs off, and the memory of the image-code log-probs per pair before vs after chunking.

1. Same run, same tiny Janus model, same pairs, DPO with DeepSpeed ZeRO-2 on CPU. With stored values
   (the default) training runs no reference forward at all; ``reference="forward"`` runs one no-grad forward
   of the model as loaded (``backend.reference()``) for chosen + rejected of every micro-batch. Both
   without gradient checkpointing.
2. Stored reference with ``train.gradient_checkpointing=true`` vs ``false`` (set in the child's copy of the
   run config: it changes no result, so both use the same pairs file). The child reports whether the
   trainer really called ``backend.enable_gradient_checkpointing()``.
3. Logits memory of one pair (chosen + rejected, 576 image tokens) in the model's dtype, at a narrow hidden
   width: the previous computation (the whole head, float32 logits of every position, gather - logsumexp;
   for early fusion the whole vocabulary then the image columns) vs :func:`image_code_logprobs` (chunks
   under activation checkpointing; early fusion: the image-code rows of the head only). Two figures per
   way: bytes saved for the backward (``torch.autograd.graph.saved_tensors_hooks``: what stays alive
   between the forward and the backward, i.e. during the whole language-model backward), and the peak of
   the bytes of all tensors the forward + backward allocate (a dispatch mode that follows every storage).
   Shapes: Janus (16384 VQ codes) and an Emu3-like fusion vocabulary (184,622 words, 32,768 image codes).

    .venv/bin/python bench/train.py [--pairs 32] [--batch-size 8] [--steps 60] [--repeats 2] [--threads 1]
                                    [--hidden 64] [--dtype bfloat16] [--skip-train] [--skip-logits]

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
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from silmm import config as C  # noqa: E402
from silmm.backends.common import image_code_logprobs, token_logprobs  # noqa: E402
from silmm.backends.fusion import FusionBackend  # noqa: E402
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


def child(run_dir: str, reference: str, gradient_checkpointing: bool) -> None:
    """One training run in this process; prints its figures as JSON."""
    import jobs.train as J
    from silmm.backends.janus import JanusBackend

    run = RunDir.open(run_dir)
    train = dataclasses.replace(run.config.train, gradient_checkpointing=gradient_checkpointing)
    run = RunDir(run.path, dataclasses.replace(run.config, train=train), run.config_hash)
    for d in (run.train_dir(1), run.model_dir(1)):
        shutil.rmtree(d, ignore_errors=True)
    enabled: list[bool] = []  # whether the trainer asked the backend to checkpoint
    original = JanusBackend.enable_gradient_checkpointing

    def spy(self) -> None:
        enabled.append(True)
        original(self)

    JanusBackend.enable_gradient_checkpointing = spy
    stats = J.run(run, 1, reference=reference)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"reference": stats["reference"], "pairs_per_second": stats["pairs_per_second"],
                      "train_seconds": stats["train_seconds"], "peak_rss_mib": round(peak_mib, 1),
                      "final_loss": stats["loss"], "checkpointing_called": bool(enabled)}))


def measure(run: RunDir, reference: str, gradient_checkpointing: bool, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    gc = "true" if gradient_checkpointing else "false"
    out = subprocess.run([sys.executable, __file__, "--child", reference, "--gc", gc, "--run", str(run.path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{reference} (gradient_checkpointing={gc}) run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- logits memory
class LiveBytes(TorchDispatchMode):
    """Bytes of every CPU storage that an op creates while the mode is on, and their peak: a storage counts
    from the op that allocates it until it is freed (its finalizer). Inputs made before are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._seen:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def logits_memory(fn, hidden: torch.Tensor) -> dict:
    """Forward + backward of ``fn(hidden).sum()`` (``hidden`` [2, T, D] requires grad): bytes saved for the
    backward, peak bytes allocated, seconds, and the log-probs."""
    hidden.grad = None
    saved: dict[int, int] = {}  # storage -> bytes: a storage saved twice (or by views) is kept once

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    start = time.perf_counter()
    mode = LiveBytes()
    with mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps = fn(hidden)
        logps.sum().backward()
    seconds = time.perf_counter() - start
    return {"saved": sum(saved.values()), "peak": mode.peak, "seconds": seconds, "logps": logps.detach()}


def logits_shapes(hidden_width: int, dtype: torch.dtype, chunk: int) -> list[tuple[str, object, object, torch.Tensor]]:
    """(name, old fn, new fn, hidden) for one pair (chosen + rejected) of 576 image tokens."""
    g = torch.Generator().manual_seed(0)
    t, d = 576, hidden_width
    out = []

    # Janus: generation head (proj D->D, GELU, D->16384 codes), then the codes' log-probs
    codes = 16384
    head = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, codes))
    head = head.to(dtype).requires_grad_(False)
    tokens = torch.randint(0, codes, (2, t), generator=g)
    hidden = torch.randn(2, t, d, generator=g).to(dtype).requires_grad_(True)
    out.append(("Janus, 16,384 codes",
                lambda h, head=head, tokens=tokens: token_logprobs(head(h).float(), tokens).sum(-1),
                lambda h, head=head, tokens=tokens: image_code_logprobs(h, head, tokens, chunk),
                hidden))

    # Emu3-like early fusion: one head over 184,622 words, of which 32,768 are image codes (contiguous)
    vocab, codes, first = 184_622, 32_768, 151_854
    lm_head = torch.nn.Linear(d, vocab, bias=False).to(dtype).requires_grad_(False)
    image_ids = torch.arange(first, first + codes)
    fusion = SimpleNamespace(model=SimpleNamespace(lm_head=lm_head), image_ids=image_ids,
                             _image_rows=slice(first, first + codes))  # what FusionBackend._image_head reads
    tokens = torch.randint(0, codes, (2, t), generator=g)
    hidden = torch.randn(2, t, d, generator=g).to(dtype).requires_grad_(True)
    out.append(("Emu3-like fusion, 184,622 words / 32,768 codes",
                lambda h, tokens=tokens: token_logprobs(lm_head(h)[..., image_ids].float(), tokens).sum(-1),
                lambda h, tokens=tokens: image_code_logprobs(
                    h, lambda x: FusionBackend._image_head(fusion, x), tokens, chunk),
                hidden))
    return out


def report_logits_memory(hidden_width: int, dtype: torch.dtype, chunk: int) -> None:
    mib = 2 ** 20
    print(f"image-code log-probs of one pair (chosen + rejected, 576 tokens), {dtype}, hidden width "
          f"{hidden_width}, chunk {chunk}: forward + backward")
    for name, old_fn, new_fn, hidden in logits_shapes(hidden_width, dtype, chunk):
        old = logits_memory(old_fn, hidden)
        new = logits_memory(new_fn, hidden)
        diff = float(((old["logps"] - new["logps"]).abs() / old["logps"].abs()).max())
        print(f"  {name}")
        for label, r in (("before (full float32 logits)", old), ("after (image_code_logprobs)", new)):
            print(f"    {label:30s} saved for backward {r['saved'] / mib:9.1f} MiB   peak allocated "
                  f"{r['peak'] / mib:9.1f} MiB   {r['seconds']:6.2f} s")
        print(f"    before / after: saved {old['saved'] / max(new['saved'], 1):.0f}x, peak "
              f"{old['peak'] / max(new['peak'], 1):.1f}x; log-probs agree to {diff:.1e} (relative)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per mode; the best is reported")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the measured runs")
    p.add_argument("--hidden", type=int, default=64, help="hidden width of the logits-memory shapes")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="model dtype of the logits-memory shapes (bfloat16: the CUDA default)")
    p.add_argument("--chunk", type=int, default=64, help="image positions per chunk of image_code_logprobs")
    p.add_argument("--skip-train", action="store_true", help="only the logits-memory figures")
    p.add_argument("--skip-logits", action="store_true", help="only the training figures")
    p.add_argument("--child", choices=("stored", "forward"), help=argparse.SUPPRESS)
    p.add_argument("--gc", choices=("true", "false"), default="false", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.run, args.child, args.gc == "true")
        return
    if not args.skip_train:
        report_training(args)
    if not args.skip_logits:
        torch.set_num_threads(args.threads)
        report_logits_memory(args.hidden, getattr(torch, args.dtype), args.chunk)


def report_training(args: argparse.Namespace) -> None:
    modes = {"stored": ("stored", False), "forward": ("forward", False), "stored+gc": ("stored", True)}
    with tempfile.TemporaryDirectory(prefix="silmm_bench_train_") as tmp:
        run = make_run(Path(tmp), args.pairs, args.batch_size, args.steps)
        results: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, (reference, gc) in modes.items():
                results[mode].append(measure(run, reference, gc, args.threads))
    best = {mode: max(rs, key=lambda r: r["pairs_per_second"]) for mode, rs in results.items()}
    print(f"tiny Janus, DPO, ZeRO-2, {args.pairs} pairs, batch {args.batch_size}, {args.steps} steps, "
          f"{args.threads} thread(s), best of {args.repeats}")
    for mode, r in best.items():
        runs = ", ".join(f"{x['pairs_per_second']:.1f}" for x in results[mode])
        print(f"  reference {modes[mode][0]:8s} gradient checkpointing {'on ' if modes[mode][1] else 'off'} "
              f"{r['pairs_per_second']:8.1f} pairs/s  (runs: {runs})  peak RSS {r['peak_rss_mib']:.0f} MiB  "
              f"final loss {r['final_loss']:.6f}")
    ratio = best["stored"]["pairs_per_second"] / best["forward"]["pairs_per_second"]
    print(f"  stored / forward: {ratio:.2f}x pairs/s; peak RSS difference "
          f"{best['forward']['peak_rss_mib'] - best['stored']['peak_rss_mib']:+.0f} MiB")
    gc_ratio = best["stored+gc"]["pairs_per_second"] / best["stored"]["pairs_per_second"]
    called = all(r["checkpointing_called"] for r in results["stored+gc"])
    print(f"  gradient checkpointing on / off: {gc_ratio:.2f}x pairs/s; peak RSS difference "
          f"{best['stored+gc']['peak_rss_mib'] - best['stored']['peak_rss_mib']:+.0f} MiB"
          + ("" if called else "  [the trainer did NOT call backend.enable_gradient_checkpointing(): "
                               "both runs trained without it]"))


if __name__ == "__main__":
    main()
