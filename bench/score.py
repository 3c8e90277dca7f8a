"""Yes/no scoring throughput: JanusBackend.yes_no vs a naive per-question generate() baseline.

The baseline is what public Janus self-improvement pipelines do: for every (image, question) pair,
re-encode the image and call ``generate(max_new_tokens=1, output_scores=True)``, reading p(yes), p(no)
from the first step's scores. ``yes_no`` encodes each image once, reuses its prefix KV cache for all
its questions and reads the last position of one forward per batch.

    .venv/bin/python bench/score.py [--images 16] [--questions 8] [--batch-size 16] [--repeats 3]
    .venv/bin/python bench/score.py --backend emu3   # the same for Emu3, plus its image-token sampling
                                                     # rate with the grid constraint vs without
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from silmm.backends.common import yes_no_token_ids  # noqa: E402
from silmm.backends.emu3 import Emu3Backend, build_tiny_emu3  # noqa: E402
from silmm.backends.janus import JanusBackend, build_tiny_janus  # noqa: E402
from silmm.config import ModelConfig, SamplingConfig  # noqa: E402

COLORS = ["red", "blue", "green", "yellow"]
OBJECTS = ["cube", "sphere", "cat", "dog"]


def questions_for(i: int, n: int) -> list[str]:
    color, obj = COLORS[i % len(COLORS)], OBJECTS[(i // 2) % len(OBJECTS)]
    pool = [f"Is there a {color} {obj}?", f"Is the {obj} {color}?", f"Are there two {obj}s?",
            f"Is the {obj} on the table?", f"Is the {obj} left of the {OBJECTS[(i + 1) % 4]}?",
            f"Is the {obj} above the {OBJECTS[(i + 2) % 4]}?", "Does the image show a tree?",
            f"Is there a small {obj}?", "Is the sky blue?", "Are there many objects?"]
    return pool[:n]


def naive_yes_no(backend: JanusBackend, images: np.ndarray,
                 questions: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One generate() per question, the image re-encoded every time."""
    yes, no = yes_no_token_ids(backend.tokenizer)
    out = []
    for image, qs in zip(images, questions, strict=True):
        p_yes, p_no = [], []
        for q in qs:
            chat = backend.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True, tokenize=False)
            inputs = backend.processor(text=[chat], images=[image]).to(backend.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(backend.dtype)
            with torch.no_grad():
                gen = backend.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                             return_dict_in_generate=True, generation_config=backend.generation_config)
            probs = gen.scores[0][0].float().softmax(-1)
            p_yes.append(float(probs[yes].sum()))
            p_no.append(float(probs[no].sum()))
        out.append((np.asarray(p_yes, dtype=np.float32), np.asarray(p_no, dtype=np.float32)))
    return out


def naive_yes_no_emu3(backend: Emu3Backend, images: np.ndarray,
                      questions: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Emu3: one generate() per question through its processor, the image VQ-encoded every time."""
    yes, no = yes_no_token_ids(backend.tokenizer)
    out = []
    for image, qs in zip(images, questions, strict=True):
        p_yes, p_no = [], []
        for q in qs:
            inputs = backend.processor(text=[backend._chat(q, image=True)], images=[image], return_tensors="pt")
            inputs = inputs.to(backend.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(backend.dtype)
            with torch.no_grad():
                gen = backend.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                             return_dict_in_generate=True, pad_token_id=backend.pad_id)
            probs = gen.scores[0][0].float().softmax(-1)
            p_yes.append(float(probs[yes].sum()))
            p_no.append(float(probs[no].sum()))
        out.append((np.asarray(p_yes, dtype=np.float32), np.asarray(p_no, dtype=np.float32)))
    return out


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="(image, question) pairs per forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", choices=("janus", "emu3"), default="janus")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a Janus/Emu3 directory (default: tiny)")
    parser.add_argument("--grid", type=int, default=8, help="emu3: image tokens per side when sampling")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        emu3 = args.backend == "emu3"
        path = args.checkpoint or (build_tiny_emu3 if emu3 else build_tiny_janus)(Path(tmp) / "tiny", seed=0)
        if emu3:
            sampling = SamplingConfig(image_height=args.grid, image_width=args.grid, guidance_scale=3.0)
            backend = Emu3Backend.load(ModelConfig(path=str(path)), sampling)
            naive = naive_yes_no_emu3
        else:
            backend = JanusBackend.load(ModelConfig(path=str(path)), SamplingConfig())
            naive = naive_yes_no
        seeds = list(range(args.images))
        images = backend.decode(backend.sample(["a red cube"] * args.images, seeds), seeds)
        questions = [questions_for(i, args.questions) for i in range(args.images)]
        pairs = sum(len(q) for q in questions)

        backend.yes_no(images[:1], questions[:1])  # warm-up
        naive(backend, images[:1], questions[:1])
        t_fast, fast = best_of(args.repeats, lambda: backend.yes_no(images, questions, batch_size=args.batch_size))
        t_naive, slow = best_of(args.repeats, lambda: naive(backend, images, questions))
        if emu3:  # image tokens per second: the grid constraint (visual rows of the head only) vs free sampling
            prompts, few = ["a red cube"] * args.batch_size, list(range(args.batch_size))
            t_con, _ = best_of(args.repeats, lambda: backend.sample(prompts, few))
            t_free, _ = best_of(args.repeats, lambda: backend.sample_unconstrained(prompts, few))
            h, w = backend.grid

    diff = max(float(np.abs(a - b).max()) for f, n in zip(fast, slow, strict=True) for a, b in zip(f, n, strict=True))
    print(f"device={backend.device} dtype={backend.dtype} threads={torch.get_num_threads()} "
          f"images={args.images} questions/image={args.questions} batch_size={args.batch_size}")
    print(f"yes_no (prefix cache):     {pairs / t_fast:9.1f} pairs/s  ({t_fast * 1e3:.1f} ms)")
    print(f"naive generate per pair:   {pairs / t_naive:9.1f} pairs/s  ({t_naive * 1e3:.1f} ms)")
    print(f"speed-up: {t_naive / t_fast:.1f}x   max |p difference| vs naive: {diff:.2e}")
    if emu3:
        tokens = args.batch_size * h * (w + 1)  # written tokens, <eol> included, both ways
        print(f"sampling {h}x{w} grid, batch {args.batch_size}, guidance 3: constrained {tokens / t_con:9.1f} tokens/s, "
              f"unconstrained {tokens / t_free:9.1f} tokens/s  (constraint cost: {100 * (t_con / t_free - 1):+.1f}%)")


if __name__ == "__main__":
    main()
