"""Toy pretraining -- one job before iteration 1: teach a small early-fusion LMM the toy world.

Reads   config `toy.*` (the world split, pretraining settings) and `questions.icl_examples` (the request
        format it learns to answer)
Writes  <model.path>.partial/   progress every toy.pretrain.checkpoint_every steps (weights, optimizer, step)
        <run>/logs/iter_00/pretrain_00000.progress.json   steps done of total, rate (silmm.progress)
        <model.path>/           the finished checkpoint in the fusion backend's layout, plus pretrain.json
                                (settings, losses, answer accuracy); swapped in atomically, so a path that
                                exists is a complete cache that later runs reuse
The story: build the word tokenizer and a small Llama, resume from progress if any, then train on three
kinds of batch per step (text->image with noisy captions, exact yes/no answers, self-questioning), and
export. Batches depend on (seed, step) only, so a resumed job equals an uninterrupted one.
Run directly: python -m jobs.pretrain --run RUN --iteration 0 --shard 0
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from silmm.backends.fusion import FusionSpec, save_checkpoint
from silmm.progress import task_recorder
from silmm.questions import load_examples
from silmm.rundir import RunDir
from silmm.toy import pretrain as PT
from silmm.toy import world

log = logging.getLogger("jobs.pretrain")


def run(run: RunDir, iteration: int, shard: int, stop_after: int | None = None) -> dict[str, Any]:
    cfg, toy = run.config, run.config.toy
    p = toy.pretrain
    out = Path(cfg.model.path)
    partial = out.with_name(out.name + ".partial")
    if p.threads:
        torch.set_num_threads(p.threads)

    # 1. Vocabulary, model, optimizer; progress of an interrupted job, if any.
    examples = load_examples(cfg.questions.icl_examples)
    tokenizer = PT.build_tokenizer(examples, PT.style(toy))
    model = PT.build_model(tokenizer, toy, p.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.98), weight_decay=0.01)
    start = PT.load_progress(partial, model, optimizer)
    corpus = PT.Corpus(tokenizer, toy, examples)
    n_params = sum(x.numel() for x in model.parameters())
    log.info("pretraining a %.2fM-parameter early-fusion LM (vocabulary %d) for %d steps, from step %d -> %s",
             n_params / 1e6, len(tokenizer), p.steps, start, out)

    # 2. The loop: one batch of each kind per step (questions are long and easy: an eighth of a batch).
    sizes = {"generate": p.batch_size, "answer": p.batch_size, "questions": max(p.batch_size // 8, 1)}
    model.train()
    t0, losses = time.time(), {k: float("nan") for k in PT.KINDS}
    record = task_recorder("steps", p.steps, start)  # under the run's logs: the driver's bar and `silmm status`
    for step in range(start, p.steps):
        for group in optimizer.param_groups:
            group["lr"] = PT.lr_at(step, p.lr, p.warmup_steps, p.steps)
        total = 0.0
        for kind in PT.KINDS:
            ids, mask, labels = corpus.batch(kind, sizes[kind], p.seed, step)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            losses[kind] = loss.item()
            total += losses[kind]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record.update(done)
        if done % 50 == 0 or done == p.steps:
            rate = (done - start) / (time.time() - t0)
            log.info("step %d/%d  loss %.3f (%s)  %.1f steps/s, eta %.0f s", done, p.steps, total,
                     " ".join(f"{k} {v:.3f}" for k, v in losses.items()), rate, (p.steps - done) / rate)
        if done % p.checkpoint_every == 0 and done < p.steps:
            PT.save_progress(partial, model, optimizer, done)
        if stop_after is not None and done >= stop_after:  # tests: an interruption at a known step
            PT.save_progress(partial, model, optimizer, done)
            return {"stopped_at": done}

    # 3. Quality on fresh examples, then the checkpoint, swapped in whole.
    model.eval()
    train_prompts = [world.compose(c, random.Random(i), toy.held_out_fraction) for i, c in enumerate(world.CATEGORIES * 20)]
    quality = {"answer_accuracy": PT.answer_accuracy(model, corpus, train_prompts, p.seed),
               "held_out_answer_accuracy": PT.answer_accuracy(
                   model, corpus, world.eval_prompts(60, toy.held_out_fraction, seed=99), p.seed)}
    if corpus.style == "exhaustive":  # the new question alone: is the total counted right?
        quality["total_answer_accuracy"] = PT.answer_accuracy(model, corpus, train_prompts, p.seed, kinds=("total",))
    log.info("pretrained in %.0f s: %s", time.time() - t0, quality)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, tokenizer, world.codec(), FusionSpec())
    record = {"key": PT.cache_key(toy, examples), "losses": losses, "quality": quality,
              "seconds": round(time.time() - t0, 1), "parameters": n_params}
    (tmp / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, out)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("wrote the pretrained toy LMM to %s", out)
    return {"steps": p.steps, **quality}


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main("pretrain"))
