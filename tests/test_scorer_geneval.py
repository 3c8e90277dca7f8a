"""GenEval's judge: the tiny Mask2Former segmenter, and evaluate_images.py's rules on hand-made detections."""

import numpy as np
import pytest
import torch

from silmm.backends.base import CheckpointError
from silmm.eval.benchmarks.geneval import questions_from_metadata
from silmm.eval.scorers import geneval_rules as R
from silmm.eval.scorers.mask2former import Segmenter, build_tiny_mask2former, instances_from_logits, mask_box
from silmm.eval.scorers.vision import Detection


# ------------------------------------------------------------------------------------------ segmenter
@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return Segmenter.load(build_tiny_mask2former(tmp_path_factory.mktemp("m2f") / "tiny", seed=0), device="cpu")


def test_segmenter_round_trip_batching_and_records(segmenter):
    assert segmenter.id2label[16] == "dog" and len(segmenter.id2label) == 80
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(48, 64, 3), (64, 64, 3), (48, 64, 3)]]
    batched = segmenter.instances(images, batch_size=3)
    single = [segmenter.instances([im])[0] for im in images]
    for im, a, b in zip(images, batched, single, strict=True):
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x.label == y.label and abs(x.score - y.score) < 1e-6 and (x.mask == y.mask).all()
        assert [d.score for d in a] == sorted((d.score for d in a), reverse=True)
        for d in a:
            assert d.mask.shape == im.shape[:2] and d.mask.dtype == bool and d.box == mask_box(d.mask)
            assert d.label in segmenter.id2label.values()
    cut = float(np.median([d.score for d in batched[0]]))
    assert all(d.score > cut for d in segmenter.instances(images[:1], threshold=cut)[0])


def test_instances_from_logits_follows_mmdet():
    # 2 queries, 2 classes (+ no-object); masks 4x5
    cls = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    masks = torch.full((2, 4, 5), -5.0)
    masks[0, 1:3, 1:4] = 2.0
    masks[1, 0, 0] = 1.0
    got = instances_from_logits(cls, masks, {0: "cat", 1: "dog"})
    p = torch.softmax(cls, -1)[:, :-1]
    sig2, sig1 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(1.0))
    want = {("cat", 0): p[0, 0] * sig2, ("dog", 0): p[0, 1] * sig2, ("cat", 1): p[1, 0] * sig1,
            ("dog", 1): p[1, 1] * sig1}
    assert len(got) == 4
    for d in got:
        q = 0 if d.box == (1.0, 1.0, 4.0, 3.0) else 1
        assert abs(d.score - float(want[(d.label, q)]) * (1 / (1 + 1e-6 / (6 if q == 0 else 1)))) < 1e-6
    assert got[0].box == (1.0, 1.0, 4.0, 3.0)
    assert [d.box for d in got if d.mask.sum() == 1] == [(0.0, 0.0, 1.0, 1.0)] * 2


def test_mask_box_is_mmdet_mask2bbox():
    m = np.zeros((6, 8), bool)
    m[2:5, 3:7] = True
    assert mask_box(m) == (3.0, 2.0, 7.0, 5.0)
    assert mask_box(np.zeros((3, 3), bool)) == (0.0, 0.0, 0.0, 0.0)


def test_missing_segmenter_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "absent")):
        Segmenter.load(tmp_path / "absent")


# ------------------------------------------------------------------------------------------ rules
def det(label, score, box, mask=None):
    return Detection(label, score, tuple(float(v) for v in box), mask)


def meta(tag, include, exclude=()):
    return {"tag": tag, "prompt": "p", "include": list(include), "exclude": list(exclude)}


def test_thresholds_are_strict_and_counting_uses_0_9():
    dets = [det("dog", 0.3, (0, 0, 10, 10)), det("dog", 0.31, (20, 0, 30, 10)), det("dog", 0.9, (40, 0, 50, 10)),
            det("dog", 0.91, (60, 0, 70, 10))]
    assert [d.score for d in R.group_detections(dets, "two_object")["dog"]] == [0.91, 0.9, 0.31]
    assert [d.score for d in R.group_detections(dets, "counting")["dog"]] == [0.91]
    assert "dog" not in R.group_detections(dets[:1], "single_object")


