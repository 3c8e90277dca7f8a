"""T2I-CompBench's UniDet rules (2D spatial, 3D spatial, numeracy) and its 3-in-1 complex average, as pure
functions on Detection records and depth maps.

Read from Karine-Huang/T2I-CompBench: UniDet_eval/2D_spatial_eval.py, UniDet_eval/3D_spatial_eval.py,
UniDet_eval/numeracy_eval.py, UniDet_eval/experts/model_bank.py (+ obj_detection/utils.py,
generate_dataset*.py), 3_in_1_eval/3_in_1.py, examples/dataset/new_objects.txt. What they do:

2D spatial (also the spatial part of complex, ``--complex``)
- relation: the first of SPATIAL_2D_VOCAB (in that order) that is a substring of the prompt, else none;
- objects: simple prompts: the first and the last spaCy NOUN; complex prompts: for each occurrence of one of
  COMPLEX_PREPOSITIONS (3-, 2-, 1-token windows), the nearest NOUN/PROPN before it and the first NOUN after it
  (a PROPN fallback when no NOUN follows); used only when exactly two objects come out;
- girl/boy/man/woman -> "person" (UniDet's label space);
- detection per object: the first detection with exactly that label in UniDet's output, which is ordered by
  decreasing score: the best-scoring one;
- score: both found: 0.25 * conf1 + 0.25 * conf2 + 0.5 * position; only one: 0.25 * its conf; none: 0;
  then any score < 0.5 becomes 0 (so one object alone always scores 0);
- position (``determine_position``): centres c1, c2, dx = c2x - c1x, dy = c2y - c1y, plain IoU.
  "next to" / "on side of" / "near": 1 if |dx| < 150 or |dy| < 150, else 150 / max(|dx|, |dy|).
  "on the left of": dx > 0 and |dx| > |dy|: 1 if IoU < 0.1 else 0.1 / IoU; "on the right of": dx < 0, same;
  "on the top of": dy > 0 and |dy| > |dx|, same; "on the bottom of": dy < 0, same; anything else 0.
  Note: "on top of" is in the relation vocabulary but has no branch, so it scores 0 (this is what the
  complex category's "on top of" prompts get officially); reproduced.
- pixels: UniDet sees the image resized to short side 479, long side at most 480 (torchvision
  Resize(479, max_size=480)) and its boxes are in that frame, so the 150 px threshold is in that frame:
  ``unidet_scale`` gives the factor and the scores below take boxes in the original image and rescale.

3D spatial
- relation: the first of "in front of", "behind", "hidden" in the prompt; objects: first and last NOUN;
  person mapping as 2D;
- detection per object: a label *containing* the noun (substring), found by the loop of the script: walk
  the detections in order, every match overwrites that object's index, stop as soon as both are set;
- score: both: 0.25 * conf1 + 0.25 * conf2 + 0.5 * position; one: 0.25 * conf; none: 0; **not** zeroed
  below 0.5;
- position: mean depth of each box (the depth map min-max normalised to [0, 1], larger = nearer), diff =
  mean1 - mean2, IoU as 2D: "in front of": IoU > 0.5 and diff > 0 -> 1; 0 < IoU < 0.5 and diff > 0 ->
  IoU / 0.5; else 0. "behind" / "hidden": the same with diff < 0. The script slices the depth map as
  ``depth[x0:x1, y0:y1]`` (rows by x: transposed, a bug); reproduced by default (``transposed=True``), with
  int() truncation; an empty slice gives NaN and position 0, as in torch.

Numeracy
- objects and counts: tokens (spaCy's; here a regex tokenizer that splits the same way on these prompts)
  scanned for NUMBER_WORDS ("a", "an", "one" ... "eight"); the next token (or next two) looked up in the
  singular/plural lists of new_objects.txt: a singular after a/an/one counts 1; otherwise the plural's
  singular is the object and the number word its count (word2number);
- detections de-duplicated in order: one is dropped when an earlier kept one has the same label and
  ``calculate_iou`` says duplicate (pixel-inclusive +1 IoU > 0.9, or the intersection > 0.9 of either box);
- per object (weight 1 / number of objects): if its name is not a detected label, detected labels containing
  it are renamed to it; present -> +0.5 weight; number of detections with the label == count -> +0.5 weight.

Complex (3-in-1): per prompt, split "spatial": (spatial + attribute) / 2; "action": (action + attribute)
/ 2; otherwise (attribute + spatial + action) / 3; attribute = BLIP-VQA, spatial = the 2D score (complex
parsing), action = CLIPScore.

Deviations here, all because the detector is an open-vocabulary one queried with the prompt's own nouns:
UniDet's label aliases (girl/boy/man/woman -> person, ship -> boat, goldfish -> fish, painting -> picture)
are not applied: the detector is asked for the noun itself, and its detections carry that noun as label.
Without spaCy the nouns come from a rule-based fallback that agrees with spaCy on the benchmark's
templates (see ``spatial_objects``); ``parser_name()`` says which was used. The 3D depth is read in the
image's own frame, not UniDet's 479 px frame (box means are nearly scale-free), and is not quantised to 8
bits. A prompt with no countable object scores 0 (the script divides by zero).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

import numpy as np

from silmm.eval.scorers.vision import Detection

SPATIAL_2D_VOCAB = ("on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of",
                    "on the top of", "on top of")
SPATIAL_3D_VOCAB = ("in front of", "behind", "hidden")
COMPLEX_PREPOSITIONS = ("on top of", "on bottom of", "on the left", "on the right", "next to", "on side of", "near")
NEAR_RELATIONS = ("next to", "on side of", "near")
PERSON_WORDS = ("girl", "boy", "man", "woman")
NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8}
ONE_WORDS = ("a", "an", "one")

IOU_THRESHOLD = 0.1
DISTANCE_THRESHOLD = 150.0  # pixels in UniDet's frame
IOU_THRESHOLD_3D = 0.5
ZERO_BELOW_2D = 0.5
UNIDET_SHORT_SIDE, UNIDET_MAX_SIDE = 479, 480

# examples/dataset/new_objects.txt: "singular - plural", in file order (duplicates kept: index() finds the first)
_NEW_OBJECTS = """bottle bottles|cup cups|cake cakes|bird birds|knife knives|microwave microwaves|desk desks|
book books|helmet helmets|pillow pillows|bowl bowls|flag flags|stool stools|toy toys|pen pens|microphone microphones|
bread breads|fish fish|camera cameras|candle candles|paddle paddles|drum drums|guitar guitars|tomato tomatoes|
tent tents|kite kites|lemon lemons|strawberry strawberries|suitcase suitcases|pear pears|printer printers|
duck ducks|hamburger hamburgers|deer deer|egg eggs|ship ships|chicken chickens|peach peaches|
helicopter helicopters|swan swans|camel camels|goldfish goldfish|shrimp shrimp|banana bananas|balloon balloons|
giraffe giraffes|frog frogs|horse horses|man men|rabbit rabbits|bicycle bicycles|bee bees|girl girls|mouse mice|
painting paintings|fish fish|chicken chickens|desk desks|lamp lamps|cow cows|train trains|vase vases|pig pigs|
sheep sheep|airplane airplanes|woman women|phone phones|boy boys|plate plates|bird birds|computer computers|
book books|couch couches|turtle turtles|bowl bowls|cup cups|bag bags|car cars|backpack backpacks|
microwave microwaves|dog dogs|television televisions|butterfly butterflies|cat cats|person people|table tables|
sofa sofas|key keys|refrigerator refrigerators|clock clocks|candle candles|chair chairs|pig pigs|rabbit rabbits|
truck trucks|boat boats|bear bears|bicycle bicycles|sink sinks|horse horses|apple apples"""
NUMERACY_OBJECTS: tuple[tuple[str, str], ...] = tuple(
    tuple(pair.split()) for pair in _NEW_OBJECTS.replace("\n", "").split("|"))  # type: ignore[misc]
OBJECT_SINGULAR = [s for s, _ in NUMERACY_OBJECTS]
OBJECT_PLURAL = [p for _, p in NUMERACY_OBJECTS]

Box = tuple[float, float, float, float]


# ------------------------------------------------------------------------------------------- parsing
@functools.lru_cache(maxsize=1)
def _spacy():
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        return None


def parser_name() -> str:
    """Which noun finder the rules use: the benchmark's spaCy pipeline or silmm's rule-based fallback."""
    return "spacy:en_core_web_sm" if _spacy() is not None else "rules (spaCy en_core_web_sm not installed)"


def tokens(text: str) -> list[str]:
    """Words and punctuation marks, split as spaCy splits the benchmark's prompts."""
    return re.findall(r"[A-Za-z0-9]+(?:'[a-z]+)?|[^\sA-Za-z0-9]", text)


