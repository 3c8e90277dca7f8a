"""GenEval (Ghosh et al.; github.com/djghosh13/geneval): 553 object-focused prompts in six tasks, four images
per prompt, judged by an object detector (Mask2Former) with a CLIP colour classifier.

Reading: ``prompts/evaluation_metadata.jsonl`` (the repository root or its ``prompts`` folder may be given), one
JSON object per line: ``tag`` (single_object, two_object, counting, colors, position, color_attr), ``prompt``,
``include`` (objects that must appear: ``class``, ``count`` = at least this many, optional ``color``, optional
``position`` = [relation, index of an earlier include]) and ``exclude`` (``class``, ``count`` = fewer than this
many). A prompt's id is its 0-based line index as "%05d" (the folder name the official generator writes); the
line's text is kept verbatim in ``metadata``.

Questions: GenEval has none; its judge is a detector (evaluation/evaluate_images.py). For a VQA judge silmm
translates each clause of the metadata into a yes/no question whose expected answer is "yes" (silmm's
translation, not part of GenEval): "Is there a dog?", "Are there exactly three dogs?" (an include of n with an
exclude of n + 1, GenEval's counting prompts), "Are there at least two dogs?", "Is the dog red?",
"Is the dog to the left of the cat?" (``left of`` / ``right of`` / ``above`` / ``below`` of the include it
points to), "Is there no dog?" / "Are there fewer than three dogs?" for other excludes.

Export: ``<index:05>/metadata.jsonl`` (the metadata line verbatim) and ``<index:05>/samples/<NNNN>.png``, the
layout of the repository's README (its generator writes 5-digit sample names; evaluate_images.py takes any
``\\d+\\.png``).

Scoring (evaluation/summary_scores.py): an image is correct when every clause holds (here: every question
answered "yes"); a task's score is the fraction of its images that are correct; the GenEval score is the mean
of the task scores.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from silmm.eval.benchmarks.common import (
    check_answers,
    check_images,
    first_existing,
    fresh_export,
    mean,
    rel,
    save_png,
    say,
    text_lines,
)
from silmm.eval.records import Benchmark, BenchmarkError, BenchmarkPrompt, BenchmarkQuestion, ImageAnswers

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CATEGORY_TITLES = {"single_object": "Single object", "two_object": "Two object", "counting": "Counting",
                   "colors": "Colors", "position": "Position", "color_attr": "Color attribution"}
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def with_article(name: str) -> str:
    """GenEval's article rule (prompts/create_prompts.py)."""
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def plural(name: str) -> str:
    """GenEval's plural rule (prompts/create_prompts.py)."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def number(n: int) -> str:
    return NUMBERS[n] if 0 <= n < len(NUMBERS) else str(n)


def questions_from_metadata(meta: dict, where: str = "") -> tuple[BenchmarkQuestion, ...]:
    """silmm's yes/no translation of one GenEval metadata record (see the module docstring)."""
    include = meta.get("include", [])
    exclude = meta.get("exclude", [])
    if not isinstance(include, list) or not isinstance(exclude, list):
        raise BenchmarkError(f"{where}: include and exclude should be lists")
    texts: list[str] = []
    used_excludes: set[int] = set()
    for k, req in enumerate(include):
        cls, count = _clause(req, f"{where}: include[{k}]")
        exact = next((e for e, ex in enumerate(exclude)
                      if isinstance(ex, dict) and ex.get("class") == cls and ex.get("count") == count + 1), None)
        if exact is not None:
            used_excludes.add(exact)
            texts.append(f"Is there exactly one {cls}?" if count == 1
                         else f"Are there exactly {number(count)} {plural(cls)}?")
        elif count == 1:
            texts.append(f"Is there {with_article(cls)}?")
        else:
            texts.append(f"Are there at least {number(count)} {plural(cls)}?")
        if "color" in req:
            color = req["color"]
            if not isinstance(color, str) or not color:
                raise BenchmarkError(f"{where}: include[{k}]: color should be a non-empty string")
            texts.append(f"Is the {cls} {color}?" if count == 1 else f"Are the {plural(cls)} {color}?")
        if "position" in req:
            pos = req["position"]
            if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < k):
                raise BenchmarkError(f"{where}: include[{k}]: position should be [relation, index of an earlier "
                                     f"include] with relation in {sorted(RELATIONS)}, found {pos!r}")
            target = include[pos[1]]["class"]
            verb = "Is the" if count == 1 else "Are the"
            subject = cls if count == 1 else plural(cls)
            texts.append(f"{verb} {subject} {RELATIONS[pos[0]]} the {target}?")
    for e, req in enumerate(exclude):
        cls, count = _clause(req, f"{where}: exclude[{e}]")
        if e in used_excludes:
            continue
        texts.append(f"Is there no {cls}?" if count == 1 else f"Are there fewer than {number(count)} {plural(cls)}?")
    return tuple(BenchmarkQuestion(id=f"q{i}", text=t, answer="yes") for i, t in enumerate(texts))


