"""Toy evaluation -- one job after each iteration (and one before the first): the exact oracle on held-out prompts.

Reads   the iteration's model (iteration 0: the pretrained toy LMM at model.path; K: iter_K/model),
        config `toy.*` (held-out split, prompts and samples per prompt), `questions.icl_examples`
Writes  eval/iter_KK.json          oracle alignment overall and per category, sub-scores, agreement of
                                   the model's self-feedback with the oracle, per-prompt results
        eval/iter_KK_images.npz    the images of the grid prompts (uint8, loaded without pickle)
        report/                    the run's report, regenerated from every eval file present
The story: draw images for the fixed held-out prompts with seeds shared by every iteration, score them with
the oracle and with the model's own questions and answers, write the results, then rebuild the report.
Run directly: python -m jobs.evaluate --run RUN --iteration K --shard 0
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

import numpy as np

from silmm.config import DecoderNoise
from silmm.fsutil import atomic_write_text
from silmm.models import load_backend, load_judge, separate_judge
from silmm.questions import load_examples
from silmm.rundir import RunDir
from silmm.seeding import fixed_decode_seed
from silmm.toy import evaluate as E
from silmm.toy import report, world

log = logging.getLogger("jobs.evaluate")


def run(run: RunDir, iteration: int, shard: int) -> dict[str, Any]:
    cfg, toy = run.config, run.config.toy
    prompts = world.eval_prompts(toy.eval_prompts, toy.held_out_fraction)
    backend = load_backend(run, iteration + 1)  # the model iteration K ends with is iteration K+1's start
    judge = load_judge(run, iteration + 1) if separate_judge(cfg) else backend  # who scores next
    log.info("evaluating iteration %d on %d held-out prompts x %d samples", iteration, len(prompts), toy.eval_samples)

    results, images = E.evaluate_prompts(backend, prompts, toy.eval_samples, cfg.run.seed, cfg.sampling.batch_size,
                                         load_examples(cfg.questions.icl_examples), cfg.questions.max_questions,
                                         cfg.questions.max_new_tokens, judge=judge, style=toy.question_style.value,
                                         decode_seed=fixed_decode_seed(cfg.run.seed)
                                         if cfg.sampling.decoder_noise is DecoderNoise.fixed else None)
    summary = {"iteration": iteration, **E.summarize(results), "prompts": len(prompts), "samples": toy.eval_samples,
               "results": [asdict(r) for r in results]}

    out = report.eval_path(run, iteration)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = prompts[:toy.grid_prompts]
    tmp = out.with_name(out.stem + "_images.tmp.npz")
    np.savez_compressed(tmp, prompts=np.array(grid), images=np.stack([images[p] for p in grid]))
    tmp.replace(out.with_name(out.stem + "_images.npz"))
    atomic_write_text(out, json.dumps(summary, indent=1) + "\n")  # last: marks the task done
    log.info("iteration %d: oracle alignment %.3f (%s), self/oracle pairwise agreement %.3f -> %s", iteration,
             summary["overall"], ", ".join(f"{k} {v:.3f}" for k, v in summary["per_category"].items()),
             summary["agreement_pairwise"], out)
    path = report.write_report(run)
    log.info("report: %s", path)
    return {k: v for k, v in summary.items() if k != "results"}


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main("evaluate"))
