"""Benchmark evaluation -- one shard of one benchmark for one iteration's model: draw, score, store.

Reads   the benchmark's prompts (eval.benchmarks.<name>: a local copy of its files, read by
        silmm/eval/benchmarks/<name>.py with every id, category, source line and question kept); the model
        iteration K ends with (iteration 0: the base model at model.path; K: iter_K/model); for the `self`
        scorer the judge (that model, or the base model with feedback.judge=base)
Writes  eval/<benchmark>/iter_KK/shard_NNNNN.h5 (stage "eval", schema in shards/README.md): per prompt its
        benchmark record and questions, N images (PNG) with their seeds, and the scorer's answers per image;
        the shard records the eval hash (settings, scorer, models, the benchmark's content): a shard with
        another eval hash is not done, and is redone
The story: plan the shard (which prompts, N images each), check every prompt against the model's real
context (an overlong one is an error naming its benchmark id, unless overlong=truncate), then, group by group
(as many prompts as fill one batch of images), draw the images with the model's own generation (a continuous
model without DropDiv, as the paper evaluates) and decode them with seeds fixed per (run seed,
benchmark, benchmark id, image index) -- the same for every iteration -- score them, and add the rows to the
resumable writer. A killed task resumes after the last flushed group and writes what an uninterrupted one
writes. A finished shard of the same images under another scorer is re-scored from its stored images, not
drawn again. When every shard is done, jobs/eval_results.py aggregates and exports.
Run directly: python -m jobs.eval --run RUN --iteration K --benchmark NAME --shard I
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from silmm.eval import stage as E
from silmm.eval.scorers import ScorerContext, get_scorer
from silmm.images import from_png, to_png
from silmm.models import load_backend
from silmm.rundir import RunDir
from silmm.tasks import open_writer, progress

log = logging.getLogger("jobs.eval")


def run(run: RunDir, iteration: int, shard: int, benchmark: str) -> dict[str, Any]:
    cfg = run.config
    plan = E.plan(run, iteration, benchmark)
    items = plan.shard_items(shard)
    eval_hash, images_hash = plan.eval_hash(), plan.images_hash()
    path = plan.shard_path(shard)
    stored = E.reusable_images(plan, shard, images_hash)  # same images, other scorer: score them again only
    E.reset_stale_progress(path.with_name(path.name + ".progress"), eval_hash)
    writer = open_writer(run, iteration, "eval", shard, plan.shard_count, path=path, flush_every=plan.flush_every())
    g = plan.group_size()
    groups = [items[i:i + g] for i in range(0, len(items), g)]  # fixed within the shard: resumes batch alike
    todo = [[(k, p) for k, p in group if k not in writer.done] for group in groups]
    todo = [group for group in todo if group]
    n = plan.images_per_prompt
    truncated = 0
    if todo:
        backend = load_backend(run, iteration + 1)  # the model iteration K ends with is iteration K+1's start
        model_text = dict(zip([k for k, _ in items],
                              E.fit_to_context(backend, [p for _, p in items], plan.settings.overlong), strict=True))
        truncated = sum(model_text[k] != p.text for k, p in items)
        scorer = get_scorer(plan.settings.scorer, ScorerContext(run, iteration, backend))
        log.info("%s iteration %d shard %d: %d of %d prompts to do, %d images each, scorer %s", benchmark,
                 iteration, shard, sum(map(len, todo)), len(items), n, plan.settings.scorer)
        for group in progress(todo, len(todo), f"eval {benchmark} iter {iteration} shard {shard}", cfg.logging.progress):
            jobs = [(k, p, j) for k, p in group for j in range(n)]
            seeds = [plan.seeds(p, j) for _, p, j in jobs]
            images = []
            if all(p.id in stored for _, p in group):
                images = [from_png(png, f"{plan.shard_path(shard)}: prompt {p.id}") for _, p in group
                          for png in stored[p.id]]
            for b in range(0, len(jobs) if not images else 0, cfg.eval.batch_size):
                batch = slice(b, b + cfg.eval.batch_size)
                z = backend.generate([model_text[k] for k, _, _ in jobs[batch]], [s for s, _ in seeds[batch]])
                images.extend(backend.decode(z, [d for _, d in seeds[batch]]))
            per_prompt = [np.stack(images[i * n:(i + 1) * n]) for i in range(len(group))]
            answers = scorer.score([p for _, p in group], per_prompt)
            records = [E.shard_record(k, p, model_text[k], seeds[i * n:(i + 1) * n], [to_png(im) for im in per_prompt[i]],
                                      answers[i]) for i, (k, p) in enumerate(group)]
            with E.signals_deferred():  # a preemption flush lands between groups
                for (k, _), record in zip(group, records, strict=True):
                    writer.add(k, record)
    writer.meta.extra.update(plan.settings_record(), eval_hash=eval_hash, images_hash=images_hash,
                             model=str(plan.model_dir()))
    path = writer.finish()
    log.info("wrote %d prompts x %d images of %s to %s", len(items), n, benchmark, path)
    return {"benchmark": benchmark, "prompts": len(items), "computed": sum(map(len, todo)),
            "images": sum(map(len, todo)) * n, "truncated": truncated}


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main("eval", benchmark=True))
