"""CLIP as a judge: CLIPScore for T2I-CompBench++ (non-spatial, and the CLIP part of complex) and zero-shot
classification for GenEval's colour rule.

CLIPScore as T2I-CompBench computes it (CLIPScore_eval/CLIP_similarity.py, CLIP ViT-B/32): the image through
CLIP's preprocessing (resize the short side to 224 bicubic, centre crop, normalise), the prompt through the CLIP
tokenizer, both embeddings L2-normalised, the score the plain cosine ``image . text``: no x100 scaling (the
CLIPScore paper's 2.5 * max(cos, 0) is not used), no clipping at 0. The text is the prompt itself; for the
complex category the benchmark drops the adjectives first (spaCy POS ``ADJ``), which the caller does before
passing the text. One deviation: OpenAI's ``clip.tokenize`` raises on a prompt over 77 tokens, here it is
truncated to the model's context length.

Zero-shot classification as GenEval's colour classifier computes it (clip_benchmark's
``zero_shot_classifier`` / ``run_classification``): per label, the embeddings of every template filled with the
label are L2-normalised, averaged and normalised again; an image's logits are ``100 * image . label``; the
probabilities their softmax (GenEval takes the argmax).

Loading: ``CLIPModel`` + ``CLIPProcessor`` from a local directory (``openai/clip-vit-base-patch32`` for
CLIPScore, ``openai/clip-vit-large-patch14`` for GenEval colours), bf16 on CUDA, fp32 on CPU; the similarity
and logit arithmetic is done in float32 on the embeddings. ``build_tiny_clip`` writes a tiny random checkpoint
in the same layout, offline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from silmm.eval.scorers.loading import load_pretrained

CLASSIFY_SCALE = 100.0  # clip_benchmark's run_classification: logits = 100 * image_features @ classifier


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor in older transformers and a ModelOutput (pooler_output) in newer."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _fill(template: str, label: str) -> str:
    """A template's placeholder is ``{c}`` (GenEval's) or ``{}``."""
    return template.format(label, c=label)


class ClipJudge:
    """A CLIP model with its processor; every method takes lists of uint8 [H, W, 3] images (any sizes)."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype, path: Path | None = None):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.path = path
        self.context_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> ClipJudge:
        from transformers import CLIPModel, CLIPProcessor

        return cls(*load_pretrained(CLIPModel, CLIPProcessor, path, "CLIP", device, dtype))

    # embeddings -------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_embeddings(self, images: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings, float32 on CPU, [N, D]; each image preprocessed once."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = [np.asarray(im, dtype=np.uint8) for im in images[i:i + batch_size]]
            pixels = self.processor.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            out.append(feats.float().cpu())
        if not out:
            return torch.zeros(0, self.model.config.projection_dim)
        feats = torch.cat(out)
        return feats / feats.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised text embeddings, float32 on CPU, [T, D] (texts over the context length truncated)."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.processor.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                           max_length=self.context_length, return_tensors="pt")
            feats = _features(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                           attention_mask=enc["attention_mask"].to(self.device)))
            out.append(feats.float().cpu())
        if not out:
            return torch.zeros(0, self.model.config.projection_dim)
        feats = torch.cat(out)
        return feats / feats.norm(dim=-1, keepdim=True)

    # T2I-CompBench CLIPScore ---------------------------------------------------------------------------
    def similarity(self, images: Sequence[np.ndarray], texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Cosine similarity of image i with text i (CLIP_similarity.py), float64 [N]. A text shared by many
        images is encoded once."""
        if len(images) != len(texts):
            raise ValueError(f"similarity: {len(images)} images but {len(texts)} texts")
        if not len(images):
            return np.zeros(0)
        unique = list(dict.fromkeys(texts))
        text_feats = self.text_embeddings(unique, batch_size)
        rows = torch.tensor([unique.index(t) for t in texts])
        image_feats = self.image_embeddings(images, batch_size)
        return (image_feats * text_feats[rows]).sum(-1).double().numpy()

    # zero-shot classification (GenEval colours) ----------------------------------------------------------
    def classifier(self, labels: Sequence[str], templates: str | Sequence[str]) -> torch.Tensor:
        """clip_benchmark's zero-shot classifier: [D, L], one normalised mean-of-templates column per label."""
        templates = [templates] if isinstance(templates, str) else list(templates)
        if not labels or not templates:
            raise ValueError("classifier: need at least one label and one template")
        feats = self.text_embeddings([_fill(t, lab) for lab in labels for t in templates])
        feats = feats.view(len(labels), len(templates), -1).mean(1)
        return (feats / feats.norm(dim=-1, keepdim=True)).T

    def classify(self, images: Sequence[np.ndarray], labels: Sequence[str], templates: str | Sequence[str],
                 batch_size: int = 32) -> np.ndarray:
        """Zero-shot probabilities [N, L] (softmax of 100 * image . label), float64."""
        clf = self.classifier(labels, templates)
        if not len(images):
            return np.zeros((0, len(labels)))
        logits = CLASSIFY_SCALE * (self.image_embeddings(images, batch_size) @ clf)
        return torch.softmax(logits.double(), dim=-1).numpy()


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ClipJudge:
    return ClipJudge.load(path, device, dtype)


# ------------------------------------------------------------------------------------------ tiny checkpoint
_TINY_WORDS = ("red orange yellow green blue purple pink brown black white colored object photo of a an the "
               "person bicycle car motorcycle airplane bus train truck boat dog cat bird horse sheep cow "
               "elephant bear zebra giraffe cup bowl banana apple orange pizza cake chair couch bed table "
               "tv laptop book clock vase scissors teddy toothbrush and with on in to left right above below "
               "two three four big small wooden metallic leather round square")


def build_clip_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 600):
    """A tiny CLIP tokenizer (CLIP's normalisation, pre-tokenizer and ``</w>`` BPE) trained offline on a few
    words in milliseconds: byte-level, so any text encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)
    corpus = [_TINY_WORDS] * 4 + [" ".join(f"a photo of a {w}" for w in _TINY_WORDS.split())]
    bpe.train_from_iterator(corpus, trainer=trainer)
    learned = bpe.get_vocab()
    # CLIP's layout: every byte and byte+"</w>" are tokens, then the merges, then the two specials last
    base = sorted(alphabet)
    vocab: dict[str, int] = {}
    for tok in base + [b + "</w>" for b in base]:
        vocab.setdefault(tok, len(vocab))
    for tok, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    vocab[bos] = len(vocab)
    vocab[eos] = len(vocab)
    merges = [tuple(m) if isinstance(m, (tuple, list)) else tuple(m.split(" "))
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_tiny_clip(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random CLIP checkpoint (model, tokenizer, image processor) in the real layout, built offline."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(out))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out))
    return out


__all__ = ["CLASSIFY_SCALE", "ClipJudge", "build_clip_tokenizer", "build_tiny_clip", "load"]