def relation(prompt: str, vocab: Sequence[str]) -> str | None:
    """The first relation of ``vocab`` (in its order) that is a substring of the prompt."""
    return next((word for word in vocab if word in prompt), None)


# words the fallback never takes for an object (articles, auxiliaries, prepositions, conjunctions)
_NOT_NOUN = frozenset("""a an the this that these those some is was were are be been being has have had
sits sit sitting stands stand standing lies lying placed located positioned of to by on in at near next with
and or while as which who above below under beside side left right top bottom front behind hidden""".split())
_BOUNDARY = frozenset("""and or while with in on at near next by behind under above below beside which that who
is was were are as , . ; : ! ?""".split())


def _head_before(words: Sequence[str]) -> str | None:
    """The nearest word before a relation that can be a noun (fallback for spaCy's nearest NOUN)."""
    for w in reversed(words):
        if w.isalpha() and w.lower() not in _NOT_NOUN:
            return w
    return None


def _head_after(words: Sequence[str]) -> str | None:
    """The head of the noun phrase after a relation: its last word before a boundary (fallback)."""
    phrase = []
    for w in words:
        if w.lower() in _BOUNDARY and phrase:
            break
        if w.isalpha() and w.lower() not in _NOT_NOUN:
            phrase.append(w)
    return phrase[-1] if phrase else None


