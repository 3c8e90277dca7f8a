"""Mask2Former instance segmentation for GenEval (its detector: Mask2Former Swin-S, COCO instance, through
mmdetection; here ``Mask2FormerForUniversalSegmentation``, e.g. facebook/mask2former-swin-small-coco-instance).

Post-processing follows mmdetection's Mask2Former instance inference (the detector GenEval runs), not
transformers' ``post_process_instance_segmentation``, which resamples the mask logits to a fixed 384 x 384
whatever the input's shape and upsamples the binarised masks by nearest neighbour:
- mask logits upsampled (bilinear) to the padded input, the padding cropped off, upsampled (bilinear) to the
  original image size;
- scores = softmax over classes without the "no object" class; the top 100 (query, class) pairs
  (mmdet's ``max_per_image``);
- mask = logit > 0; mask score = mean sigmoid inside the mask; instance score = class score * mask score;
- box = the mask's tight box [x_min, y_min, x_max + 1, y_max + 1] (mmdet's ``mask2bbox``).
Instances with an empty mask or a score not above ``threshold`` are dropped; the rest come sorted by score,
highest first, labelled with the config's ``id2label`` (the COCO names GenEval's object_names.txt lists).

Input size: the checkpoint's image processor resizes; GenEval's mmdet test pipeline resizes to (1333, 800)
keeping the aspect ratio. Pass ``size=GENEVAL_TEST_SIZE`` to resize as GenEval does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from silmm.eval.scorers.loading import load_pretrained
from silmm.eval.scorers.vision import Detection

MAX_PER_IMAGE = 100  # mmdet Mask2Former test_cfg.max_per_image
GENEVAL_TEST_SIZE = {"shortest_edge": 800, "longest_edge": 1333}  # mmdet test pipeline Resize (1333, 800)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """mmdet's mask2bbox: the tight box of a bool mask, exclusive on the right/bottom; zeros when empty."""
    xs = np.flatnonzero(mask.any(axis=0))
    ys = np.flatnonzero(mask.any(axis=1))
    if not len(xs) or not len(ys):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


def instances_from_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor, id2label: dict[int, str],
                          threshold: float = 0.0, max_per_image: int = MAX_PER_IMAGE) -> list[Detection]:
    """One image's instances from its class logits [Q, C+1] and mask logits [Q, H, W] already at the image's
    size (the mmdet rule in the module docstring)."""
    class_logits, mask_logits = class_logits.float(), mask_logits.float()
    num_classes = class_logits.shape[1] - 1
    scores = class_logits.softmax(-1)[:, :-1].flatten()
    k = min(max_per_image, scores.numel())
    top_scores, top = scores.topk(k)
    # a mask score is at most 1, so a pair whose class score is not above the threshold cannot pass
    keep = top_scores > threshold
    top_scores, top = top_scores[keep], top[keep]
    out = []
    for score, index in zip(top_scores.tolist(), top.tolist(), strict=True):
        query, label = divmod(index, num_classes)
        logits = mask_logits[query]
        binary = logits > 0
        if not bool(binary.any()):
            continue
        mask_score = float((logits.sigmoid() * binary).sum() / (binary.sum() + 1e-6))
        final = score * mask_score
        if final <= threshold:
            continue
        mask = binary.cpu().numpy()
        out.append(Detection(label=id2label.get(label, str(label)), score=final, box=mask_box(mask), mask=mask))
    out.sort(key=lambda d: -d.score)
    return out


class Segmenter:
    """Mask2Former with its image processor; ``instances`` takes uint8 [H, W, 3] images of any sizes."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype, path: Path | None = None,
                 size: dict | None = None):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.path = path
        self.size = size
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             size: dict | None = None) -> Segmenter:
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        loaded = load_pretrained(Mask2FormerForUniversalSegmentation, AutoImageProcessor, path, "Mask2Former",
                                 device, dtype)
        return cls(*loaded, size)

    @torch.no_grad()
    def instances(self, images: Sequence[np.ndarray], threshold: float = 0.0,
                  batch_size: int = 4) -> list[list[Detection]]:
        """Per image, its instances with score > threshold, highest score first (masks at the image's size).
        Only images of one shape share a forward pass (padding would change the backbone's features; GenEval
        runs one image at a time), so batching gives the one-at-a-time answers."""
        arrays = [np.asarray(im, dtype=np.uint8) for im in images]
        by_shape: dict[tuple, list[int]] = {}
        for k, im in enumerate(arrays):
            by_shape.setdefault(im.shape, []).append(k)
        out: list[list[Detection]] = [[] for _ in arrays]
        for indices in by_shape.values():
            for i in range(0, len(indices), batch_size):
                chunk = indices[i:i + batch_size]
                for k, found in zip(chunk, self._forward([arrays[k] for k in chunk], threshold), strict=True):
                    out[k] = found
        return out

    def _forward(self, chunk: list[np.ndarray], threshold: float) -> list[list[Detection]]:
        kwargs = {"size": self.size} if self.size is not None else {}
        enc = self.processor(images=chunk, return_tensors="pt", **kwargs)
        pixels = enc["pixel_values"].to(self.device, self.dtype)
        result = self.model(pixel_values=pixels, pixel_mask=enc["pixel_mask"].to(self.device))
        masks = F.interpolate(result.masks_queries_logits.float(), size=pixels.shape[-2:], mode="bilinear",
                              align_corners=False)
        out = []
        for j, image in enumerate(chunk):
            valid = enc["pixel_mask"][j].bool()
            h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
            m = F.interpolate(masks[j:j + 1, :, :h, :w], size=image.shape[:2], mode="bilinear",
                              align_corners=False)[0]
            out.append(instances_from_logits(result.class_queries_logits[j], m, self.id2label, threshold))
        return out

def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         size: dict | None = None) -> Segmenter:
    return Segmenter.load(path, device, dtype, size)


# ------------------------------------------------------------------------------------------ tiny checkpoint
# COCO's 80 thing classes in the order of mmdet's CocoDataset.CLASSES / GenEval's object_names.txt
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def build_tiny_mask2former(out_dir: str | Path, seed: int = 0, labels: Sequence[str] = COCO_NAMES,
                           image_size: int = 64) -> Path:
    """A tiny random Mask2Former (tiny Swin backbone) with COCO labels and its image processor, offline."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=12,
                               id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    model.save_pretrained(str(out))
    Mask2FormerImageProcessorPil(size={"shortest_edge": image_size, "longest_edge": 2 * image_size},
                                 size_divisor=32).save_pretrained(str(out))
    return out


__all__ = ["COCO_NAMES", "GENEVAL_TEST_SIZE", "MAX_PER_IMAGE", "Segmenter", "build_tiny_mask2former",
           "instances_from_logits", "load", "mask_box"]
