"""Pretraining pieces for the toy early-fusion LMM: its vocabulary, model, training examples, checkpoints.

Three kinds of example teach the three skills SILMM needs from one model, each in the exact sequence
format :class:`~silmm.backends.fusion.FusionBackend` uses at run time:
- text -> image:  ``<s> prompt <boi> codes <eoi>``; a share ``caption_noise`` of images miss the prompt,
  so the generator is imperfect by design (loss on the codes and <eoi>);
- yes/no answers: ``<s> <boi> codes <eoi> question Answer: yes|no`` with exact labels from the oracle, on
  images that fit the prompt, near misses and random scenes (loss on the answer);
- questions:      the questions stage's own request -> the prompt's decomposition (loss on the answer).
The questions written and answered are those of ``toy.question_style`` (world.self_checks): under
``exhaustive`` the model also learns to ask for, and count, the total number of objects.
Held-out prompt combinations never appear. Batch ``step`` of a kind depends only on (seed, step), so a
resumed pretraining sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from transformers import LlamaForCausalLM

from silmm.backends.fusion import FusionSpec, build_word_tokenizer, text_words, tiny_llama_config
from silmm.config import ToyConfig
from silmm.questions import question_request
from silmm.seeding import derive_seed
from silmm.toy import world

KINDS = ("generate", "answer", "questions")
CONTINUOUS_VERSION = 2  # bump when the continuous toy LMM's architecture or pretraining changes
WORLD_VERSION = 1  # bump when the world's rendering or grammar changes: invalidates cached models


def cache_key(toy: ToyConfig, examples: Sequence[tuple[str, Sequence[str]]], continuous: bool = False) -> dict:
    """What a cached pretrained model depends on; stored in its pretrain.json and compared on reuse.
    ``continuous``: the dream-form toy LMM (silmm/toy/continuous.py), whose own settings join the key."""
    text = json.dumps([[prompt, *qs] for prompt, qs in examples])
    settings = {k: v for k, v in asdict(toy.pretrain).items() if k != "threads"}  # threads: speed only
    key = {"world_version": WORLD_VERSION, "held_out_fraction": toy.held_out_fraction, "pretrain": settings,
           "question_examples_sha256": hashlib.sha256(text.encode()).hexdigest()}
    if style(toy) != "named":  # absent for the default, so models cached before the key existed stay valid
        key["question_style"] = style(toy)
    if continuous:
        key["continuous"] = {"version": CONTINUOUS_VERSION, **asdict(toy.continuous)}
    return key


def style(toy: ToyConfig) -> str:
    """toy.question_style as world.STYLES names it."""
    return getattr(toy.question_style, "value", toy.question_style)


def build_tokenizer(examples: Sequence[tuple[str, Sequence[str]]], question_style: str = "named"):
    request = question_request("a red circle", examples)
    numbers = " ".join(str(i) for i in range(1, 21))
    words = text_words([request, *world.VOCAB_TEXT, world.STYLE_WORDS[question_style], numbers, "yes no empty",
                        FusionSpec().answer_suffix])
    return build_word_tokenizer(words, len(world.codebook()))


def build_model(tokenizer, toy: ToyConfig, seed: int) -> LlamaForCausalLM:
    p = toy.pretrain
    config = tiny_llama_config(tokenizer, hidden=p.hidden, layers=p.layers, heads=p.heads,
                               intermediate=3 * p.hidden, max_positions=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # A new image token starts as the sum of the embeddings of the words that describe its cell ("red" +
    # "circle"; the empty cell: "empty"), the usual way to initialise added tokens from their descriptions:
    # questions and prompts then meet the image codes in the same directions from the first step.
    spec = FusionSpec()
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for code, words in enumerate([["empty"]] + [[c, s] for c in world.COLOURS for s in world.SHAPES]):
            ids = tokenizer.convert_tokens_to_ids(words)
            emb[tokenizer.convert_tokens_to_ids(spec.image_token.format(code))] = emb[ids].sum(0)
    return model


class Corpus:
    """Endless, seeded toy-world examples as (token ids, index of the first supervised token)."""

    def __init__(self, tokenizer, toy: ToyConfig, examples: Sequence[tuple[str, Sequence[str]]]):
        self.tok, self.toy, self.examples = tokenizer, toy, examples
        self.style = style(toy)
        spec = FusionSpec()
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.boi, self.eoi = tokenizer.convert_tokens_to_ids([spec.boi_token, spec.eoi_token])
        self.image_ids = tokenizer.convert_tokens_to_ids([spec.image_token.format(i) for i in range(len(world.codebook()))])
        self.codec = world.codec()
        self.answer_suffix = spec.answer_suffix
        self._words: dict[str, list[int]] = {}

    def words(self, text: str) -> list[int]:
        if text not in self._words:
            self._words[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._words[text]

    def codes(self, scene: list[world.Obj]) -> list[int]:
        return [self.image_ids[c] for c in self.codec.encode(world.render(scene)[None])[0].tolist()]

    def _prompt(self, rng: random.Random) -> world.Spec:
        text = world.compose(rng.choice(world.CATEGORIES), rng, self.toy.held_out_fraction)
        return world.parse_prompt(text)

    def generate(self, rng: random.Random) -> tuple[list[int], list[bool]]:
        spec = self._prompt(rng)
        p = self.toy.pretrain
        if rng.random() < p.caption_noise:
            scene = world.near_miss(spec, rng)
        else:
            scene = world.scene_for(spec, rng, distractors=int(rng.random() < p.distractor_p))
        head = [self.bos, *self.words(spec.text()), self.boi]
        body = self.codes(scene) + [self.eoi]
        return head + body, [False] * len(head) + [True] * len(body)

    def answer(self, rng: random.Random) -> tuple[list[int], list[bool]]:
        """One image, then several questions each followed by its answer: many labels per sequence. The
        first question sits where the scores stage puts its only one."""
        spec = self._prompt(rng)
        u = rng.random()
        scene = (world.scene_for(spec, rng, distractors=int(rng.random() < 0.3)) if u < 0.35 else
                 world.near_miss(spec, rng) if u < 0.85 else world.random_scene(rng))
        objects = world.parse(world.render(scene))
        asked = world.self_checks(spec, self.style) + world.self_checks(self._prompt(rng), self.style)
        rng.shuffle(asked)
        ids = [self.bos, self.boi, *self.codes(scene), self.eoi]
        sup = [False] * len(ids)
        for check in asked[:4]:
            question = self.words(f"{check.question()} {self.answer_suffix}")
            ids += question + self.words("yes" if check.holds(objects) else "no")
            sup += [False] * len(question) + [True]
        return ids, sup

    def questions(self, rng: random.Random) -> tuple[list[int], list[bool]]:
        prompt = self._prompt(rng).text()
        qs = world.questions(prompt, self.style)
        head = [self.bos, *self.words(question_request(prompt, self.examples))]
        # the request ends with "1."; the answer goes on from there, one numbered question per line
        body = self.words(qs[0] + "".join(f"\n{i}. {q}" for i, q in enumerate(qs[1:], 2))) + [self.eos]
        return head + body, [False] * len(head) + [True] * len(body)

    def batch(self, kind: str, size: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids, attention_mask, labels) with -100 outside the supervised tokens."""
        rng = random.Random(derive_seed(seed, 0, step, KINDS.index(kind), "pretrain"))
        rows = [getattr(self, kind)(rng) for _ in range(size)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((size, width), self.pad)
        mask = torch.zeros((size, width), dtype=torch.long)
        labels = torch.full((size, width), -100)
        for i, (row, sup) in enumerate(rows):
            row_t = torch.tensor(row)
            ids[i, :len(row)] = row_t
            mask[i, :len(row)] = 1
            labels[i, :len(row)] = row_t.masked_fill(~torch.tensor(sup), -100)
        return ids, mask, labels


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ------------------------------------------------------------------------------------- checkpoints
def save_progress(partial: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Weights (safetensors), optimizer state and step in a fresh directory swapped in atomically."""
    tmp = partial.with_name(partial.name + ".new")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied embeddings
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    old = partial.with_name(partial.name + ".old")
    if partial.exists():
        partial.rename(old)
    tmp.rename(partial)
    if old.exists():
        import shutil

        shutil.rmtree(old)


def publish(out: Path, partial: Path, write: Callable[[Path], None], record: dict) -> None:
    """``write`` the finished model into a temporary sibling of ``out``, add ``record`` as pretrain.json, and
    swap it in whole (a path that exists is a complete cache); the progress directory is then removed."""
    import os
    import shutil

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, out)
    shutil.rmtree(partial, ignore_errors=True)


def load_progress(partial: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The step to continue from (0 when there is no progress)."""
    if not (partial / "state.json").is_file():
        return 0
    load_model(model, str(partial / "model.safetensors"))
    optimizer.load_state_dict(torch.load(partial / "optimizer.pt", weights_only=True))
    return int(json.loads((partial / "state.json").read_text())["step"])


# --------------------------------------------------------------------------------------- quality
@torch.no_grad()
def answer_accuracy(model, corpus: Corpus, prompts: Sequence[str], seed: int, batch: int = 128,
                    kinds: Sequence[str] | None = None) -> float:
    """Accuracy of one-question yes/no answers (the scores stage's format) about fresh images of the
    prompts: scenes that fit them or nearly do; the corpus's question style, only checks of `kinds` if given."""
    from silmm.backends.common import left_pad, positions

    rng = random.Random(seed)
    yes, no = corpus.words("yes")[0], corpus.words("no")[0]
    rows, truth = [], []
    for prompt in prompts:
        spec = world.parse_prompt(prompt)
        scene = world.scene_for(spec, rng) if rng.random() < 0.5 else world.near_miss(spec, rng)
        objects = world.parse(world.render(scene))
        for c in world.self_checks(spec, corpus.style):
            if kinds is not None and c.kind not in kinds:
                continue
            rows.append([corpus.bos, corpus.boi, *corpus.codes(scene), corpus.eoi,
                         *corpus.words(f"{c.question()} {corpus.answer_suffix}")])
            truth.append(c.holds(objects))
    said_yes = []
    for start in range(0, len(rows), batch):
        ids, mask = left_pad(rows[start:start + batch], corpus.pad)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]
        said_yes += (logits[:, yes] > logits[:, no]).tolist()
    return float(np.mean(np.array(said_yes) == np.array(truth))) if rows else math.nan