def spatial_objects(prompt: str, vocab: Sequence[str] = SPATIAL_2D_VOCAB) -> tuple[str | None, str | None]:
    """Simple 2D/3D prompts: (first NOUN, last NOUN) with spaCy, as the scripts; without it, the head words
    of the phrases before and after the relation ("a dog on the left of a cat" -> dog, cat; "a chair hidden
    by a mouse" -> chair, mouse)."""
    nlp = _spacy()
    if nlp is not None:
        nouns = [t.text for t in nlp(prompt) if t.pos_ == "NOUN"]
        return (nouns[0], nouns[-1]) if nouns else (None, None)
    rel = relation(prompt, vocab)
    words = tokens(prompt)
    if rel is None:
        content = [w for w in words if w.isalpha() and w.lower() not in _NOT_NOUN]
        return (content[0], content[-1]) if content else (None, None)
    left, right = prompt.split(rel, 1)
    return _head_before(tokens(left)), _head_after(tokens(right))


def complex_spatial_objects(prompt: str) -> tuple[str | None, str | None]:
    """Complex prompts (2D_spatial_eval.py --complex): around each preposition of COMPLEX_PREPOSITIONS the
    nearest noun before and the first noun after; both only when exactly two objects come out."""
    nlp = _spacy()
    objects: list[str] = []
    if nlp is not None:
        doc = nlp(prompt)
        words = [t.text for t in doc]
        pos = [t.pos_ for t in doc]
    else:
        words, pos = tokens(prompt), None
    n = len(words)
    for i in range(n):
        k = next((k for k in (3, 2, 1) if " ".join(words[i:i + k]) in COMPLEX_PREPOSITIONS), 0)
        if not k:
            continue
        if pos is None:
            before, after = _head_before(words[:i]), _head_after(words[i + k:])
            objects += [w for w in (before, after) if w is not None]
            continue
        before = next((words[j] for j in range(i - 1, -1, -1) if pos[j] in ("NOUN", "PROPN")), None)
        if before is not None:
            objects.append(before)
        after = next((words[j] for j in range(i + k, n) if pos[j] == "NOUN"), None)
        if after is None:
            after = next((words[j] for j in range(i + k, n - 1) if pos[j] == "PROPN" and pos[j + 1] != "PROPN"), None)
        if after is not None:
            objects.append(after)
    return (objects[0], objects[1]) if len(objects) == 2 else (None, None)