def _clause(req: object, where: str) -> tuple[str, int]:
    if not isinstance(req, dict):
        raise BenchmarkError(f"{where}: expected an object, found {type(req).__name__}")
    cls, count = req.get("class"), req.get("count")
    if not isinstance(cls, str) or not cls:
        raise BenchmarkError(f"{where}: class should be a non-empty string")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise BenchmarkError(f"{where}: count should be a positive integer, found {count!r}")
    return cls, count


def image_correct(img: ImageAnswers) -> bool:
    """GenEval's per-image verdict: every clause holds (every question answered as expected)."""
    return all(c == 1.0 for c in img.correct)


class GenEval(Benchmark):
    name = "geneval"
    display = "GenEval"
    default_images = 4
    categories = CATEGORIES
    category_titles = CATEGORY_TITLES
    official_commands = """\
# GenEval (github.com/djghosh13/geneval, README "Evaluation"); run from the geneval repository, EXPORT=<this export>
python evaluation/evaluate_images.py "$EXPORT" --outfile "$EXPORT/../geneval_results/results.jsonl" \\
    --model-path "<OBJECT_DETECTOR_FOLDER>"
(cd evaluation && python summary_scores.py "$EXPORT/../geneval_results/results.jsonl")
# summary_scores.py opens object_names.txt from the working directory, hence the cd; it prints the per-task
# scores and "Overall score (avg. over tasks)".
"""

    def read(self, root: Path) -> list[BenchmarkPrompt]:
        root = Path(root)
        self.notes = []
        path = first_existing(root, ["prompts/evaluation_metadata.jsonl", "evaluation_metadata.jsonl"],
                              "GenEval metadata (prompts/evaluation_metadata.jsonl)")
        source = rel(path, root)
        prompts = []
        for line_no, line in text_lines(path, root):
            where = f"{source}:{line_no}"
            if not line.strip():
                raise BenchmarkError(f"{where}: blank line (diffusers_generate.py numbers prompts by line, and "
                                     "json.loads fails on it)")
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(meta, dict):
                raise BenchmarkError(f"{where}: expected a JSON object")
            tag, text = meta.get("tag"), meta.get("prompt")
            if not isinstance(tag, str) or not tag:
                raise BenchmarkError(f"{where}: missing tag")
            if not isinstance(text, str) or not text.strip():
                raise BenchmarkError(f"{where}: missing prompt")
            if not meta.get("include") and not meta.get("exclude"):
                raise BenchmarkError(f"{where}: no include or exclude clauses")
            prompts.append(BenchmarkPrompt(
                benchmark=self.name, id=f"{line_no - 1:05d}", text=text, category=tag, source=source,
                line=line_no, questions=questions_from_metadata(meta, where), metadata=line))
        if not prompts:
            raise BenchmarkError(f"{source}: no prompts")
        unknown = sorted({p.category for p in prompts} - set(CATEGORIES))
        if unknown:
            say(self.notes, f"{source}: tags beyond GenEval's six: {', '.join(unknown)}")
        return prompts

    def export(self, out_dir: Path, prompts: Sequence[BenchmarkPrompt],
               images: Callable[[BenchmarkPrompt], np.ndarray]) -> None:
        with fresh_export(Path(out_dir)) as tmp:
            for p in prompts:
                if not p.metadata:
                    raise BenchmarkError(f"{p.benchmark} {p.id}: no metadata line to export")
                folder = tmp / p.id
                folder.mkdir()
                (folder / "metadata.jsonl").write_text(p.metadata, encoding="utf-8")
                for j, img in enumerate(check_images(p, images(p))):
                    save_png(img, folder / "samples" / f"{j:04d}.png")

    def aggregate(self, prompts: Sequence[BenchmarkPrompt], answers: Mapping[str, Sequence[ImageAnswers]]) -> dict:
        by_tag: dict[str, list[float]] = defaultdict(list)
        images_correct, prompts_correct = [], []
        for p in prompts:
            images = check_answers(p, answers, need_questions=True)
            verdicts = [float(image_correct(img)) for img in images]
            by_tag[p.category].extend(verdicts)
            images_correct.extend(verdicts)
            prompts_correct.append(float(any(verdicts)))
        if not by_tag:
            raise BenchmarkError(f"{self.name}: nothing to aggregate (no prompts)")
        order = [c for c in CATEGORIES if c in by_tag] + sorted(set(by_tag) - set(CATEGORIES))
        per_tag = {t: mean(by_tag[t]) for t in order}
        return {
            "overall": mean(list(per_tag.values())),
            "per_category": per_tag,
            "tables": {"summary": {"correct_images": mean(images_correct), "correct_prompts": mean(prompts_correct),
                                   "images": float(len(images_correct)), "prompts": float(len(prompts_correct))},
                       "images_per_task": {t: float(len(by_tag[t])) for t in order}},
            "notes": ["GenEval's judge is an object detector; with a VQA scorer an image is correct when every "
                      "question silmm derives from its metadata is answered yes (silmm's translation)"],
        }
