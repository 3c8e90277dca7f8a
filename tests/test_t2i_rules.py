"""T2I-CompBench's UniDet rules and 3-in-1 average on hand-made boxes and depth maps; every expected value is
computed by hand in the comment next to it (both sides of each threshold)."""

import math

import numpy as np
import pytest

from silmm.eval.scorers import t2i_rules as R
from silmm.eval.scorers.vision import Detection


def det(label, score, box):
    return Detection(label, score, tuple(float(v) for v in box))


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("prompt,rel,objects", [
    ("a dog on the left of a cat", "on the left of", ("dog", "cat")),
    ("a bicycle on the bottom of a girl", "on the bottom of", ("bicycle", "girl")),
    ("a mouse near a bowl", "near", ("mouse", "bowl")),
    ("a bird on side of a airplane", "on side of", ("bird", "airplane")),
    ("a giraffe next to a lamp", "next to", ("giraffe", "lamp")),
    ("a girl on the top of a frog", "on the top of", ("girl", "frog")),
])
def test_parse_2d(prompt, rel, objects):
    assert R.relation(prompt, R.SPATIAL_2D_VOCAB) == rel
    assert R.spatial_objects(prompt) == objects


@pytest.mark.parametrize("prompt,rel,objects", [
    ("a car in front of a tree", "in front of", ("car", "tree")),
    ("a cat behind a boy", "behind", ("cat", "boy")),
    ("a chair hidden by a mouse", "hidden", ("chair", "mouse")),
])
def test_parse_3d(prompt, rel, objects):
    assert R.relation(prompt, R.SPATIAL_3D_VOCAB) == rel
    assert R.spatial_objects(prompt, R.SPATIAL_3D_VOCAB) == objects


def test_relation_vocabulary_order():
    # the first entry of the vocabulary that occurs wins, not the first in the prompt
    assert R.relation("a dog on the left of a cat near a tree", R.SPATIAL_2D_VOCAB) == "near"
    assert R.relation("the hat was on top of the coat", R.SPATIAL_2D_VOCAB) == "on top of"
    assert R.relation("a dog and a cat", R.SPATIAL_2D_VOCAB) is None


@pytest.mark.parametrize("prompt,objects", [
    ("The fluffy cat is on the left of the soft pillow.", ("cat", "pillow")),
    ("The black headphones were next to the green phone.", ("headphones", "phone")),
    ("The red apple was on top of the black plate.", ("apple", "plate")),
    ("The green plant was on the right of the white wall.", ("plant", "wall")),
    ("A dog near a cat and a bird near a tree.", (None, None)),  # four objects: none taken
    ("A dog with a cat.", (None, None)),
])
def test_parse_complex(prompt, objects):
    assert R.complex_spatial_objects(prompt) == objects


@pytest.mark.parametrize("prompt,targets", [
    ("three apples and two bananas", [("apple", 3), ("banana", 2)]),
    ("two fish", [("fish", 2)]),
    ("a fish", [("fish", 1)]),
    ("six people gathered for a picnic", [("person", 6)]),
    ("one bread, four fish, one computer, two bags and one bicycle",
     [("bread", 1), ("fish", 4), ("computer", 1), ("bag", 2), ("bicycle", 1)]),
    ("a backpack, three apples, two strawberries, and a bowl were on the kitchen counter",
     [("backpack", 1), ("apple", 3), ("strawberry", 2), ("bowl", 1)]),
    ("Three Mice", [("mouse", 3)]),
    ("two apple", []),  # a singular after "two": the script crashes; skipped
    ("a photo of nothing", []),
])
def test_numeracy_targets(prompt, targets):
    assert R.numeracy_targets(prompt) == targets


def test_new_objects_table():
    assert len(R.NUMERACY_OBJECTS) == 101  # lines of new_objects.txt, duplicates included
    assert ("mouse", "mice") in R.NUMERACY_OBJECTS and ("person", "people") in R.NUMERACY_OBJECTS


# ------------------------------------------------------------------------------------- 2D positions
A = (0, 0, 10, 10)  # centre (5, 5)