def unidet_name(noun: str | None) -> str | None:
    """UniDet's label for a noun where the scripts map one (girl/boy/man/woman -> person). Not applied to
    open-vocabulary detections (they carry the queried noun); kept for reference and for a UniDet port."""
    return "person" if noun in PERSON_WORDS else noun


def numeracy_targets(prompt: str) -> list[tuple[str, int]]:
    """(object singular, count) pairs as numeracy_eval.py reads them (lower-cased first: the script's lists
    are lower-case and its prompts too)."""
    words = [w.lower() for w in tokens(prompt)]
    out: list[tuple[str, int]] = []
    for i, w in enumerate(words):
        if w not in NUMBER_WORDS or i + 1 >= len(words):
            continue
        one = w in ONE_WORDS
        two_words = " ".join(words[i + 1:i + 3]) if i < len(words) - 2 else None
        if two_words and (two_words in OBJECT_SINGULAR or two_words in OBJECT_PLURAL):
            if two_words in OBJECT_PLURAL and not one:
                out.append((OBJECT_SINGULAR[OBJECT_PLURAL.index(two_words)], NUMBER_WORDS[w]))
            else:
                out.append((two_words, 1))
        elif words[i + 1] in OBJECT_SINGULAR or words[i + 1] in OBJECT_PLURAL:
            nxt = words[i + 1]
            if nxt in OBJECT_SINGULAR and one:
                out.append((nxt, 1))
            elif nxt in OBJECT_PLURAL:
                # "two fish": the plural's singular, the number word's count; "a" + a plural-only word
                # makes the script misalign its lists (w2n fails on "a"): counted as 1 here
                out.append((OBJECT_SINGULAR[OBJECT_PLURAL.index(nxt)], NUMBER_WORDS[w]))
            # a singular after "two" (not in the plural list) crashes the script (index() fails): skipped
    return out


# --------------------------------------------------------------------------------------------- boxes
def unidet_scale(height: int, width: int) -> float:
    """The factor torchvision's Resize(479, max_size=480) applies: UniDet's boxes are in that frame."""
    short, long = min(height, width), max(height, width)
    scale = UNIDET_SHORT_SIDE / short
    if long * scale > UNIDET_MAX_SIDE:
        scale = UNIDET_MAX_SIDE / long
    return scale


def _scaled(box: Box, scale: float) -> Box:
    return tuple(float(v) * scale for v in box)  # type: ignore[return-value]


def iou(box1: Box, box2: Box) -> float:
    """Plain IoU as determine_position computes it (no +1); 0 when the union is empty."""
    x_overlap = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
    y_overlap = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
    inter = x_overlap * y_overlap
    union = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - inter
    return inter / union if union > 0 else 0.0


def _centre_offsets(box1: Box, box2: Box) -> tuple[float, float]:
    dx = (box2[0] + box2[2]) / 2 - (box1[0] + box1[2]) / 2
    dy = (box2[1] + box2[3]) / 2 - (box1[1] + box1[3]) / 2
    return dx, dy


