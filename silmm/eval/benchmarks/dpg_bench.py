"""DPG-Bench (Hu et al., ELLA; github.com/TencentQQGYLab/ELLA, ``dpg_bench/``): 1,065 dense prompts, each
with yes/no questions that depend on one another; four images per prompt, tiled as one 2x2 grid.

Reading: ``dpg_bench/prompts/{item_id}.txt`` (the ELLA repository root or its ``dpg_bench`` folder may be
given) and, when present, ``dpg_bench.csv`` with the columns compute_dpg_bench.py reads: ``item_id,
proposition_id, dependency`` ("0" = no parent, else comma-separated parent ids), ``tuple`` (its text before
"(" is the question's category, e.g. "entity - whole"; the part before "-" is the level-1 category) and
``question_natural_language``. A prompt's id is its item_id (the file name without ".txt", which is also how
the official script finds an image's questions: ``basename.split('.')[0]``). A prompt file without questions in
the CSV, and CSV items without a prompt file, are skipped and said. Without a CSV the prompts carry no questions
(said) and a scorer's own questions decide.

Export: ``{item_id}.png``, the prompt's images tiled as compute_dpg_bench.py crops them: image 0 top-left,
1 top-right, 2 bottom-left, 3 bottom-right, each tile square with side = the script's ``--resolution``. Fewer
than four images leave black tiles; run the script with ``--pic-num`` = images per prompt.

Scoring (compute_dpg_bench.py): a question scores 1 when answered "yes"; then, question by question in CSV
order, a question with a parent scoring 0 is set to 0 (parent gating, on the already-gated values). Tile score =
mean over the prompt's questions; prompt score = mean over its tiles; DPG-Bench score = mean over prompts.
Category scores follow the script exactly, including what its issue #60 reports: they use the un-gated answers
of the last tile only. ``per_category_all_images`` gives the same over every image. Unlike the script, silmm
keeps the CSV's first data row (the script's ``if i == 0: continue``, ELLA issue #61).
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from silmm.eval.benchmarks.common import (
    check_answers,
    check_images,
    check_name,
    fresh_export,
    mean,
    read_text,
    rel,
    save_png,
    say,
)
from silmm.eval.records import Benchmark, BenchmarkError, BenchmarkPrompt, BenchmarkQuestion, ImageAnswers

CATEGORIES = ("global", "entity", "attribute", "relation", "other")  # ELLA's DPG-Bench table order
CSV_COLUMNS = ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")
GRID_TILES = 4  # 2 x 2


def origin(item_id: str) -> str:
    """The prompt collection an item comes from, by its id's letters ("partiprompts97" -> "partiprompts")."""
    return re.sub(r"[\d_]+$", "", item_id)


def level1(category: str) -> str:
    """compute_dpg_bench.py's level-1 category: the part of the level-2 category before "-"."""
    return category.split("-")[0].strip()


def tile_origins(side: int) -> list[tuple[int, int]]:
    """(x, y) of each tile's top-left corner, in the order compute_dpg_bench.py crops them."""
    return [(0, 0), (side, 0), (0, side), (side, side)]


def make_grid(images: np.ndarray) -> np.ndarray:
    """Up to four square images [N, S, S, 3] -> one [2S, 2S, 3] grid (missing tiles black)."""
    n, h, w, _ = images.shape
    grid = np.zeros((2 * h, 2 * w, 3), np.uint8)
    for img, (x, y) in zip(images, tile_origins(h), strict=False):
        grid[y:y + h, x:x + w] = img
    return grid


def gate(questions: Sequence[BenchmarkQuestion], correct: Sequence[float]) -> list[float]:
    """Parent gating as compute_dpg_bench.py does it: in question order, a question whose parent scores 0
    (after that parent's own gating, when the parent came earlier) scores 0."""
    scores = {q.id: float(c) for q, c in zip(questions, correct, strict=True)}
    for q in questions:
        if any(scores[p] == 0 for p in q.parents):
            scores[q.id] = 0.0
    return [scores[q.id] for q in questions]


def _int(value: str, what: str, where: str) -> int:
    try:
        f = float(value.strip())
    except ValueError:
        raise BenchmarkError(f"{where}: {what} {value!r} is not a number") from None
    if not f.is_integer():
        raise BenchmarkError(f"{where}: {what} {value!r} is not an integer")
    return int(f)


