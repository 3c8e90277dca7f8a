"""BLIP VQA as T2I-CompBench(++) runs it, on transformers' ``BlipForQuestionAnswering``.

What T2I-CompBench does (Karine-Huang/T2I-CompBench, BLIPvqa_eval/BLIP_vqa.py, models/blip_vqa.py
``BLIP_VQA.vqa_prob``, data/utils.py ``pre_question``, data/__init__.py, configs/vqa.yaml):
- the question is the noun phrase + "?", passed through ``pre_question`` (lower-cased; ``.!"()*#:;~``
  removed; at most 50 words), tokenised BERT-style (max 35 tokens) with the first token ([CLS]) replaced
  by BLIP's [ENC] token, and encoded by the text encoder cross-attending to the image;
- the answer decoder runs ONE step from [DEC] (the bos token), cross-attending to the question states
  with the question's attention mask; softmax over the whole vocabulary of that step's logits;
  p_yes = prob of "yes" (bert-base-uncased id 2748), p_no = prob of "no" (id 2053);
  the question's score is p_yes / (p_yes + p_no), the image's score the product over its questions
  (a missing 8th, 7th... noun phrase counts as 1). The product is the benchmark's job, not this module's.
- images: resized to 480x480 bicubic, CLIP mean/std (ViT-B, model_base_vqa_capfilt_large.pth).

Where this module can differ, and how to tell:
- [ENC]: used when the checkpoint's tokenizer knows "[ENC]" (``enc_token_id`` records it); transformers'
  BLIP tokenizers may not, and then the question keeps its [CLS] as transformers' own BLIP code does
  (``recipe_notes`` says so). ``load(..., enc_token_id=...)`` sets it explicitly (30523 in the original).
- resolution: the checkpoint's image processor size unless ``load(..., image_size=480)``; a size other
  than the vision config's uses interpolated position embeddings.
- "yes"/"no" ids are looked up in the tokenizer (they are 2748/2053 in the real vocabulary).

Also here, for DPG-Bench and TIFA (whose recommended mPLUG-large transformers does not ship):
``answer`` (free-form, BLIP's generate recipe: 3 beams, at most 10 tokens, stop at [SEP]) and
``choose`` (multiple choice). ``choose`` follows TIFA (Yushi-Hu/tifa, tifascore/mc_sbert.py) when a
sentence-embedding checkpoint is given (``sbert_path``, e.g. all-mpnet-base-v2): free-form answer,
mean-pooled L2-normalised embeddings of it and of the choices, the choice with the largest dot product;
method "sbert". Without one it ranks the choices by the VQA model's log-likelihood of each as the
answer (sum of log-probabilities of its tokens and the closing [SEP], no label smoothing); method
"likelihood".

Batching: each call preprocesses and encodes each image once; questions are then batched over
(image, question) pairs with ``batch_size``, grouped by token count so none is padded (see ``_batches``). All probabilities are computed in float32 from the logits
and returned as float64 numpy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from silmm.backends.base import CheckpointError

QUESTION_MAX_TOKENS = 35  # models/blip_vqa.py: tokenizer(..., truncation=True, max_length=35)
QUESTION_MAX_WORDS = 50  # data/utils.py: pre_question(max_ques_words=50)
OFFICIAL_IMAGE_SIZE = 480  # configs/vqa.yaml
GENERATE_KWARGS = {"num_beams": 3, "max_length": 10, "min_length": 1}  # models/blip_vqa.py, inference='generate'


def pre_question(question: str) -> str:
    """BLIP's question normalisation (data/utils.py): lower-case, drop ``.!"()*#:;~``, strip trailing
    spaces, keep the first 50 words. "?" stays."""
    q = re.sub(r"[.!\"()*#:;~]", "", question.lower()).rstrip(" ")
    words = q.split(" ")
    return " ".join(words[:QUESTION_MAX_WORDS]) if len(words) > QUESTION_MAX_WORDS else q


def _required(path: Path, names: Sequence[str]) -> None:
    """Each name must exist in path; "a|b" means either."""
    if not path.is_dir():
        raise CheckpointError(f"BLIP VQA checkpoint {path}: no such directory")
    missing = [n for n in names if not any((path / alt).exists() for alt in n.split("|"))]
    if missing:
        raise CheckpointError(f"BLIP VQA checkpoint {path}: missing {', '.join(missing)}")


class BlipVQA:
    """A BLIP VQA judge. Images are uint8 numpy [H, W, 3]."""

    def __init__(self, model, processor, path: Path, device: torch.device, dtype: torch.dtype,
                 enc_token_id: int | None = None, image_size: int | None = None, sbert=None):
        self.model, self.processor, self.path = model, processor, Path(path)
        self.tokenizer = processor.tokenizer
        self.device, self.dtype = device, dtype
        self.sbert = sbert  # (tokenizer, model) of a sentence-embedding checkpoint, or None
        tok = self.tokenizer
        self.yes_id, self.no_id = self._word_id("yes"), self._word_id("no")
        self.bos_id = model.config.text_config.bos_token_id
        self.sep_id = model.config.text_config.sep_token_id
        self.pad_id = model.config.text_config.pad_token_id
        self.recipe_notes: list[str] = []
        if enc_token_id is None:
            enc = tok.convert_tokens_to_ids("[ENC]")
            enc_token_id = enc if enc is not None and enc != tok.unk_token_id else None
        self.enc_token_id = enc_token_id
        if enc_token_id is None:
            self.recipe_notes.append("question starts with [CLS], not BLIP's [ENC] (the tokenizer has no [ENC])")
        native = model.config.vision_config.image_size
        proc_size = processor.image_processor.size
        self.image_size = image_size or int(proc_size.get("height", native))
        self.interpolate = self.image_size != native
        if self.image_size != OFFICIAL_IMAGE_SIZE:
            self.recipe_notes.append(f"images resized to {self.image_size}, T2I-CompBench uses {OFFICIAL_IMAGE_SIZE}")

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
             enc_token_id: int | None = None, image_size: int | None = None,
             sbert_path: str | Path | None = None) -> BlipVQA:
        from transformers import BlipForQuestionAnswering, BlipProcessor

        path = Path(path)
        _required(path, ["config.json", "preprocessor_config.json|processor_config.json"])
        try:
            processor = BlipProcessor.from_pretrained(str(path), local_files_only=True)
            model = BlipForQuestionAnswering.from_pretrained(str(path), local_files_only=True, dtype=dtype,
                                                             use_safetensors=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"BLIP VQA checkpoint {path}: cannot load ({e})") from e
        model.to(device).eval()
        sbert = None
        if sbert_path is not None:
            from transformers import AutoModel, AutoTokenizer

            sp = Path(sbert_path)
            _required(sp, ["config.json"])
            try:
                sbert = (AutoTokenizer.from_pretrained(str(sp), local_files_only=True),
                         AutoModel.from_pretrained(str(sp), local_files_only=True, use_safetensors=True)
                         .to(device).eval())
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"sentence-embedding checkpoint {sp}: cannot load ({e})") from e
        return cls(model, processor, path, torch.device(device), dtype, enc_token_id, image_size, sbert)

    def _word_id(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise CheckpointError(f"BLIP VQA checkpoint {self.path}: {word!r} is not one token of its tokenizer")
        return ids[0]

    # ----------------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray], batch_size: int = 16) -> torch.Tensor:
        """Vision-encoder states [N, L, D], each image preprocessed and encoded once."""
        out = []
        size = {"height": self.image_size, "width": self.image_size}
        for i in range(0, len(images), batch_size):
            chunk = [np.asarray(im, dtype=np.uint8) for im in images[i:i + batch_size]]
            pix = self.processor.image_processor(images=chunk, size=size, return_tensors="pt")["pixel_values"]
            vis = self.model.vision_model(pixel_values=pix.to(self.device, self.dtype),
                                          interpolate_pos_encoding=self.interpolate)
            out.append(vis.last_hidden_state)
        return torch.cat(out)

    def _tokenize_questions(self, questions: Sequence[str]):
        enc = self.tokenizer([pre_question(q) for q in questions], padding="longest", truncation=True,
                             max_length=QUESTION_MAX_TOKENS, return_tensors="pt")
        ids = enc["input_ids"].clone()
        if self.enc_token_id is not None:
            ids[:, 0] = self.enc_token_id
        return ids.to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def question_states(self, image_states: torch.Tensor, questions: Sequence[str]):
        """Text-encoder states of question i on image_states[i]: (states [B, T, D], mask [B, T])."""
        ids, mask = self._tokenize_questions(questions)
        img_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=self.device)
        states = self.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_states,
                                         encoder_attention_mask=img_mask).last_hidden_state
        return states, mask

    def _batches(self, image_states, questions_per_image, batch_size):
        """(image, question) pairs in batches of questions with the same token count, so that no question is
        ever padded: yields (flat indices, image states, questions). Why: transformers' BLIP text layers (5.x)
        do not pass the question mask to the decoder's cross-attention, so a padded question would attend
        to its pads and its answer would depend on its batch-mates (BLIP itself masks them)."""
        pairs = [(i, q) for i, qs in enumerate(questions_per_image) for q in qs]
        if not pairs:
            return
        lengths = self._tokenize_questions([q for _, q in pairs])[1].sum(1).tolist()
        order = sorted(range(len(pairs)), key=lambda k: (lengths[k], k))
        groups: list[list[int]] = []
        for k in order:
            if groups and lengths[groups[-1][0]] == lengths[k] and len(groups[-1]) < batch_size:
                groups[-1].append(k)
            else:
                groups.append([k])
        for ks in groups:
            yield ks, image_states[[pairs[k][0] for k in ks]], [pairs[k][1] for k in ks]

    def _check(self, images, per_image):
        if len(images) != len(per_image):
            raise ValueError(f"{len(images)} images but {len(per_image)} question lists")

    # ----------------------------------------------------------------------------------- yes / no
    @torch.no_grad()
    def first_step_probs(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax (float32) of the decoder's first-step logits from [DEC]: [B, V]."""
        start = torch.full((states.shape[0], 1), self.bos_id, dtype=torch.long, device=self.device)
        logits = self.model.text_decoder(input_ids=start, encoder_hidden_states=states,
                                         encoder_attention_mask=mask).logits[:, 0, :]
        return torch.softmax(logits.float(), dim=-1)

    def yes_no(self, images: Sequence[np.ndarray], questions_per_image: Sequence[Sequence[str]],
               batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image: (p_yes [Q], p_no [Q]) as T2I-CompBench's vqa_prob computes them (before its ratio);
        the per-question score is p_yes / (p_yes + p_no), see :func:`yes_ratio`."""
        self._check(images, questions_per_image)
        image_states = self.encode_images(images, batch_size)
        n = sum(len(qs) for qs in questions_per_image)
        yes, no = np.zeros(n, np.float64), np.zeros(n, np.float64)
        for ks, states_img, qs in self._batches(image_states, questions_per_image, batch_size):
            probs = self.first_step_probs(*self.question_states(states_img, qs)).cpu().double()
            yes[ks] = probs[:, self.yes_id].numpy()
            no[ks] = probs[:, self.no_id].numpy()
        return list(zip(_split(yes, questions_per_image), _split(no, questions_per_image), strict=True))

    # ----------------------------------------------------------------------------------- free form
    @torch.no_grad()
    def answer(self, images: Sequence[np.ndarray], questions_per_image: Sequence[Sequence[str]],
               batch_size: int = 16) -> list[list[str]]:
        """Free-form answers, BLIP's generate recipe (3 beams, max_length 10, min_length 1, stop at [SEP])."""
        self._check(images, questions_per_image)
        image_states = self.encode_images(images, batch_size)
        answers: list[str] = [""] * sum(len(qs) for qs in questions_per_image)
        for ks, states_img, qs in self._batches(image_states, questions_per_image, batch_size):
            states, mask = self.question_states(states_img, qs)
            start = torch.full((states.shape[0], 1), self.bos_id, dtype=torch.long, device=self.device)
            out = self.model.text_decoder.generate(
                input_ids=start, encoder_hidden_states=states, encoder_attention_mask=mask,
                eos_token_id=self.sep_id, pad_token_id=self.pad_id, do_sample=False, **GENERATE_KWARGS)
            for k, a in zip(ks, self.tokenizer.batch_decode(out, skip_special_tokens=True), strict=True):
                answers[k] = a.strip()
        return _split(answers, questions_per_image)

    # ----------------------------------------------------------------------------------- multiple choice
    @torch.no_grad()
    def choice_log_likelihoods(self, states: torch.Tensor, mask: torch.Tensor, choices: Sequence[str]) -> np.ndarray:
        """log p(choice | image, question) for one question's states [1, T, D]: the choice tokenised as
        [DEC] tokens [SEP] (BLIP's answer format), summed over its tokens and [SEP]; float64 [C]."""
        enc = self.tokenizer(list(choices), padding="longest", return_tensors="pt")
        ids, amask = enc["input_ids"].clone().to(self.device), enc["attention_mask"].to(self.device)
        ids[:, 0] = self.bos_id
        n = len(choices)
        logits = self.model.text_decoder(input_ids=ids, attention_mask=amask,
                                         encoder_hidden_states=states.expand(n, -1, -1),
                                         encoder_attention_mask=mask.expand(n, -1)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok = logp.gather(-1, ids[:, 1:, None])[..., 0] * amask[:, 1:].float()
        return tok.sum(-1).cpu().double().numpy()

    @torch.no_grad()
    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        """TIFA's sentence embedding: mean over real tokens of the last hidden state, L2-normalised."""
        tok, model = self.sbert
        enc = tok(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        hidden = model(**enc)[0].float()
        m = enc["attention_mask"][..., None].float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def nearest_choice(self, answer: str, choices: Sequence[str]) -> str:
        """TIFA's mc_sbert: the choice whose embedding has the largest dot product with the answer's."""
        sims = self._embed(list(choices)) @ self._embed([answer]).T
        return choices[int(torch.argmax(sims[:, 0]).item())]

    @property
    def choice_method(self) -> str:
        return "sbert" if self.sbert is not None else "likelihood"

    def choose(self, images: Sequence[np.ndarray], mc_per_image: Sequence[Sequence[tuple[str, Sequence[str]]]],
               batch_size: int = 16) -> list[list[tuple[str, str]]]:
        """Per image, per (question, choices): (chosen choice, method), method "sbert" or "likelihood"."""
        self._check(images, mc_per_image)
        method = self.choice_method
        if method == "sbert":
            free = self.answer(images, [[q for q, _ in mcs] for mcs in mc_per_image], batch_size)
            return [[(self.nearest_choice(a, list(ch)), method) for a, (_, ch) in zip(ans, mcs, strict=True)]
                    for ans, mcs in zip(free, mc_per_image, strict=True)]
        image_states = self.encode_images(images, batch_size)
        questions = [[q for q, _ in mcs] for mcs in mc_per_image]
        flat_choices = [list(ch) for mcs in mc_per_image for _, ch in mcs]
        picks: list[tuple[str, str]] = [("", method)] * len(flat_choices)
        for ks, states_img, qs in self._batches(image_states, questions, batch_size):
            states, mask = self.question_states(states_img, qs)
            for j, k in enumerate(ks):
                ll = self.choice_log_likelihoods(states[j:j + 1], mask[j:j + 1], flat_choices[k])
                picks[k] = (flat_choices[k][int(np.argmax(ll))], method)
        return _split(picks, questions)


def yes_ratio(p_yes: np.ndarray, p_no: np.ndarray) -> np.ndarray:
    """T2I-CompBench's per-question score p_yes / (p_yes + p_no)."""
    p_yes, p_no = np.asarray(p_yes, np.float64), np.asarray(p_no, np.float64)
    return p_yes / (p_yes + p_no)


def _split(flat, per_image: Sequence[Sequence]) -> list:
    out, k = [], 0
    for items in per_image:
        out.append(flat[k:k + len(items)])
        k += len(items)
    return out


# --------------------------------------------------------------------------------------- tiny checkpoint
_TINY_WORDS = (
    "yes no a an the is there are of and with on in to left right top front behind next near under above "
    "red blue green yellow black white brown pink purple orange gray wooden metal plastic glass leather fluffy "
    "round square oval rubber apple cup dog cat car bench table chair tree house bird horse girl boy man woman "
    "umbrella book bottle clock phone bowl sky road flower one two three four five color colour what how many "
    "does do it this that"
).split()
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]


def build_tiny_blip_tokenizer(out_dir: str | Path | None = None):
    """A BERT-style (uncased WordPiece) tokenizer with BLIP's conventions, trained offline in milliseconds:
    [CLS] text [SEP], bos [DEC] (the answer decoder's start), [ENC] as an additional special token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    corpus = [" ".join(_TINY_WORDS[i:i + 9]) for i in range(0, len(_TINY_WORDS), 9)]
    corpus += ["is there a red apple ?", "are there three dogs ?", "what color is the cup ?", "yes", "no"]
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=_SPECIAL, show_progress=False)
    tok.train_from_iterator(corpus * 5, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = BertTokenizer(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                         cls_token="[CLS]", mask_token="[MASK]", bos_token="[DEC]",
                         additional_special_tokens=["[ENC]"])
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_blip_vqa(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random BlipForQuestionAnswering checkpoint in the real layout (config, weights, processor)."""
    from transformers import (
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_blip_tokenizer()
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, initializer_range=0.2)
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                          bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, initializer_range=0.2)
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(config).eval()
    model.save_pretrained(str(out))
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(str(out))
    return out