@pytest.mark.parametrize("rel,box2,expected", [
    ("on the left of", (100, 0, 110, 10), 1.0),  # dx = 100 > 0, dy = 0, IoU 0
    ("on the left of", (-100, 0, -90, 10), 0.0),  # dx < 0
    ("on the left of", (20, 50, 30, 60), 0.0),  # dx = 20 < dy = 50
    ("on the left of", (8.5, 0, 20.5, 10), 1.0),  # IoU = 15 / 205 < 0.1
    ("on the left of", (8, 0, 20, 10), 1.0),  # IoU = 20 / 200 = 0.1 exactly -> 0.1 / 0.1
    ("on the left of", (7, 0, 19, 10), 190 / 300),  # IoU = 30 / 190 -> 0.1 / IoU
    ("on the left of", (5, 0, 15, 10), 0.3),  # IoU = 50 / 150 -> 0.3
    ("on the right of", (-100, 0, -90, 10), 1.0),
    ("on the right of", (-9, 0, 3, 10), 190 / 300),  # mirror: dx = -8, IoU = 30 / 190
    ("on the right of", (100, 0, 110, 10), 0.0),
    ("on the top of", (0, 100, 10, 110), 1.0),  # dy = 100 > 0: box1 above
    ("on the top of", (0, -100, 10, -90), 0.0),
    ("on the top of", (50, 20, 60, 30), 0.0),  # |dy| = 20 < |dx| = 50
    ("on the bottom of", (0, -100, 10, -90), 1.0),
    ("on the bottom of", (0, 100, 10, 110), 0.0),
    ("next to", (149, 500, 159, 510), 1.0),  # |dx| = 149 < 150
    ("next to", (150, 500, 160, 510), 150 / 500),  # |dx| = 150 not < 150, |dy| = 500
    ("near", (200, 200, 210, 210), 0.75),  # 150 / 200
    ("on side of", (200, 100, 210, 110), 1.0),  # |dy| = 100 < 150
    ("on top of", (0, 100, 10, 110), 0.0),  # in the vocabulary, no branch
    (None, (100, 0, 110, 10), 0.0),
])
def test_position_2d(rel, box2, expected):
    assert R.position_2d(rel, A, box2) == pytest.approx(expected, abs=1e-12)


def test_iou():
    assert R.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert R.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert R.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_unidet_scale():
    assert R.unidet_scale(512, 512) == 479 / 512
    assert R.unidet_scale(512, 1024) == 480 / 1024  # 479/512 * 1024 = 958 > 480
    assert R.unidet_scale(479, 480) == 1.0


# ------------------------------------------------------------------------------------------ 2D score
def test_spatial_2d_score_both_objects():
    dets = [det("cat", 0.8, (100, 0, 110, 10)), det("dog", 0.9, A), det("dog", 0.6, (200, 0, 210, 10))]
    # best dog (0.9, left of the cat): 0.25 * 0.9 + 0.25 * 0.8 + 1 / 2
    assert R.spatial_2d_score("a dog on the left of a cat", dets) == pytest.approx(0.925)
    # the relation fails: 0.425 < 0.5 -> 0
    assert R.spatial_2d_score("a dog on the right of a cat", dets) == 0.0


def test_spatial_2d_score_zeroing_threshold():
    box2 = (300, 300, 310, 310)  # |dx| = |dy| = 300 -> near position 150 / 300 = 0.5
    at = [det("dog", 0.5, A), det("cat", 0.5, box2)]  # 0.125 + 0.125 + 0.25 = 0.5: kept
    assert R.spatial_2d_score("a dog near a cat", at) == 0.5
    below = [det("dog", 0.5, A), det("cat", 0.49, box2)]  # 0.4975 -> 0
    assert R.spatial_2d_score("a dog near a cat", below) == 0.0
    # in a 1024 px image UniDet sees 300 px as 300 * 479 / 1024 = 140.3 < 150 -> position 1: 0.2475 + 0.5
    assert R.spatial_2d_score("a dog near a cat", below, image_size=(1024, 1024)) == pytest.approx(0.7475)