def position_2d(rel: str | None, box1: Box, box2: Box, iou_threshold: float = IOU_THRESHOLD,
                distance_threshold: float = DISTANCE_THRESHOLD) -> float:
    """determine_position: how well box1 stands in ``rel`` to box2, in [0, 1] (x right, y down)."""
    dx, dy = _centre_offsets(box1, box2)
    overlap = iou(box1, box2)

    def directional(along: float, across: float) -> float:  # along > 0 already checked
        if abs(along) <= abs(across):
            return 0.0
        return 1.0 if overlap < iou_threshold else iou_threshold / overlap

    if rel in NEAR_RELATIONS:
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    if rel == "on the left of":
        return directional(dx, dy) if dx > 0 else 0.0
    if rel == "on the right of":
        return directional(dx, dy) if dx < 0 else 0.0
    if rel == "on the top of":
        return directional(dy, dx) if dy > 0 else 0.0
    if rel == "on the bottom of":
        return directional(dy, dx) if dy < 0 else 0.0
    return 0.0  # no relation, or "on top of" (in the vocabulary, no branch in the script)


def mean_depth(depth: np.ndarray, box: Box, transposed: bool = True) -> float:
    """Mean of the depth map over a box, int()-truncated; ``transposed``: sliced as the script does,
    ``depth[x0:x1, y0:y1]``. NaN when the slice is empty."""
    x0, y0, x1, y1 = (int(v) for v in box)
    region = depth[x0:x1, y0:y1] if transposed else depth[y0:y1, x0:x1]
    return float(np.mean(region, dtype=np.float64)) if region.size else math.nan


def position_3d(rel: str | None, box1: Box, box2: Box, depth: np.ndarray, iou_threshold_3d: float = IOU_THRESHOLD_3D,
                transposed: bool = True) -> float:
    """determine_position's 3D branches: "in front of" (box1 nearer), "behind" / "hidden" (box1 farther);
    other relations fall through to the 2D ones."""
    if rel not in SPATIAL_3D_VOCAB:
        return position_2d(rel, box1, box2)
    overlap = iou(box1, box2)
    diff = mean_depth(depth, box1, transposed) - mean_depth(depth, box2, transposed)
    right_order = diff > 0 if rel == "in front of" else diff < 0  # False for NaN
    if overlap > iou_threshold_3d:
        return 1.0 if right_order else 0.0
    if 0 < overlap < iou_threshold_3d:
        return overlap / iou_threshold_3d if right_order else 0.0
    return 0.0


# ------------------------------------------------------------------------------------------- scores
def by_score(detections: Sequence[Detection]) -> list[Detection]:
    """UniDet's output order: decreasing score (stable)."""
    return sorted(detections, key=lambda d: -d.score)


def first_with_label(detections: Sequence[Detection], label: str | None) -> Detection | None:
    """``obj.index(label)`` over the ordered detections: the best-scoring detection with exactly that label."""
    return next((d for d in by_score(detections) if d.label == label), None)


def spatial_2d_score(prompt: str, detections: Sequence[Detection], image_size: tuple[int, int] | None = None,
                     complex_prompt: bool = False,
                     objects: tuple[str | None, str | None] | None = None) -> float:
    """2D_spatial_eval.py's per-image score. ``image_size`` (H, W): boxes are in that image's pixels and are
    moved to UniDet's frame (the 150 px threshold's); None: already in it. ``objects`` overrides parsing."""
    rel = relation(prompt, SPATIAL_2D_VOCAB)
    obj1, obj2 = objects if objects is not None else (
        complex_spatial_objects(prompt) if complex_prompt else spatial_objects(prompt))
    scale = unidet_scale(*image_size) if image_size is not None else 1.0
    d1, d2 = first_with_label(detections, obj1), first_with_label(detections, obj2)
    if d1 is not None and d2 is not None:
        score = 0.25 * d1.score + 0.25 * d2.score
        score += position_2d(rel, _scaled(d1.box, scale), _scaled(d2.box, scale)) / 2
    elif d1 is not None or d2 is not None:
        score = 0.25 * (d1 or d2).score  # type: ignore[union-attr]
    else:
        score = 0.0
    return 0.0 if score < ZERO_BELOW_2D else float(score)


