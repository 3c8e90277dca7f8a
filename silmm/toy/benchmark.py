"""The toy world as a benchmark: the held-out prompts the toy evaluation scores, through the eval stage.

Prompts: ``world.eval_prompts(toy.eval_prompts, toy.held_out_fraction)`` (combinations never used for
pretraining or training), ids = the prompt's index ("0", "1", ...), categories color / numeracy / spatial.
Images per prompt default to ``toy.eval_samples``. Nothing is read from disk (``needs_path = False``); the
settings come from the run's config (``configure``).

Seeds (the one exception to the eval stage's rule): image j of prompt i is drawn and decoded with
``derive_seed(run seed, 0, i, j, "toy-eval")``, the seeds of the toy evaluation (silmm/toy/evaluate.py), so
that the stage draws exactly the images that evaluation drew and its numbers match it.

Scoring (aggregate): overall = mean over every image of the scorer's score (the oracle: 1 when every check
holds), per category the same over the category's images. With the oracle, the tables ``strict`` (nothing
beyond the named objects) and ``partial`` (share of checks that hold) follow the same rule.
Export: ``samples/{id:05d}_{j:02d}.png`` and ``prompts.jsonl`` (id, text, category, files); the toy world has
no official scorer to run on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from silmm.eval.benchmarks.common import check_images, fresh_export, save_png
from silmm.eval.records import Benchmark, BenchmarkError, BenchmarkPrompt, ImageAnswers
from silmm.seeding import derive_seed
from silmm.toy import world


class ToyBenchmark(Benchmark):
    name = "toy"
    display = "Toy world (held-out prompts)"
    categories = world.CATEGORIES
    official_commands = "The toy world has no official scorer: the `oracle` scorer is exact (silmm/toy/world.py)."
    needs_path = False

    def __init__(self) -> None:
        self.count, self.held_out_fraction, self.default_images = 96, 0.25, 4

    def configure(self, cfg) -> None:
        if not cfg.toy.enabled:
            raise BenchmarkError("the toy benchmark needs toy.enabled=true (the toy world's model and prompts)")
        self.count, self.held_out_fraction = cfg.toy.eval_prompts, cfg.toy.held_out_fraction
        self.default_images = cfg.toy.eval_samples

    def read(self, root: Path | None = None) -> list[BenchmarkPrompt]:
        texts = world.eval_prompts(self.count, self.held_out_fraction)
        return [BenchmarkPrompt(benchmark=self.name, id=str(i), text=t, category=world.parse_prompt(t).category)
                for i, t in enumerate(texts)]

    def image_seeds(self, run_seed: int, prompt: BenchmarkPrompt, j: int) -> tuple[int, int]:
        seed = derive_seed(run_seed, 0, int(prompt.id), j, "toy-eval")
        return seed, seed  # the toy evaluation decodes with the sampling seed

    def export(self, out_dir: Path, prompts: Sequence[BenchmarkPrompt],
               images: Callable[[BenchmarkPrompt], np.ndarray]) -> None:
        with fresh_export(Path(out_dir)) as tmp:
            lines = []
            for p in prompts:
                files = []
                for j, im in enumerate(check_images(p, images(p))):
                    name = f"samples/{int(p.id):05d}_{j:02d}.png"
                    save_png(im, tmp / name)
                    files.append(name)
                lines.append(json.dumps({"id": p.id, "text": p.text, "category": p.category, "files": files}))
            (tmp / "prompts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def aggregate(self, prompts: Sequence[BenchmarkPrompt], answers: Mapping[str, Sequence[ImageAnswers]]) -> dict:
        for p in prompts:
            if not answers.get(p.id):
                raise BenchmarkError(f"toy {p.id}: no answers for this prompt")

        def table(value: Callable[[ImageAnswers], float]) -> tuple[float, dict[str, float]]:
            # the same order and float64 means as silmm/toy/evaluate.py's summarize
            overall = float(np.mean([value(a) for p in prompts for a in answers[p.id]]))
            by_cat = {c: [value(a) for p in prompts if p.category == c for a in answers[p.id]] for c in world.CATEGORIES}
            return overall, {c: float(np.mean(v)) for c, v in by_cat.items() if v}

        overall, per_category = table(lambda a: a.score)
        out = {"overall": overall, "per_category": per_category, "tables": {}}
        for name in ("strict", "partial"):
            if all(name in a.extra for p in prompts for a in answers[p.id]):
                total, per = table(lambda a, k=name: a.extra[k])
                out["tables"][name] = {"overall": total, **per}
        return out
