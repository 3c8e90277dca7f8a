"""GenEval's rules (djghosh13/geneval, evaluation/evaluate_images.py) on Detection records.

Which detections count (``evaluate_image``): per class, those with score > 0.3 (> 0.9 for the ``counting``
tag), highest first, at most 16 (``max_objects``); the overlap filter (``max_overlap``) is off by default
(1.0: keep all), available here as ``max_overlap`` with GenEval's IoU (inclusive pixel boxes, +1).

The clauses (``evaluate``):
- include {class, count}: the ``count`` most confident objects of the class are found (at least ``count``);
- its ``color``: each of those ``count`` objects classified by CLIP ViT-L/14 zero-shot over GenEval's 10
  colours, templates "a photo of a {c} <class>", "a photo of a {c}-colored <class>", "a photo of a {c}
  object", on the object's crop: the image composited over a #999999 background through the object's mask,
  then cropped to its box; at least ``count`` of them must be the asked colour. Checked only when the count
  holds;
- its ``position`` [relation, target include]: checked only when count and colour hold; fails when the
  target include did not hold; else every found object must stand in the relation to every object of the
  target (``relative_position``, margin 0.1);
- exclude {class, count}: fewer than ``count`` objects of the class (all kept detections).
An image is correct when every clause holds. A clause GenEval never reaches (colour after a failed count,
position after a failed count or colour) counts as not met.

silmm's GenEval questions (silmm/eval/benchmarks/geneval.py ``questions_from_metadata``) are one per clause in
a fixed order: per include its count question (an "exactly n" question absorbs the exclude {class, n + 1}),
then its colour question, then its position question; then the remaining excludes. ``question_verdicts``
returns one boolean per question in that order, so question ``q<i>`` is correct when verdict ``i`` holds, and
all of them hold exactly when GenEval marks the image correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from silmm.eval.scorers.vision import Detection

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
MAX_OVERLAP = 1.0  # GenEval's NMS_THRESHOLD default: no overlap filtering
POSITION_THRESHOLD = 0.1
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
BGCOLOR = (153, 153, 153)  # "#999"
# COCO label names that GenEval's object_names.txt spells differently (same class index)
GENEVAL_NAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}

ColourFn = Callable[[np.ndarray, Sequence[Detection], str], list[str]]


def colour_templates(classname: str) -> list[str]:
    """GenEval's three colour templates for a class ({c} = the colour)."""
    return [f"a photo of a {{c}} {classname}", f"a photo of a {{c}}-colored {classname}", "a photo of a {c} object"]


def geneval_name(label: str) -> str:
    return GENEVAL_NAMES.get(label, label)


# ------------------------------------------------------------------------------------------ which objects
def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """GenEval's IoU: boxes as inclusive pixel ranges (width = x1 - x0 + 1)."""
    def area(b):
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def threshold_for(tag: str) -> float:
    return COUNTING_THRESHOLD if tag == "counting" else THRESHOLD


def group_detections(detections: Sequence[Detection], tag: str, threshold: float | None = None,
                     max_objects: int = MAX_OBJECTS, max_overlap: float = MAX_OVERLAP) -> dict[str, list[Detection]]:
    """GenEval's kept objects per class name: score > threshold, highest first, at most ``max_objects``, then
    greedy overlap removal when ``max_overlap`` < 1. Classes with nothing kept are absent."""
    cut = threshold_for(tag) if threshold is None else threshold
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        by_class.setdefault(geneval_name(d.label), []).append(d)
    out = {}
    for name, dets in by_class.items():
        order = sorted((d for d in dets if d.score > cut), key=lambda d: -d.score)[:max_objects]
        kept = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if max_overlap != 1:
                order = [d for d in order if compute_iou(best.box, d.box) < max_overlap]
        if kept:
            out[name] = kept
    return out


# ------------------------------------------------------------------------------------------ position
def relative_position(a: Detection, b: Detection, margin: float = POSITION_THRESHOLD) -> set[str]:
    """Where A is relative to B: the centre offset shrunk per axis by margin * (A's + B's extent on that
    axis); a relation holds when the shrunk offset's component, over the full offset's length, passes 0.5."""
    ca, cb = np.array(a.center, np.float64), np.array(b.center, np.float64)
    dim_a = np.abs([a.box[2] - a.box[0], a.box[3] - a.box[1]])
    dim_b = np.abs([b.box[2] - b.box[0], b.box[3] - b.box[1]])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - margin * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


# ------------------------------------------------------------------------------------------ colour
def masked_crop(image: np.ndarray, det: Detection, bgcolor: tuple[int, int, int] = BGCOLOR) -> np.ndarray:
    """GenEval's colour crop: the image through the object's mask over a flat background, cropped to the box
    (rounded as PIL's crop rounds)."""
    image = np.asarray(image, dtype=np.uint8)
    if det.mask is not None:
        if det.mask.shape != image.shape[:2]:
            raise ValueError(f"mask {det.mask.shape} does not match image {image.shape[:2]}")
        image = np.where(det.mask[..., None], image, np.array(bgcolor, np.uint8))
    x0, y0, x1, y1 = (int(round(v)) for v in det.box)
    h, w = image.shape[:2]
    crop = np.full((max(y1 - y0, 1), max(x1 - x0, 1), 3), 0, np.uint8)  # PIL pads outside the image with 0
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return crop


