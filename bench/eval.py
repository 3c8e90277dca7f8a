"""Expert judges: images scored per second, batched as the `expert` scorer calls them, against one image at a time.

Tiny random judges (each module's build_tiny_*), 1 intra-op thread, the same images for both ways; each judge
is timed over its batched call (all images in one call, the judge batching inside) and over a loop of
one-image calls, best of --repeats. Prints images/s and the ratio per judge (target: >= 3x on CPU).

    .venv/bin/python bench/eval.py [--images 32] [--size 64] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy initialisations are not what we measure
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from silmm.eval.scorers.blip_vqa import BlipVQA, build_tiny_blip_vqa
    from silmm.eval.scorers.clip import ClipJudge, build_tiny_clip
    from silmm.eval.scorers.depth import DepthJudge, build_tiny_dpt
    from silmm.eval.scorers.detector import Detector, build_tiny_owlv2
    from silmm.eval.scorers.mask2former import Segmenter, build_tiny_mask2former

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    questions = ["a red apple?", "a blue cup?", "a wooden table?"]
    with tempfile.TemporaryDirectory(prefix="silmm_bench_eval_") as tmp:
        root = Path(tmp)
        cpu, f32 = torch.device("cpu"), torch.float32
        blip = BlipVQA.load(build_tiny_blip_vqa(root / "blip"), cpu, f32)
        clip = ClipJudge.load(build_tiny_clip(root / "clip"), cpu, f32)
        owl = Detector.load(build_tiny_owlv2(root / "owl"), cpu, f32)
        dpt = DepthJudge.load(build_tiny_dpt(root / "dpt"), cpu, f32)
        m2f = Segmenter.load(build_tiny_mask2former(root / "m2f"), cpu, f32)
        judges: dict[str, tuple[Callable[[list[np.ndarray]], object], str]] = {
            "BLIP VQA (3 noun-phrase questions)": (lambda ims: blip.yes_no(ims, [questions] * len(ims)), "T2I attribute"),
            "CLIPScore": (lambda ims: clip.similarity(ims, ["a red apple on a table"] * len(ims)), "T2I non-spatial"),
            "OWLv2 detector (2 queries)": (lambda ims: owl.detect(ims, [["dog", "cat"]] * len(ims), batch_size=32), "T2I spatial"),
            "DPT depth": (lambda ims: dpt.depth(ims, batch_size=32), "T2I 3D spatial"),
            "Mask2Former instances": (lambda ims: m2f.instances(ims, batch_size=32), "GenEval"),
        }
        print(f"tiny judges, {args.images} images of {args.size}x{args.size}, {args.threads} thread(s), "
              f"best of {args.repeats}")
        for name, (fn, use) in judges.items():
            batched = best_time(lambda fn=fn: fn(images), args.repeats)
            single = best_time(lambda fn=fn: [fn([im]) for im in images], args.repeats)
            print(f"  {name:36s} ({use:15s}) batched {args.images / batched:8.1f} img/s   one at a time "
                  f"{args.images / single:8.1f} img/s   ratio {single / batched:5.2f}x")


if __name__ == "__main__":
    main()