def test_spatial_2d_score_missing_objects():
    # one object alone: 0.25 * conf <= 0.25 < 0.5 -> always 0; none: 0
    assert R.spatial_2d_score("a dog on the left of a cat", [det("dog", 1.0, A)]) == 0.0
    assert R.spatial_2d_score("a dog on the left of a cat", []) == 0.0
    # exact labels only (2D uses obj.index): "hotdog" is not "dog"
    dets = [det("hotdog", 0.9, A), det("cat", 0.9, (100, 0, 110, 10))]
    assert R.spatial_2d_score("a dog on the left of a cat", dets) == 0.0


def test_spatial_2d_score_complex_and_on_top_of():
    dets = [det("cat", 1.0, A), det("pillow", 1.0, (100, 0, 110, 10))]
    # 0.25 + 0.25 + 1 / 2
    assert R.spatial_2d_score("The fluffy cat is on the left of the soft pillow.", dets, complex_prompt=True) == 1.0
    on_top = [det("apple", 0.9, A), det("plate", 0.9, (0, 100, 10, 110))]
    # "on top of": position 0 -> 0.45 < 0.5 -> 0, as the official script scores it
    assert R.spatial_2d_score("The red apple was on top of the black plate.", on_top, complex_prompt=True) == 0.0
    # no relation: position 0; 0.25 + 0.25 = 0.5 is not below 0.5 -> kept
    assert R.spatial_2d_score("a cat and a pillow", dets, objects=("cat", "pillow")) == 0.5


# ------------------------------------------------------------------------------------------------ 3D
ROWS = np.repeat(((100 - np.arange(100)) / 100)[:, None], 100, axis=1)  # row r holds (100 - r) / 100


def test_mean_depth_transposed_like_the_script():
    box = (0, 50, 20, 70)
    # transposed: rows 0..19 -> mean of (100 - r) / 100 = (100 - 9.5) / 100
    assert R.mean_depth(ROWS, box) == pytest.approx(0.905)
    # the box itself: rows 50..69 -> (100 - 59.5) / 100
    assert R.mean_depth(ROWS, box, transposed=False) == pytest.approx(0.405)
    assert math.isnan(R.mean_depth(ROWS, (150, 0, 160, 10)))


@pytest.mark.parametrize("rel,box1,box2,expected", [
    # IoU = 360 / 440 > 0.5; means 0.905 vs rows 2..21 -> 0.885: box1 nearer
    ("in front of", (0, 50, 20, 70), (2, 50, 22, 70), 1.0),
    ("behind", (0, 50, 20, 70), (2, 50, 22, 70), 0.0),
    ("behind", (2, 50, 22, 70), (0, 50, 20, 70), 1.0),
    ("hidden", (2, 50, 22, 70), (0, 50, 20, 70), 1.0),
    # IoU = 200 / 800 = 0.25; rows 0..19 (0.905) vs 10..39 (0.755) -> 0.25 / 0.5
    ("in front of", (0, 50, 20, 70), (10, 50, 40, 70), 0.5),
    ("behind", (0, 50, 20, 70), (10, 50, 40, 70), 0.0),
    ("behind", (10, 50, 40, 70), (0, 50, 20, 70), 0.5),
    # IoU = 200 / 400 = 0.5 exactly: neither branch -> 0
    ("in front of", (0, 0, 20, 20), (10, 0, 20, 20), 0.0),
    # IoU = 0 -> 0
    ("in front of", (0, 0, 10, 10), (50, 50, 60, 60), 0.0),
    # equal depth (same box) -> 0 for both
    ("in front of", (0, 0, 10, 10), (0, 0, 10, 10), 0.0),
    ("behind", (0, 0, 10, 10), (0, 0, 10, 10), 0.0),
])
def test_position_3d(rel, box1, box2, expected):
    assert R.position_3d(rel, box1, box2, ROWS) == pytest.approx(expected)


def test_position_3d_untransposed_option():
    cols = ROWS.T.copy()  # column c holds (100 - c) / 100: the same boxes read correctly
    assert R.position_3d("in front of", (0, 50, 20, 70), (10, 50, 40, 70), cols, transposed=False) == 0.5


