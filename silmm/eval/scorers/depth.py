"""Monocular depth (DPT) for T2I-CompBench's 3D spatial category ("in front of", "behind", "hidden").

The benchmark (UniDet_eval/3D_spatial_eval.py with experts/model_bank_3d.py) runs DPT-Hybrid MiDaS on each
image, min-max normalises the prediction to [0, 1], resizes it to the image's size (bilinear,
align_corners=True) and stores it as an 8-bit PNG, which the 3D rule reads back. Here: the same model family
through transformers (``DPTForDepthEstimation``, e.g. Intel/dpt-hybrid-midas), its own preprocessing
(``DPTImageProcessor``), the prediction resized the same way and, by default, min-max normalised the same
way (not quantised to 8 bits). MiDaS predicts relative inverse depth: larger = nearer the camera, which is
what the 3D rule assumes ("A in front of B" when A's mean is larger).

``depth(images)`` -> one float32 [H, W] map per image, in the image's own size. Each image is preprocessed
once; images whose processed sizes agree are run as one batch (so ``keep_aspect_ratio`` processors work),
and a batch gives the same maps as one image at a time. ``build_tiny_dpt`` writes a tiny random checkpoint
offline in the real layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from silmm.eval.scorers.loading import load_pretrained


def normalize_depth(depth: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] as the benchmark does before saving; a constant map becomes zeros (the benchmark
    would divide by zero)."""
    lo, hi = depth.min(), depth.max()
    return (depth - lo) / (hi - lo) if hi > lo else torch.zeros_like(depth)


class DepthJudge:
    """DPT with its image processor; ``depth`` takes lists of uint8 [H, W, 3] images (any sizes)."""

    def __init__(self, model, image_processor, device: torch.device, dtype: torch.dtype, path: Path | None = None):
        self.model = model
        self.image_processor = image_processor
        self.device = device
        self.dtype = dtype
        self.path = path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> DepthJudge:
        from transformers import DPTForDepthEstimation, DPTImageProcessor

        return cls(*load_pretrained(DPTForDepthEstimation, DPTImageProcessor, path, "DPT", device, dtype))

    @torch.no_grad()
    def depth(self, images: Sequence[np.ndarray], batch_size: int = 8, normalize: bool = True) -> list[np.ndarray]:
        """One float32 [H, W] relative inverse-depth map per image (larger = nearer), at the image's size;
        min-max normalised to [0, 1] per image when ``normalize`` (as the benchmark)."""
        arrays = [np.asarray(im, dtype=np.uint8) for im in images]
        pixels = [self.image_processor(images=im, return_tensors="pt")["pixel_values"][0] for im in arrays]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(tuple(p.shape), []).append(i)
        maps: list[np.ndarray | None] = [None] * len(arrays)
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                part = idx[start:start + batch_size]
                batch = torch.stack([pixels[i] for i in part]).to(self.device, self.dtype)
                pred = self.model(pixel_values=batch).predicted_depth.float().cpu()  # [B, h, w]
                for i, d in zip(part, pred, strict=True):
                    h, w = arrays[i].shape[:2]
                    d = F.interpolate(d[None, None], size=(h, w), mode="bilinear", align_corners=True)[0, 0]
                    maps[i] = (normalize_depth(d) if normalize else d).numpy().astype(np.float32)
        return maps  # type: ignore[return-value]


def build_tiny_dpt(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random DPT (ViT backbone) checkpoint in the real layout (config, weights, image processor),
    written offline; ``DepthJudge.load(out_dir)`` reads it."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    out = Path(out_dir)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=image_size, patch_size=8, backbone_out_indices=(0, 1, 2, 3),
                       neck_hidden_sizes=(8, 16, 32, 64), fusion_hidden_size=16, reassemble_factors=(4, 2, 1, 0.5),
                       use_auxiliary_head=False)
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(config).eval()
    model.save_pretrained(str(out))
    DPTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(str(out))
    return out
