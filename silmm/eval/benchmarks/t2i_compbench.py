"""T2I-CompBench++ (Huang et al.; github.com/Karine-Huang/T2I-CompBench): eight compositional categories of
validation prompts, 10 images per prompt, one expert scorer per category.

Reading: ``examples/dataset/{category}_val.txt`` (the repository root or the dataset folder itself may be given).
One prompt per line; like the official generator (``GORS_finetune/inference_eval.py``) the text is the part of the
line before the first tab. A prompt's id is ``{file stem}:{line}``, e.g. ``color_val:17``. Blank lines are
skipped and said. Complex prompts get the sub-category that the official 3-in-1 scorer (``3_in_1_eval/3_in_1.py``)
gives them: ``spatial`` when the prompt is in ``complex_val_spatial.txt``, ``action`` when in
``complex_val_action.txt``, otherwise ``spatial_action`` (matched as 3-in-1 does: the text before the first ".",
lower-cased).

Export (the layout every official scorer reads): one folder per category, named by the file stem, holding
``samples/{prompt}_{NNNNNN}.png``; NNNNNN counts images within the folder, prompt after prompt in file order,
as the official generator numbers them (3-in-1 relies on prompt i owning images 10*i .. 10*i+9).
The scorers take the prompt back from a name as ``name.split("_")[0]`` (BLIP_vqa.py, CLIP_similarity.py,
2D/3D_spatial_eval.py, numeracy_eval.py) and the number as ``name.split("_")[-1]`` (numeracy_eval.py and the
UniDet dataset even as ``name.split("_")[1]``), so a name must hold exactly one "_": a "_" inside a prompt
(and a "/", which no file name can hold) is written as a space, which is the closest text those scorers can
read back. ``silmm_export.json`` beside ``samples/`` maps every file to its prompt id and exact text.

Scoring in silmm (``aggregate``): an image's score is the BLIP-VQA rule of ``BLIPvqa_eval/BLIP_vqa.py``, the
product over its questions of the answer probability of "yes" (here p_yes / (p_yes + p_no)); a scorer without
yes/no probabilities (the toy oracle) gives its own per-image score. Category score = mean over the category's
images, as every official scorer averages its ``vqa_result.json``. The overall number (mean of the category
means) is not one the paper reports.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from silmm.eval.benchmarks.common import (
    check_answers,
    check_images,
    check_name,
    first_existing,
    fresh_export,
    mean,
    rel,
    save_png,
    say,
    text_lines,
)
from silmm.eval.records import Benchmark, BenchmarkError, BenchmarkPrompt, ImageAnswers

CATEGORIES = ("color", "shape", "texture", "spatial", "3d_spatial", "numeracy", "non_spatial", "complex")
CATEGORY_TITLES = {"color": "Color", "shape": "Shape", "texture": "Texture", "spatial": "2D-Spatial",
                   "3d_spatial": "3D-Spatial", "numeracy": "Numeracy", "non_spatial": "Non-Spatial",
                   "complex": "Complex"}
COMPLEX_SPLITS = ("complex_val_spatial.txt", "complex_val_action.txt")  # read by 3_in_1.py


def export_name(text: str) -> str:
    """The prompt part of an exported file name: the official scorers read ``name.split("_")[0]``."""
    return text.replace("_", " ").replace("/", " ")


def scorer_prompt(file_name: str) -> str:
    """What the official scorers read back from a sample's file name (the prompt; see the module docstring)."""
    return file_name.split("_")[0]


def scorer_index(file_name: str) -> int:
    """The image number the official scorers read from a file name (their question_id and sort key)."""
    return int(file_name.split("_")[-1].split(".")[0])


def complex_key(text: str) -> str:
    """How 3_in_1.py matches a complex prompt against its spatial / action lists."""
    return text.split(".")[0].lower()