def test_max_objects_and_overlap():
    dets = [det("cup", 0.5 + i / 100, (i, 0, i + 10, 10)) for i in range(20)]
    assert len(R.group_detections(dets, "counting", threshold=0.3)["cup"]) == 16
    assert len(R.group_detections(dets, "x", max_overlap=1.0)["cup"]) == 16
    # with an overlap cap, boxes shifted by 1 px (IoU 10/12 with GenEval's +1 areas) are removed
    assert R.compute_iou((0, 0, 10, 10), (1, 0, 11, 10)) == pytest.approx(110 / 132)
    kept = R.group_detections(dets, "x", max_overlap=0.5)["cup"]
    assert all(R.compute_iou(a.box, b.box) < 0.5 for i, a in enumerate(kept) for b in kept[i + 1:])


def test_counting_exact_question_and_geneval_verdict():
    m = meta("counting", [{"class": "dog", "count": 3}], [{"class": "dog", "count": 4}])
    assert [q.text for q in questions_from_metadata(m)] == ["Are there exactly three dogs?"]
    boxes = [(i * 20, 0, i * 20 + 10, 10) for i in range(5)]
    three = [det("dog", 0.95, b) for b in boxes[:3]]
    assert R.question_verdicts(m, three) == [True]
    assert R.question_verdicts(m, three[:2]) == [False]
    assert R.question_verdicts(m, three + [det("dog", 0.95, boxes[3])]) == [False]
    # a fourth dog below the counting threshold is not counted
    assert R.question_verdicts(m, three + [det("dog", 0.9, boxes[3])]) == [True]
    assert R.image_correct(m, three) and not R.image_correct(m, three[:2])


def test_at_least_and_exclude_questions():
    m = meta("two_object", [{"class": "cat", "count": 2}], [{"class": "dog", "count": 1}])
    assert [q.text for q in questions_from_metadata(m)] == ["Are there at least two cats?", "Is there no dog?"]
    cats = [det("cat", 0.8, (0, 0, 5, 5)), det("cat", 0.7, (10, 0, 15, 5)), det("cat", 0.6, (20, 0, 25, 5))]
    assert R.question_verdicts(m, cats) == [True, True]
    assert R.question_verdicts(m, cats + [det("dog", 0.31, (0, 0, 1, 1))]) == [True, False]
    assert R.question_verdicts(m, cats[:1] + [det("dog", 0.29, (0, 0, 1, 1))]) == [False, True]


def test_relative_position_margin_both_sides():
    b = det("cat", 1, (100, 100, 120, 120))  # centre (110, 110), 20 x 20
    # A 20 x 20 shifted left by d: margin 0.1 * (20 + 20) = 4, revised dx = -(d - 4) / d: "left of" when d > 8
    assert R.relative_position(det("dog", 1, (100 - 9, 100, 120 - 9, 120)), b) == {"left of"}
    assert R.relative_position(det("dog", 1, (100 - 8, 100, 120 - 8, 120)), b) == set()  # exactly -0.5
    assert R.relative_position(det("dog", 1, (100 - 4, 100, 120 - 4, 120)), b) == set()  # inside the margin
    assert R.relative_position(det("dog", 1, (100 - 3, 100, 120 - 3, 120)), b) == set()
    assert R.relative_position(det("dog", 1, (109, 100, 129, 120)), b) == {"right of"}
    assert R.relative_position(det("dog", 1, (108, 100, 128, 120)), b) == set()
    # diagonal: offset (-30, -10); revised (-26, -6); over |offset| = sqrt(1000): dx = -0.822, dy = -0.19
    assert R.relative_position(det("dog", 1, (70, 90, 90, 110)), b) == {"left of"}
    # offset (-30, -24): revised (-26, -20) / 38.42 -> dx -0.677, dy -0.521: both
    assert R.relative_position(det("dog", 1, (70, 76, 90, 96)), b) == {"left of", "above"}
    # offset (-30, -22): revised (-26, -18) / 37.20 -> dy -0.484: left only
    assert R.relative_position(det("dog", 1, (70, 78, 90, 98)), b) == {"left of"}
    assert R.relative_position(det("dog", 1, (100, 130, 120, 150)), b) == {"below"}
    # the margin scales with the objects' sizes: a wider margin swallows the same offset
    assert R.relative_position(det("dog", 1, (85, 100, 105, 120)), b) == {"left of"}
    assert R.relative_position(det("dog", 1, (85, 100, 105, 120)), b, margin=0.2) == set()