class DPGBench(Benchmark):
    name = "dpg_bench"
    display = "DPG-Bench"
    default_images = 4
    categories = CATEGORIES
    category_titles = {c: c.capitalize() for c in CATEGORIES}
    official_commands = """\
# DPG-Bench (github.com/TencentQQGYLab/ELLA, dpg_bench/); run from the ELLA repository root, EXPORT=<this export>
# SIDE = the side of one tile in pixels (the export's grids are 2*SIDE square), PIC_NUM = images per prompt (4)
PIC_NUM=4 bash dpg_bench/dist_eval.sh $EXPORT $SIDE
# = accelerate launch --num_machines 1 --num_processes 8 --multi_gpu --mixed_precision fp16 \\
#     dpg_bench/compute_dpg_bench.py --image-root-path $EXPORT --resolution $SIDE --pic-num 4 --vqa-model mplug
# It prints "DPG-Bench score" and the L1/L2 category scores (x100) and writes dpg-bench_<time>_results.txt
# (+ _detail.txt) into $EXPORT itself; a later run lists those files too and reports them as failed images.
"""

    def read(self, root: Path) -> list[BenchmarkPrompt]:
        root = Path(root)
        self.notes = []
        if (root / "dpg_bench" / "prompts").is_dir():
            base = root / "dpg_bench"
        elif (root / "prompts").is_dir():
            base = root
        else:
            raise BenchmarkError(f"{root}: no DPG-Bench prompts found; looked for dpg_bench/prompts/ and prompts/")
        prompt_dir = base / "prompts"
        files = sorted(prompt_dir.iterdir(), key=lambda f: f.name)
        texts: dict[str, tuple[str, str]] = {}  # item_id -> (text, source)
        others = 0
        for f in files:
            if not (f.is_file() and f.suffix == ".txt"):
                others += 1
                continue
            source = rel(f, root)
            item_id = f.name[: -len(".txt")]
            if "." in item_id:
                raise BenchmarkError(f"{source}: item id {item_id!r} holds a '.'; compute_dpg_bench.py finds an "
                                     "image's questions by the name before the first '.'")
            text = read_text(f, root).strip()
            if not text:
                raise BenchmarkError(f"{source}:1: empty prompt")
            texts[item_id] = (text, source)
        if not texts:
            raise BenchmarkError(f"{rel(prompt_dir, root)}: no prompt files (*.txt)")
        if others:
            say(self.notes, f"{rel(prompt_dir, root)}: {others} entr(y/ies) that are not .txt files ignored")

        csv_path = base / "dpg_bench.csv"
        if not csv_path.is_file():
            say(self.notes, f"{rel(csv_path, root)} not found: prompts carry no DPG questions "
                            "(a scorer's own questions decide; not the DPG-Bench score)")
            return [BenchmarkPrompt(benchmark=self.name, id=i, text=t, category="dpg", subcategory=origin(i),
                                    source=s) for i, (t, s) in texts.items()]

        questions = self._read_csv(csv_path, root)
        prompts = []
        no_questions = [i for i in texts if i not in questions]
        for item_id, (text, source) in texts.items():
            if item_id in questions:
                prompts.append(BenchmarkPrompt(benchmark=self.name, id=item_id, text=text, category="dpg",
                                               subcategory=origin(item_id), source=source,
                                               questions=tuple(questions[item_id])))
        if no_questions:
            say(self.notes, f"{len(no_questions)} prompt file(s) without questions in {rel(csv_path, root)} "
                            f"skipped (not scorable by DPG-Bench): " + ", ".join(no_questions[:10]) +
                            (" ..." if len(no_questions) > 10 else ""))
        orphans = [i for i in questions if i not in texts]
        if orphans:
            say(self.notes, f"{len(orphans)} item(s) of {rel(csv_path, root)} without a prompt file skipped: "
                            + ", ".join(orphans[:10]) + (" ..." if len(orphans) > 10 else ""))
        if not prompts:
            raise BenchmarkError(f"{rel(csv_path, root)}: no item matches a prompt file in {rel(prompt_dir, root)}")
        return prompts

    def _read_csv(self, path: Path, root: Path) -> dict[str, list[BenchmarkQuestion]]:
        name = rel(path, root)
        reader = csv.DictReader(io.StringIO(read_text(path, root), newline=""))
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(f"{name}:1: missing column(s) {', '.join(missing)}")
        items: dict[str, list[BenchmarkQuestion]] = {}
        item_line: dict[str, int] = {}
        previous = None
        try:
            for row in reader:
                where = f"{name}:{reader.line_num}"
                if None in row or any(row[c] is None for c in CSV_COLUMNS):
                    raise BenchmarkError(f"{where}: wrong number of fields")
                item = row["item_id"].strip()
                if not item:
                    raise BenchmarkError(f"{where}: empty item_id")
                if item != previous and item in items:
                    raise BenchmarkError(f"{where}: rows of item {item!r} are not consecutive (first at line "
                                         f"{item_line[item]}); compute_dpg_bench.py would drop the earlier ones")
                qid = _int(row["proposition_id"], "proposition_id", where)
                deps = [_int(d, "dependency", where) for d in row["dependency"].split(",")]
                questions = items.setdefault(item, [])
                item_line.setdefault(item, reader.line_num)
                if any(q.id == str(qid) for q in questions):
                    raise BenchmarkError(f"{where}: duplicate proposition_id {qid} for item {item!r}")
                text = row["question_natural_language"].strip()
                if not text:
                    raise BenchmarkError(f"{where}: empty question")
                questions.append(BenchmarkQuestion(
                    id=str(qid), text=text, answer="yes", parents=tuple(str(d) for d in deps if d != 0),
                    category=row["tuple"].split("(")[0].strip()))
                previous = item
        except csv.Error as e:
            raise BenchmarkError(f"{name}:{reader.line_num}: malformed CSV ({e})") from None
        if not items:
            raise BenchmarkError(f"{name}: no questions")
        for item, questions in items.items():
            ids = {q.id for q in questions}
            for q in questions:
                dangling = [p for p in q.parents if p not in ids]
                if dangling:
                    raise BenchmarkError(f"{name}:{item_line[item]}: item {item!r} question {q.id} depends on "
                                         f"missing question(s) {', '.join(dangling)}")
        return items

    def export(self, out_dir: Path, prompts: Sequence[BenchmarkPrompt],
               images: Callable[[BenchmarkPrompt], np.ndarray]) -> None:
        n_images: int | None = None
        with fresh_export(Path(out_dir)) as tmp:
            for p in prompts:
                arr = check_images(p, images(p), n_images)
                n_images, h, w = arr.shape[:3]
                if n_images > GRID_TILES:
                    raise BenchmarkError(f"{p.benchmark} {p.id}: {n_images} images do not fit DPG-Bench's 2x2 grid")
                if h != w:
                    raise BenchmarkError(f"{p.benchmark} {p.id}: images are {h}x{w}; compute_dpg_bench.py crops "
                                         "square tiles of side --resolution")
                save_png(make_grid(arr), tmp / check_name(f"{p.id}.png", p))

    def aggregate(self, prompts: Sequence[BenchmarkPrompt], answers: Mapping[str, Sequence[ImageAnswers]]) -> dict:
        prompt_scores: list[float] = []
        last_l1: dict[str, list[float]] = defaultdict(list)
        last_l2: dict[str, list[float]] = defaultdict(list)
        all_l1: dict[str, list[float]] = defaultdict(list)
        without = 0
        for p in prompts:
            images = check_answers(p, answers, need_questions=True)
            if not p.questions:  # no dpg_bench.csv: the scorer's own answers, not a DPG-Bench number
                without += 1
                prompt_scores.append(mean([mean(img.correct) if img.correct else img.score for img in images]))
                continue
            tiles = [mean(gate(p.questions, img.correct)) for img in images]
            prompt_scores.append(mean(tiles))
            for q, c in zip(p.questions, images[-1].correct, strict=True):
                last_l1[level1(q.category)].append(float(c))
                last_l2[q.category].append(float(c))
            for img in images:
                for q, c in zip(p.questions, img.correct, strict=True):
                    all_l1[level1(q.category)].append(float(c))
        if not prompt_scores:
            raise BenchmarkError(f"{self.name}: nothing to aggregate (no prompts)")
        order = [c for c in CATEGORIES if c in last_l1] + sorted(set(last_l1) - set(CATEGORIES))
        notes = ["per_category follows compute_dpg_bench.py: un-gated answers of the last image only (ELLA issue "
                 "#60); per_category_all_images uses every image",
                 "every dpg_bench.csv row is scored; compute_dpg_bench.py skips the first data row (ELLA issue #61)"]
        if without:
            notes.append(f"{without} prompt(s) had no DPG questions: scored by the scorer's own questions")
        return {
            "overall": mean(prompt_scores),
            "per_category": {c: mean(last_l1[c]) for c in order},
            "tables": {"per_category_l2": {c: mean(v) for c, v in sorted(last_l2.items())},
                       "per_category_all_images": {c: mean(all_l1[c]) for c in order},
                       "prompts": {"scored": float(len(prompt_scores)), "without_questions": float(without)}},
            "notes": notes,
        }