def clip_colour_fn(judge, batch_size: int = 16) -> ColourFn:
    """GenEval's colour classifier on a ClipJudge (CLIP ViT-L/14): the argmax colour of each object's crop."""
    def colours(image: np.ndarray, objects: Sequence[Detection], classname: str) -> list[str]:
        if not objects:
            return []
        crops = [masked_crop(image, d) for d in objects]
        probs = judge.classify(crops, list(COLORS), colour_templates(classname), batch_size=batch_size)
        return [COLORS[i] for i in np.argmax(probs, axis=1)]

    return colours


# ------------------------------------------------------------------------------------------ the clauses
@dataclass(frozen=True)
class Clause:
    kind: str  # "count" | "color" | "position" | "exclude"
    index: int  # the include's (or exclude's) index in the metadata
    ok: bool
    reason: str = ""


def evaluate_clauses(metadata: dict, objects: dict[str, list[Detection]], image: np.ndarray | None,
                     colour_fn: ColourFn | None, margin: float = POSITION_THRESHOLD) -> list[Clause]:
    """GenEval's ``evaluate`` as a list of clause verdicts, in silmm's question order (module docstring)."""
    includes, excludes = metadata.get("include", []), metadata.get("exclude", [])
    out: list[Clause] = []
    groups: list[list[Detection] | None] = []
    absorbed: set[int] = set()
    for k, req in enumerate(includes):
        cls, count = req["class"], req["count"]
        all_found = objects.get(cls, [])
        found = all_found[:count]
        matched = len(found) >= count
        exact = next((e for e, ex in enumerate(excludes)
                      if ex.get("class") == cls and ex.get("count") == count + 1), None)
        if exact is None:
            out.append(Clause("count", k, matched, "" if matched else f"expected {cls}>={count}, found {len(found)}"))
        else:
            absorbed.add(exact)
            ok = matched and len(all_found) < count + 1
            out.append(Clause("count", k, ok, "" if ok else f"expected {cls}=={count}, found {len(all_found)}"))
        if "color" in req:
            if not matched:
                out.append(Clause("color", k, False, f"not checked: fewer than {count} {cls}"))
            else:
                if colour_fn is None or image is None:
                    raise ValueError("a colour clause needs the image and a colour function")
                colours = list(colour_fn(image, found, cls))
                n = colours.count(req["color"])
                matched = n >= count
                out.append(Clause("color", k, matched, "" if matched else
                                  f"expected {req['color']} {cls}>={count}, found colours {colours}"))
        if "position" in req:
            relation, target = req["position"]
            if not matched:
                out.append(Clause("position", k, False, f"not checked: {cls} clause unmet"))
            elif groups[target] is None:
                matched = False
                out.append(Clause("position", k, False, f"no target for {cls} to be {relation}"))
            else:
                bad = next(((o, t) for o in found for t in groups[target]
                            if relation not in relative_position(o, t, margin)), None)
                matched = bad is None
                out.append(Clause("position", k, matched, "" if matched else
                                  f"expected {cls} {relation} target, found "
                                  f"{' and '.join(sorted(relative_position(*bad, margin)))} target"))
        groups.append(found if matched else None)
    for e, req in enumerate(excludes):
        if e in absorbed:
            continue
        n = len(objects.get(req["class"], []))
        ok = n < req["count"]
        out.append(Clause("exclude", e, ok, "" if ok else f"expected {req['class']}<{req['count']}, found {n}"))
    return out


def question_verdicts(metadata: dict, detections: Sequence[Detection], image: np.ndarray | None = None,
                      colour_fn: ColourFn | None = None, **group_kwargs) -> list[bool]:
    """One boolean per silmm GenEval question (q0, q1, ...) for an image's detections (raw, any score)."""
    objects = group_detections(detections, metadata.get("tag", ""), **group_kwargs)
    return [c.ok for c in evaluate_clauses(metadata, objects, image, colour_fn)]


def image_correct(metadata: dict, detections: Sequence[Detection], image: np.ndarray | None = None,
                  colour_fn: ColourFn | None = None, **group_kwargs) -> bool:
    """GenEval's per-image verdict: every clause holds."""
    return all(question_verdicts(metadata, detections, image, colour_fn, **group_kwargs))


__all__ = ["BGCOLOR", "COLORS", "COUNTING_THRESHOLD", "Clause", "ColourFn", "GENEVAL_NAMES", "MAX_OBJECTS",
           "MAX_OVERLAP", "POSITION_THRESHOLD", "THRESHOLD", "clip_colour_fn", "colour_templates", "compute_iou",
           "evaluate_clauses", "geneval_name", "group_detections", "image_correct", "masked_crop",
           "question_verdicts", "relative_position", "threshold_for"]
