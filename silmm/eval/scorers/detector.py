"""An open-vocabulary detector (OWLv2) standing in for T2I-CompBench's UniDet (2D spatial, numeracy, the
spatial part of complex, and 3D spatial with depth).

UniDet is not shipped by any well-kept library; OWLv2 (``Owlv2ForObjectDetection``) is, and takes the
object names as text queries, so no label vocabulary has to be mapped. What is kept from the benchmark's
UniDet set-up (UniDet_eval/experts/model_bank.py, obj_detection/utils.py): a confidence threshold of 0.5
(``--confidence-threshold`` default, set as ROI_HEADS.SCORE_THRESH_TEST) and per-class non-maximum
suppression at IoU 0.5 (detectron2's default NMS_THRESH_TEST), detections listed by decreasing score (the
order detectron2 returns, which the rules rely on: "the first detection of a label" is its best one).
OWLv2 itself has no NMS; without it one object yields many overlapping boxes and every count is wrong.

Boxes are in the pixels of the image as given (x0, y0, x1, y1), clipped to it. OWLv2's processor pads an
image to a square (bottom/right) before resizing, so its normalised boxes are rescaled by the padded side
max(H, W). The rules (t2i_rules.py) convert to UniDet's frame where a threshold is in pixels.

Each image is preprocessed once per call; its text queries are its own (images of one batch may ask for
different objects; shorter query lists are padded and the padding never wins, so a batch gives the same
detections as one image at a time). ``build_tiny_owlv2`` writes a tiny random checkpoint offline in the
real layout (config, weights, CLIP-style BPE tokenizer, Owlv2ImageProcessor).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from silmm.eval.scorers.loading import load_pretrained
from silmm.eval.scorers.vision import Detection

UNIDET_THRESHOLD = 0.5  # T2I-CompBench's UniDet confidence threshold
UNIDET_NMS_IOU = 0.5  # detectron2's ROI_HEADS.NMS_THRESH_TEST default


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes [N, 4] against [M, 4] (x0, y0, x1, y1) -> [N, M]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy NMS: indices kept, by decreasing score (torchvision.ops.nms semantics: drop IoU > iou)."""
    order = torch.argsort(scores, descending=True, stable=True)
    keep: list[int] = []
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    ious = box_iou(boxes[order], boxes[order])
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(int(order[i]))
        suppressed |= ious[i] > iou
    return torch.tensor(keep, dtype=torch.long)


class Detector:
    """OWLv2 with its processor; ``detect`` takes lists of uint8 [H, W, 3] images (any sizes)."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype, path: Path | None = None):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.path = path
        self.max_query_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> Detector:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        return cls(*load_pretrained(Owlv2ForObjectDetection, Owlv2Processor, path, "OWLv2", device, dtype))

    def _queries(self, labels: Sequence[str], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [n, L] of the labels, padded with blank queries to n."""
        texts = list(labels) + [" "] * (n - len(labels))
        enc = self.processor.tokenizer(texts, padding="max_length", truncation=True,
                                       max_length=self.max_query_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def detect(self, images: Sequence[np.ndarray], labels_per_image: Sequence[Sequence[str]],
               threshold: float = UNIDET_THRESHOLD, nms_iou: float | None = UNIDET_NMS_IOU,
               batch_size: int = 8, template: str = "{}") -> list[list[Detection]]:
        """For each image, the detections of its labels with score > threshold, by decreasing score.

        ``template`` turns a label into the query text (``"{}"``: the label itself); the Detection's label
        is the label as given. ``nms_iou``: per-label NMS (None: off). An image without labels gets [].
        """
        if len(images) != len(labels_per_image):
            raise ValueError(f"detect: {len(images)} images but {len(labels_per_image)} label lists")
        out: list[list[Detection]] = []
        for start in range(0, len(images), batch_size):
            chunk = [np.asarray(im, dtype=np.uint8) for im in images[start:start + batch_size]]
            labels = [list(dict.fromkeys(ls)) for ls in labels_per_image[start:start + batch_size]]
            out.extend(self._detect_chunk(chunk, labels, threshold, nms_iou, template))
        return out

    def _detect_chunk(self, images, labels, threshold, nms_iou, template) -> list[list[Detection]]:
        n_queries = max([len(ls) for ls in labels] + [1])
        ids, mask = zip(*(self._queries([template.format(lb) for lb in ls], n_queries) for ls in labels),
                        strict=True)
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        outputs = self.model(input_ids=torch.cat(ids).to(self.device),
                             attention_mask=torch.cat(mask).to(self.device),
                             pixel_values=pixels.to(self.device, self.dtype))
        logits = outputs.logits.float().cpu()  # [B, patches, n_queries]
        boxes_cxcywh = outputs.pred_boxes.float().cpu()  # [B, patches, 4], relative to the padded square
        results = []
        for b, (image, ls) in enumerate(zip(images, labels, strict=True)):
            if not ls:
                results.append([])
                continue
            best = logits[b, :, :len(ls)].max(dim=-1)  # the image's own queries only
            scores = torch.sigmoid(best.values)
            h, w = image.shape[:2]
            side = float(max(h, w))
            cx, cy, bw, bh = boxes_cxcywh[b].unbind(-1)
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * side
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            keep = torch.nonzero(scores > threshold).flatten()
            if nms_iou is not None and len(keep):
                kept = []
                for q in best.indices[keep].unique():
                    idx = keep[best.indices[keep] == q]
                    kept.append(idx[nms(boxes[idx], scores[idx], nms_iou)])
                keep = torch.cat(kept)
            keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
            results.append([Detection(ls[int(best.indices[i])], float(scores[i]),
                                      tuple(float(v) for v in boxes[i].tolist())) for i in keep])
        return results


# ---------------------------------------------------------------------------------------------- tiny
def build_tiny_owlv2(out_dir: str | Path, seed: int = 0, image_size: int = 64, patch_size: int = 16) -> Path:
    """A tiny random OWLv2 checkpoint in the real layout (config, weights, tokenizer, image processor),
    written offline; ``Detector.load(out_dir)`` reads it."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from silmm.eval.scorers.clip import build_clip_tokenizer

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer()  # OWLv2's text tower is CLIP's, with CLIP's tokenizer
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG as it was
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(config).eval()
    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    model.save_pretrained(str(out))
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out))
    return out
