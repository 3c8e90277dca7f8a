"""The OWLv2 detector and the DPT depth judge on tiny random checkpoints built offline: loading through the
real code path, output shapes and frames, batching equal to one image at a time, missing checkpoints."""

import numpy as np
import pytest
import torch

from silmm.backends.base import CheckpointError
from silmm.eval.scorers.depth import DepthJudge, build_tiny_dpt, normalize_depth
from silmm.eval.scorers.detector import Detector, box_iou, build_tiny_owlv2, nms
from silmm.eval.scorers.vision import Detection


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return Detector.load(build_tiny_owlv2(tmp_path_factory.mktemp("owlv2") / "ckpt"))


@pytest.fixture(scope="module")
def depth_judge(tmp_path_factory):
    return DepthJudge.load(build_tiny_dpt(tmp_path_factory.mktemp("dpt") / "ckpt"))


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            rng.integers(0, 256, (70, 40, 3), dtype=np.uint8)]


def _same(a: list[Detection], b: list[Detection]):
    assert [d.label for d in a] == [d.label for d in b]
    np.testing.assert_allclose([d.score for d in a], [d.score for d in b], atol=1e-5)
    np.testing.assert_allclose(np.array([d.box for d in a]).reshape(-1, 4), np.array([d.box for d in b]).reshape(-1, 4),
                               atol=1e-3)


def test_tiny_owlv2_round_trip_and_detections(detector):
    assert detector.dtype == torch.float32 and detector.path is not None
    images = _images()
    labels = [["dog", "cat"], ["apple"], ["car", "tree", "person"]]
    out = detector.detect(images, labels, threshold=0.0, nms_iou=None)
    assert len(out) == 3
    for image, ls, dets in zip(images, labels, out, strict=True):
        h, w = image.shape[:2]
        assert dets, "threshold 0 keeps every box"
        assert {d.label for d in dets} <= set(ls)
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        for d in dets:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
            assert 0.0 <= d.score <= 1.0
    # an image without queries gets nothing; a threshold of 1 keeps nothing
    assert detector.detect(images[:1], [[]]) == [[]]
    assert detector.detect(images[:1], [["dog"]], threshold=1.0) == [[]]


def test_detect_batch_equals_one_at_a_time(detector):
    images = _images()
    labels = [["dog", "cat"], ["apple"], ["car", "tree", "person"]]  # different query counts: padding
    batched = detector.detect(images, labels, threshold=0.0, batch_size=3)
    for image, ls, dets in zip(images, labels, batched, strict=True):
        _same(dets, detector.detect([image], [ls], threshold=0.0)[0])


def test_nms_per_label():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # IoU([0,0,10,10],[0,0,10,9]) = 0.9 > 0.5; IoU([1,1,10,10],[0,0,10,9]) = 72/99 > 0.5
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    assert box_iou(boxes[:1], boxes[2:3]).item() == 0.0


def test_tiny_dpt_depth_shapes_and_batching(depth_judge):
    images = _images()
    maps = depth_judge.depth(images, batch_size=2)
    for image, m in zip(images, maps, strict=True):
        assert m.shape == image.shape[:2] and m.dtype == np.float32
        assert m.min() == pytest.approx(0.0) and m.max() == pytest.approx(1.0)
    for image, m in zip(images, maps, strict=True):
        np.testing.assert_allclose(depth_judge.depth([image])[0], m, atol=1e-5)
    raw = depth_judge.depth(images[:1], normalize=False)[0]
    np.testing.assert_allclose(normalize_depth(torch.from_numpy(raw)).numpy(), maps[0], atol=1e-5)


def test_normalize_constant_map():
    assert normalize_depth(torch.full((3, 4), 2.0)).abs().sum() == 0


@pytest.mark.parametrize("load", [Detector.load, DepthJudge.load])
def test_missing_checkpoint_names_path(tmp_path, load):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=str(missing)):
        load(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load(empty)