def pick_3d(detections: Sequence[Detection], obj1: str | None, obj2: str | None
            ) -> tuple[Detection | None, Detection | None]:
    """3D_spatial_eval.py's choice: labels containing each noun; when both occur, the script's loop (every
    match overwrites, stop once both are set); otherwise the first containing label."""
    ordered = by_score(detections)
    joined = " ".join(d.label for d in ordered)
    has1 = obj1 is not None and obj1 in joined
    has2 = obj2 is not None and obj2 in joined
    if has1 and has2:
        i1 = i2 = None
        for i, d in enumerate(ordered):
            if obj1 in d.label:
                i1 = i
            if obj2 in d.label:
                i2 = i
            if i1 is not None and i2 is not None:
                break
        if i1 is None or i2 is None:  # substring of the joined labels only (across a space): the script crashes
            return None, None
        return ordered[i1], ordered[i2]

    def first(noun: str | None) -> Detection | None:
        return next((d for d in ordered if noun in d.label), None) if noun is not None else None

    return (first(obj1) if has1 else None), (first(obj2) if has2 else None)


def spatial_3d_score(prompt: str, detections: Sequence[Detection], depth: np.ndarray,
                     objects: tuple[str | None, str | None] | None = None, transposed: bool = True) -> float:
    """3D_spatial_eval.py's per-image score (no zeroing); boxes and the depth map in the same frame."""
    rel = relation(prompt, SPATIAL_3D_VOCAB)
    obj1, obj2 = objects if objects is not None else spatial_objects(prompt, SPATIAL_3D_VOCAB)
    d1, d2 = pick_3d(detections, obj1, obj2)
    if d1 is not None and d2 is not None:
        return 0.25 * d1.score + 0.25 * d2.score + position_3d(rel, d1.box, d2.box, depth,
                                                                transposed=transposed) / 2
    if d1 is not None or d2 is not None:
        return 0.25 * (d1 or d2).score  # type: ignore[union-attr]
    return 0.0


def is_duplicate(box1: Box, box2: Box) -> bool:
    """numeracy_eval.py's calculate_iou: pixel-inclusive (+1) IoU > 0.9, or the intersection > 0.9 of
    either box."""
    ix = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]) + 1)
    iy = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]) + 1)
    inter = ix * iy
    a1 = (box1[2] - box1[0] + 1) * (box1[3] - box1[1] + 1)
    a2 = (box2[2] - box2[0] + 1) * (box2[3] - box2[1] + 1)
    return inter / (a1 + a2 - inter) > 0.9 or inter / a1 > 0.9 or inter / a2 > 0.9


def deduplicate(detections: Sequence[Detection]) -> list[Detection]:
    """Drop a detection when an earlier kept one has its label and is a duplicate box (script order)."""
    kept: list[Detection] = []
    for d in by_score(detections):
        if not any(k.label == d.label and is_duplicate(d.box, k.box) for k in kept):
            kept.append(d)
    return kept


def numeracy_score(prompt: str, detections: Sequence[Detection],
                   targets: Sequence[tuple[str, int]] | None = None) -> float:
    """numeracy_eval.py's per-image score: per object 0.5 / n for presence and 0.5 / n for the exact count."""
    targets = list(targets) if targets is not None else numeracy_targets(prompt)
    if not targets:
        return 0.0
    labels = [d.label for d in deduplicate(detections)]
    weight = 1.0 / len(targets)
    score = 0.0
    for name, count in targets:
        if name not in labels:
            labels = [name if name in lb else lb for lb in labels]
        if name in labels:
            score += 0.5 * weight
            if labels.count(name) == count:
                score += 0.5 * weight
    return score


COMPLEX_SPLITS = ("spatial", "action", "spatial_action")


def complex_score(attribute: float, spatial: float, action: float, split: str) -> float:
    """3_in_1.py: the average of the parts the prompt's split has."""
    if split == "spatial":
        return (spatial + attribute) * 0.5
    if split == "action":
        return (action + attribute) * 0.5
    if split == "spatial_action":
        return (attribute + spatial + action) / 3
    raise ValueError(f"complex split {split!r}: expected one of {COMPLEX_SPLITS}")
