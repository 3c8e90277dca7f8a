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
With model.backend: dream it pretrains the continuous toy LMM instead (:func:`run_continuous`, silmm/toy/
continuous.py): the same story in the dream backend's layout, with a VAE phase first and image captions.
Run directly: python -m jobs.pretrain --run RUN --iteration 0 --shard 0
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from silmm.backends.dream import save_checkpoint as save_dream_checkpoint
from silmm.backends.fusion import FusionSpec, save_checkpoint
from silmm.config import Backend
from silmm.progress import task_recorder
from silmm.questions import load_examples
from silmm.rundir import RunDir
from silmm.toy import pretrain as PT
from silmm.toy import world

log = logging.getLogger("jobs.pretrain")


def run(run: RunDir, iteration: int, shard: int, stop_after: int | None = None) -> dict[str, Any]:
    if run.config.model.backend is Backend.dream:  # the continuous toy: its own story, below
        return run_continuous(run, stop_after)
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
    PT.publish(out, partial, lambda tmp: save_checkpoint(tmp, model, tokenizer, world.codec(), FusionSpec()),
               {"key": PT.cache_key(toy, examples), "losses": losses, "quality": quality,
                "seconds": round(time.time() - t0, 1), "parameters": n_params})
    log.info("wrote the pretrained toy LMM to %s", out)
    return {"steps": p.steps, **quality}


def run_continuous(run: RunDir, stop_after: int | None = None) -> dict[str, Any]:
    """The continuous toy LMM (silmm/toy/continuous.py): phase 1 teaches the VAE the cell codes, phase 2 the
    LLaVA model, dream queries, projector and UNet together; progress covers both phases."""
    from silmm.toy import continuous as TC

    cfg, toy = run.config, run.config.toy
    p, c = toy.pretrain, toy.continuous
    out = Path(cfg.model.path)
    partial = out.with_name(out.name + ".partial")
    if p.threads:
        torch.set_num_threads(p.threads)

    # 1. Processor, modules (as the dream backend that will run them), optimizer; progress, if any.
    examples = load_examples(cfg.questions.icl_examples)
    processor = TC.build_processor(examples, PT.style(toy))
    lmm, head, head_cfg, unet, vae, scheduler = TC.build_models(processor, toy, p.seed)
    backend = TC.backend_of(processor, lmm, head, head_cfg, unet, vae, scheduler, out)
    modules = torch.nn.ModuleDict({"lmm": lmm, "head": head, "unet": unet, "vae": vae}).requires_grad_(True)
    main = [*lmm.parameters(), *head.parameters(), *unet.parameters()]
    optimizer = torch.optim.AdamW([{"params": list(vae.parameters()), "lr": c.vae_lr}, {"params": main, "lr": p.lr}],
                                  betas=(0.9, 0.98), weight_decay=0.01)
    start = PT.load_progress(partial, modules, optimizer)
    vae.requires_grad_(start < c.vae_steps)  # phase 2 keeps the VAE as phase 1 left it, resumed or not
    corpus = TC.Corpus(processor, toy, examples, PT.style(toy))
    yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    total = c.vae_steps + p.steps
    log.info("pretraining a continuous toy LMM (LLaVA %.2fM, UNet %.2fM, VAE %.2fM parameters) for %d + %d steps, "
             "from step %d -> %s", *(sum(x.numel() for x in m.parameters()) / 1e6 for m in (lmm, unet, vae)),
             c.vae_steps, p.steps, start, out)

    # 2. The loop. Phase 1 (VAE): designed codes <-> renderings. Phase 2: the four kinds of batch per step
    #    (questions are long and easy: a quarter of a batch; captions: half).
    t0, losses = time.time(), {}
    record = task_recorder("steps", total, start)
    for step in range(start, total):
        if step < c.vae_steps:
            optimizer.param_groups[0]["lr"] = PT.lr_at(step, c.vae_lr, 20, c.vae_steps)
            loss = TC.autoencoder_loss(vae, p.batch_size, p.seed, step)
            loss.backward()
            losses = {"vae": loss.item()}
        else:
            if step == c.vae_steps:
                vae.requires_grad_(False)
            k = step - c.vae_steps
            optimizer.param_groups[1]["lr"] = PT.lr_at(k, p.lr, p.warmup_steps, p.steps)
            generator = torch.Generator().manual_seed(k + 1_000_003 * p.seed)
            parts = {"generate": TC.diffusion_loss(backend, *corpus.generate(2 * p.batch_size, p.seed, k), generator),
                     "answer": TC.answer_loss(lmm, *corpus.answer(p.batch_size, p.seed, k), yes, no)}
            ids, mask, labels = corpus.questions(max(p.batch_size // 4, 1), p.seed, k)
            parts["questions"] = lmm(input_ids=ids, attention_mask=mask, labels=labels).loss
            parts["caption"] = lmm(**TC.caption_batch(corpus, max(p.batch_size // 2, 1), p.seed, k)).loss
            (sum(parts.values()) + (c.generate_weight - 1) * parts["generate"]).backward()
            losses = {name: v.item() for name, v in parts.items()}
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record.update(done)
        if done % 50 == 0 or done == total:
            rate = (done - start) / (time.time() - t0)
            log.info("step %d/%d  %s  %.1f steps/s, eta %.0f s", done, total,
                     " ".join(f"{k} {v:.3f}" for k, v in losses.items()), rate, (total - done) / rate)
        if (done % p.checkpoint_every == 0 and done < total) or (stop_after is not None and done >= stop_after):
            PT.save_progress(partial, modules, optimizer, done)
            if stop_after is not None and done >= stop_after:  # tests: an interruption at a known step
                return {"stopped_at": done}

    # 3. Quality on fresh images (the scores stage's own yes/no path), then the checkpoint, swapped in whole.
    modules.requires_grad_(False)
    train_prompts = [world.compose(k, random.Random(i), toy.held_out_fraction) for i, k in enumerate(world.CATEGORIES * 20)]
    quality = {"answer_accuracy": TC.answer_accuracy(backend, train_prompts, PT.style(toy), p.seed),
               "held_out_answer_accuracy": TC.answer_accuracy(
                   backend, world.eval_prompts(60, toy.held_out_fraction, seed=99), PT.style(toy), p.seed),
               "vae_cell_accuracy": TC.vae_cell_accuracy(vae, p.seed)}
    log.info("pretrained in %.0f s: %s", time.time() - t0, quality)
    PT.publish(out, partial, lambda tmp: save_dream_checkpoint(tmp, processor, lmm, head, head_cfg, unet, vae,
                                                               scheduler),
               {"key": PT.cache_key(toy, examples, continuous=True), "losses": losses, "quality": quality,
                "seconds": round(time.time() - t0, 1)})
    log.info("wrote the pretrained continuous toy LMM to %s", out)
    return {"steps": total, **quality}


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main("pretrain"))