def test_spatial_3d_score():
    dets = [det("car", 0.8, (0, 50, 20, 70)), det("tree", 0.6, (10, 50, 40, 70))]
    # 0.25 * 0.8 + 0.25 * 0.6 + 0.5 / 2
    assert R.spatial_3d_score("a car in front of a tree", dets, ROWS) == pytest.approx(0.6)
    # wrong order: 0.35, not zeroed
    assert R.spatial_3d_score("a car behind a tree", dets, ROWS) == pytest.approx(0.35)
    assert R.spatial_3d_score("a car behind a tree", dets[:1], ROWS) == pytest.approx(0.2)
    assert R.spatial_3d_score("a car behind a tree", [], ROWS) == 0.0


def test_pick_3d_follows_the_script_loop():
    car_best, car_next, tree = det("car", 0.9, A), det("car", 0.8, A), det("tree", 0.7, A)
    # every match overwrites until both are set: the second car (0.8) is taken
    assert R.pick_3d([tree, car_best, car_next][::-1], "car", "tree") == (car_next, tree)
    # substring match: "sports car" contains "car"
    sports = det("sports car", 0.5, A)
    assert R.pick_3d([sports], "car", "tree") == (sports, None)


# ------------------------------------------------------------------------------------------ numeracy
def test_is_duplicate_thresholds():
    a = (0, 0, 9, 9)  # pixel-inclusive area 100
    assert R.is_duplicate(a, (0, 0, 9, 8))  # intersection 90 = all of the second box (90)
    assert not R.is_duplicate(a, (0, 0, 19, 8))  # 90 / 100 = 0.9 not > 0.9; 90 / 180; IoU 90 / 190
    assert R.is_duplicate(a, (0, 0, 19, 9))  # 100 / 100 of the first
    assert not R.is_duplicate(a, (5, 0, 14, 9))  # 50 / 150 and 0.5 of each


def test_numeracy_score():
    apples = [det("apple", 0.9, (0, 0, 9, 9)), det("apple", 0.8, (20, 0, 29, 9)), det("apple", 0.7, (40, 0, 49, 9))]
    banana = [det("banana", 0.9, (60, 0, 69, 9))]
    prompt = "three apples and two bananas"
    # apple: 0.25 + 0.25 (3 == 3); banana: 0.25 (1 != 2)
    assert R.numeracy_score(prompt, apples + banana) == pytest.approx(0.75)
    # a duplicate apple box is dropped before counting
    assert R.numeracy_score(prompt, apples + banana + [det("apple", 0.6, (0, 0, 9, 8))]) == pytest.approx(0.75)
    # a duplicate box with another label is kept, and counted for that label: banana 2 == 2
    assert R.numeracy_score(prompt, apples + banana + [det("banana", 0.5, (0, 0, 9, 9))]) == pytest.approx(1.0)
    # four apples: presence only
    assert R.numeracy_score(prompt, apples + banana + [det("apple", 0.5, (80, 0, 89, 9))]) == pytest.approx(0.5)
    assert R.numeracy_score(prompt, []) == 0.0
    assert R.numeracy_score("a photo", apples) == 0.0


def test_numeracy_renames_containing_labels():
    dets = [det("green apple", 0.9, (0, 0, 9, 9)), det("apple", 0.8, (20, 0, 29, 9))]
    # "apple" is a label already: no renaming, one apple -> 0.5
    assert R.numeracy_score("two apples", dets) == 0.5
    # "pear" absent; "prickly pear" contains it -> renamed: present, 1 != 2 -> 0.5
    assert R.numeracy_score("two pears", [det("prickly pear", 0.9, (0, 0, 9, 9))]) == 0.5
    assert R.numeracy_score("one pear", [det("prickly pear", 0.9, (0, 0, 9, 9))]) == 1.0


# -------------------------------------------------------------------------------------------- complex
def test_complex_score():
    assert R.complex_score(0.6, 0.2, 0.3, "spatial") == pytest.approx(0.4)
    assert R.complex_score(0.6, 0.2, 0.3, "action") == pytest.approx(0.45)
    assert R.complex_score(0.6, 0.2, 0.4, "spatial_action") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="split"):
        R.complex_score(0.6, 0.2, 0.3, "attribute")