def blip_product(img: ImageAnswers) -> float:
    """BLIP-VQA's per-image score: the product of P(yes) over the questions (p_yes / (p_yes + p_no) here, as a
    yes/no VQA answers only those two). Without yes/no probabilities: the scorer's own score."""
    p_yes = np.asarray(img.p_yes, np.float64)
    p_no = np.asarray(img.p_no, np.float64)
    if p_yes.size == 0 or not np.all(np.isfinite(p_yes)) or not np.all(np.isfinite(p_no)):
        return float(img.score)
    total = p_yes + p_no
    ratio = np.divide(p_yes, total, out=np.zeros_like(p_yes), where=total > 0)
    return float(np.prod(ratio))


class T2ICompBench(Benchmark):
    name = "t2i_compbench"
    display = "T2I-CompBench++"
    default_images = 10
    categories = CATEGORIES
    category_titles = CATEGORY_TITLES
    official_commands = """\
# T2I-CompBench++ (github.com/Karine-Huang/T2I-CompBench, its Readme "Evaluation"); EXPORT=<this export, absolute>
# BLIP-VQA, attribute binding:
cd T2I-CompBench/BLIPvqa_eval
for c in color_val shape_val texture_val; do python BLIP_vqa.py --out_dir=$EXPORT/$c/; done
#   -> $EXPORT/<c>/annotation_blip/vqa_result.json and blip_vqa_score.txt
# UniDet, 2D / 3D spatial and numeracy (run inside UniDet_eval; no trailing "/" for 3D: it names its depth
# folder after the last path component):
cd ../UniDet_eval
python 2D_spatial_eval.py --outpath=$EXPORT/spatial_val/      # -> labels/annotation_obj_detection_2d/
python 3D_spatial_eval.py --outpath=$EXPORT/3d_spatial_val     # -> labels/annotation_obj_detection_3d/
python numeracy_eval.py --outpath=$EXPORT/numeracy_val/       # -> annotation_num/
# CLIPScore, non-spatial:
cd .. && python CLIPScore_eval/CLIP_similarity.py --outpath=$EXPORT/non_spatial_val/   # -> annotation_clip/
# Complex: the three scorers on one folder, then 3-in-1 (pass --complex=True only here: argparse reads any
# non-empty value as True). 3_in_1.py reads annotation_obj_detection/, which 2D_spatial_eval.py writes as
# labels/annotation_obj_detection_2d/, so copy it across:
(cd BLIPvqa_eval && python BLIP_vqa.py --out_dir=$EXPORT/complex_val/)
(cd UniDet_eval && python 2D_spatial_eval.py --outpath=$EXPORT/complex_val/ --complex=True)
python CLIPScore_eval/CLIP_similarity.py --outpath=$EXPORT/complex_val/ --complex=True
mkdir -p $EXPORT/complex_val/annotation_obj_detection
cp $EXPORT/complex_val/labels/annotation_obj_detection_2d/vqa_result.json $EXPORT/complex_val/annotation_obj_detection/
(cd 3_in_1_eval && python 3_in_1.py --outpath=$EXPORT/complex_val/ --data_path=<T2I-CompBench>/examples/dataset)
# 3_in_1.py assumes the whole complex_val.txt with exactly 10 images per prompt (num=10 in the script).
"""

    def read(self, root: Path) -> list[BenchmarkPrompt]:
        root = Path(root)
        self.notes = []
        base = first_existing(root, ["examples/dataset/color_val.txt", "color_val.txt"],
                              "T2I-CompBench dataset (examples/dataset/color_val.txt)").parent
        missing = [f"{c}_val.txt" for c in CATEGORIES if not (base / f"{c}_val.txt").is_file()]
        missing += [f for f in COMPLEX_SPLITS if not (base / f).is_file()]
        if missing:
            raise BenchmarkError(f"{rel(base, root) or '.'}: missing " + ", ".join(missing) +
                                 " (the whole validation set and 3-in-1's complex splits are read)")
        splits = {}
        for split_file, sub in zip(COMPLEX_SPLITS, ("spatial", "action"), strict=True):
            splits[sub] = {complex_key(t) for _, t in text_lines(base / split_file, root) if t}
        prompts: list[BenchmarkPrompt] = []
        for cat in CATEGORIES:
            path = base / f"{cat}_val.txt"
            source, stem = rel(path, root), path.stem
            blank = tabbed = 0
            n_before = len(prompts)
            for line_no, line in text_lines(path, root):
                text = line.split("\t")[0]
                if not text.strip():
                    blank += 1
                    continue
                tabbed += "\t" in line
                sub = ""
                if cat == "complex":
                    key = complex_key(line)  # 3_in_1.py matches whole lines
                    sub = "spatial" if key in splits["spatial"] else "action" if key in splits["action"] \
                        else "spatial_action"
                prompts.append(BenchmarkPrompt(benchmark=self.name, id=f"{stem}:{line_no}", text=text,
                                               category=cat, subcategory=sub, source=source, line=line_no))
            if len(prompts) == n_before:
                raise BenchmarkError(f"{source}: no prompts")
            if blank:
                say(self.notes, f"{source}: {blank} blank line(s) skipped")
            if tabbed:
                say(self.notes, f"{source}: {tabbed} line(s) hold tab-separated fields; the prompt is the first "
                                "(as inference_eval.py reads them)")
        return prompts

    def export(self, out_dir: Path, prompts: Sequence[BenchmarkPrompt],
               images: Callable[[BenchmarkPrompt], np.ndarray]) -> None:
        by_folder: dict[str, list[BenchmarkPrompt]] = defaultdict(list)
        for p in prompts:
            by_folder[p.id.rsplit(":", 1)[0]].append(p)
        n_images: int | None = None
        with fresh_export(Path(out_dir)) as tmp:
            for folder, group in by_folder.items():
                group.sort(key=lambda p: p.line)
                index = []
                count = 0
                for p in group:
                    arr = check_images(p, images(p), n_images)
                    n_images = arr.shape[0]
                    stem = export_name(p.text)
                    for j, img in enumerate(arr):
                        name = check_name(f"{stem}_{count:06d}.png", p)
                        save_png(img, tmp / folder / "samples" / name)
                        index.append({"file": f"samples/{name}", "question_id": count, "prompt_id": p.id,
                                      "image_index": j, "text": p.text})
                        count += 1
                (tmp / folder / "silmm_export.json").write_text(json.dumps(
                    {"benchmark": self.name, "folder": folder, "images_per_prompt": n_images, "images": index},
                    indent=1, ensure_ascii=False), encoding="utf-8")

    def aggregate(self, prompts: Sequence[BenchmarkPrompt], answers: Mapping[str, Sequence[ImageAnswers]]) -> dict:
        per_cat: dict[str, list[float]] = defaultdict(list)
        per_sub: dict[str, list[float]] = defaultdict(list)
        for p in prompts:
            scores = [blip_product(img) for img in check_answers(p, answers, need_questions=False)]
            per_cat[p.category].extend(scores)
            if p.subcategory:
                per_sub[f"{p.category}/{p.subcategory}"].extend(scores)
        if not per_cat:
            raise BenchmarkError(f"{self.name}: nothing to aggregate (no prompts)")
        order = [c for c in CATEGORIES if c in per_cat] + sorted(set(per_cat) - set(CATEGORIES))
        per_category = {c: mean(per_cat[c]) for c in order}
        return {
            "overall": mean([v for v in per_category.values() if not math.isnan(v)]),
            "per_category": per_category,
            "tables": {"images": {c: float(len(per_cat[c])) for c in order},
                       "complex_subsets": {k: mean(v) for k, v in sorted(per_sub.items())}},
            "notes": ["overall = mean of the category means; T2I-CompBench++ reports per-category scores only",
                      "image score = product over questions of p_yes/(p_yes+p_no) (BLIP_vqa.py's rule) when the "
                      "scorer gives yes/no probabilities, else the scorer's own per-image score"],
        }