def test_position_clause_every_pair_and_missing_target():
    m = meta("position", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}])
    assert [q.text for q in questions_from_metadata(m)] == ["Is there a cat?", "Is there a dog?",
                                                            "Is the dog to the left of the cat?"]
    cat = det("cat", 0.9, (100, 0, 120, 20))
    left, right = det("dog", 0.8, (0, 0, 20, 20)), det("dog", 0.7, (200, 0, 220, 20))
    assert R.question_verdicts(m, [cat, left]) == [True, True, True]
    assert R.question_verdicts(m, [cat, right]) == [True, True, False]
    # only the most confident dog (count 1) is checked
    assert R.question_verdicts(m, [cat, left, right]) == [True, True, True]
    assert R.question_verdicts(m, [left]) == [False, True, False]  # no target
    assert R.question_verdicts(m, [cat]) == [True, False, False]  # not reached


def test_colour_clause_with_stub_and_order_of_questions():
    m = meta("color_attr", [{"class": "car", "count": 1, "color": "red"},
                            {"class": "cup", "count": 2, "color": "blue", "position": ["below", 0]}])
    assert [q.text for q in questions_from_metadata(m)] == [
        "Is there a car?", "Is the car red?", "Are there at least two cups?", "Are the cups blue?",
        "Are the cups below the car?"]
    car = det("car", 0.9, (0, 0, 20, 20))
    cups = [det("cup", 0.8, (0, 100, 10, 110)), det("cup", 0.7, (15, 100, 25, 110)), det("cup", 0.6, (0, 50, 5, 55))]
    calls = []

    def stub(colours):
        def fn(image, objects, classname):
            calls.append((classname, len(objects)))
            return [colours[classname][i] for i in range(len(objects))]
        return fn

    image = np.zeros((120, 120, 3), np.uint8)
    ok = stub({"car": ["red"], "cup": ["blue", "blue", "green"]})
    assert R.question_verdicts(m, [car] + cups, image, ok) == [True] * 5
    assert calls == [("car", 1), ("cup", 2)]  # only the `count` most confident objects are classified
    one_blue = stub({"car": ["red"], "cup": ["blue", "green"]})
    assert R.question_verdicts(m, [car] + cups, image, one_blue) == [True, True, True, False, False]
    wrong_car = stub({"car": ["pink"], "cup": ["blue", "blue"]})
    # the car's colour fails, so the cups' position has no target
    assert R.question_verdicts(m, [car] + cups, image, wrong_car) == [True, False, True, True, False]
    with pytest.raises(ValueError):
        R.question_verdicts(m, [car] + cups)


def test_masked_crop_and_clip_colour_fn():
    image = np.zeros((10, 12, 3), np.uint8)
    image[..., 0] = 200
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:8] = True
    mask[2, 3] = False
    crop = R.masked_crop(image, det("cup", 1, (3, 2, 8, 6), mask))
    assert crop.shape == (4, 5, 3)
    assert tuple(crop[0, 0]) == R.BGCOLOR and tuple(crop[1, 1]) == (200, 0, 0)
    assert R.masked_crop(image, det("cup", 1, (2.6, 1.4, 8.5, 6.5))).shape == (5, 5, 3)  # PIL's round()

    class FakeJudge:
        def classify(self, images, labels, templates, batch_size=16):
            assert templates == ["a photo of a {c} cup", "a photo of a {c}-colored cup", "a photo of a {c} object"]
            assert list(labels) == list(R.COLORS)
            probs = np.zeros((len(images), len(labels)))
            for i, im in enumerate(images):
                probs[i, 0 if im[..., 0].mean() > 170 else 9] = 1
            return probs

    fn = R.clip_colour_fn(FakeJudge())
    assert fn(image, [det("cup", 1, (3, 2, 8, 6), mask), det("cup", 1, (0, 0, 1, 1), ~np.ones_like(mask))],
              "cup") == ["red", "white"]


def test_geneval_label_names():
    dets = [det("mouse", 0.9, (0, 0, 1, 1)), det("remote", 0.9, (0, 0, 1, 1))]
    assert set(R.group_detections(dets, "single_object")) == {"computer mouse", "tv remote"}
