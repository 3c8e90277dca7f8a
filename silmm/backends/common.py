"""Helpers shared by the backends: an offline tokenizer, yes/no token ids, LoRA, per-sample randomness, and
the token-sequence pieces of the discrete (Janus, early-fusion) backends."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from silmm.backends.base import check_safetensors_weights
from silmm.backends.lora import Master, adapter_state_dict, merged_state_dict, own_values, stored_dtype
from silmm.config import LoraConfig, ModelConfig
from silmm.seeding import generator

# ------------------------------------------------------------------------------------ tiny tokenizer
# Words of compositional prompts, self-questions and chat turns, so that a tiny tokenizer encodes the
# text every stage writes with whole-word tokens (and "yes"/"no" in every casing as single tokens).
_WORDS = """
a an the one two three four five six seven eight nine ten some many several and or of with on in under
above below behind beside next to near left right top bottom front back inside outside between over
is are there this that it its image picture photo photograph scene shows show does do has have can
red orange yellow green blue purple pink brown black white gray grey golden silver colorful
round square rectangular triangular oval circular cubic spherical flat tall short big small large tiny
wooden metallic plastic glass leather fabric fluffy furry smooth rough shiny soft hard striped dotted
cat cats dog dogs bird birds horse horses cow cows sheep car cars bus buses bicycle bicycles truck
boat train airplane chair chairs table tables bed sofa lamp book books cup cups bottle bottles bowl
plate apple apples banana bananas orange oranges cake pizza flower flowers tree trees house houses
man woman men women person people child children girl boy ball balls box boxes bag bags clock
phone computer laptop television window door wall floor sky grass water river road street mountain
circle circles triangle triangles cube cubes sphere spheres shape shapes object objects
holding riding eating sitting standing playing looking carrying wearing reading watching chasing
question questions answer answers prompt prompts list write describe generate following each
attribute attributes noun nouns color colors texture textures number numbers relation relations
spatial layout count counting adjective adjectives category example examples new word words
yes no Yes No YES NO true false not
user assistant system you are helpful language vision assistant able to understand the visual
content that provides and assist with variety tasks using natural
"""
_YES_NO_LINES = [
    "Yes", "No", "yes", "no", "Yes.", "No.", "Answer: yes", "Answer: no", "Answer: Yes", "Answer: No",
    "Is there a red cube? Yes", "Is there a blue ball? No", "yes or no", "Yes or No",
]
_SENTENCES = [
    "A red cube and a blue sphere.", "Two cats on a wooden table.", "A dog to the left of a green car.",
    "Is there a cat in the image?", "Is the ball red?", "Are there two dogs?", "Is the cube above the sphere?",
    "Question: Is the apple on the plate? Answer: yes", "Write one yes/no question for each object.",
    "Prompt: a small yellow bird next to three apples.", "List colors, shapes, textures and objects.",
]


def _corpus() -> list[str]:
    words = _WORDS.split()
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    # capitalised variants so that sentence-initial words are whole tokens too
    lines += [" ".join(w.capitalize() for w in line.split()) for line in lines]
    return (lines + _SENTENCES + _YES_NO_LINES) * 3


def build_tiny_tokenizer(
    out_dir: str | Path | None = None,
    extra_special_tokens: Sequence[str] | Mapping[str, str] = (),
    vocab_size: int = 2048,
    chat_template: str | None = None,
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a built-in corpus in a few milliseconds.

    Byte-level so that any text encodes (no unknown tokens), like the real Llama/DeepSeek tokenizers.
    ``extra_special_tokens``: a list of added special tokens, or a mapping ``attribute -> token`` whose
    attributes become tokenizer properties (Janus' processor reads ``tokenizer.image_token`` etc.).
    ``add_bos``: prepend ``<s>`` when encoding, as Llama-family tokenizers do.
    Deterministic: the same arguments give the same vocabulary.
    """
    base_special = ["<unk>", "<s>", "</s>", "<pad>"]
    extra = list(extra_special_tokens.values()) if isinstance(extra_special_tokens, Mapping) else list(
        extra_special_tokens)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=base_special + extra,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    kwargs: dict = {}
    if isinstance(extra_special_tokens, Mapping):
        kwargs["extra_special_tokens"] = dict(extra_special_tokens)
    elif extra:
        kwargs["additional_special_tokens"] = extra
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", **kwargs,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


# ----------------------------------------------------------------------------------- yes/no tokens
_YES = ("yes", "Yes", "YES")
_NO = ("no", "No", "NO")
_SPACE_MARKS = ("", "Ġ", "▁", " ")  # byte-level BPE, sentencepiece, and literal space prefixes


def _single_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    unk = tokenizer.unk_token_id
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for word in words:
        for mark in _SPACE_MARKS:
            if mark.strip() and mark + word in vocab:  # a vocabulary entry, e.g. "Ġyes" / "▁yes"
                ids.append(vocab[mark + word])
            encoded = tokenizer.encode(mark + word, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] != unk:  # what the model sees when it writes the word
                ids.append(encoded[0])
    return sorted(set(ids))


def yes_no_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Ids of the single-token spellings of "yes" and "no" (case, leading-space variants), deduplicated.

    Raises ValueError when either list is empty (the tokenizer cannot answer yes/no in one token).
    """
    yes, no = _single_token_ids(tokenizer, _YES), _single_token_ids(tokenizer, _NO)
    if not yes or not no:
        raise ValueError(f"tokenizer has no single-token 'yes' ({yes}) or 'no' ({no})")
    if set(yes) & set(no):
        raise ValueError(f"'yes' and 'no' token ids overlap: {sorted(set(yes) & set(no))}")
    return yes, no


# --------------------------------------------------------------------------------------------- LoRA
def lora_target_modules(model: torch.nn.Module, target_regex: str) -> list[str]:
    """Names of the Linear modules that ``target_regex`` selects (peft fully matches the module name)."""
    pattern = re.compile(target_regex)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)]


def apply_lora(model: torch.nn.Module, lora: LoraConfig, modules_to_save: list[str] | None = None):
    """Wrap the modules matching ``lora.target_regex`` with a LoRA adapter; everything else is frozen.

    Returns the ``PeftModel``. Raises ValueError when the regex selects no Linear module, which would
    otherwise train nothing without complaint.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_target_modules(model, lora.target_regex)
    if not targets:
        raise ValueError(f"LoRA target_regex {lora.target_regex!r} matches no Linear module of "
                         f"{type(model).__name__}")
    config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_regex,
        modules_to_save=modules_to_save, bias="none",
    )
    return get_peft_model(model, config)


class InPlaceLora:
    """LoRA on ``self.model`` through peft for backends whose whole policy is one module (Janus, early
    fusion): peft injects the LoRA layers in place, so ``self.model`` keeps pointing at the adapted model,
    and ``self.peft`` is the PeftModel wrapper (None without an adapter). ``self.model_cfg`` (from
    LMMBackend) says where the checkpoint is, whose dtype the merged weights are written in."""

    model: torch.nn.Module
    model_cfg: ModelConfig
    peft = None

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Inside: the model as loaded (the adapter disabled, not removed)."""
        if self.peft is None:
            yield
            return
        with self.peft.disable_adapter():
            yield

    def add_lora(self, lora: LoraConfig) -> None:
        """LoRA on the modules ``lora.target_regex`` selects; everything else stays frozen."""
        if self.peft is not None:
            raise RuntimeError("a LoRA adapter is already attached; merge_and_save it first")
        self.peft = apply_lora(self.model, lora)

    def load_adapter(self, adapter_dir: str | Path, trainable: bool = True) -> None:
        """Attach an adapter written by :meth:`save_adapter` (to resume training)."""
        from peft import PeftModel

        if self.peft is not None:
            raise RuntimeError("a LoRA adapter is already attached")
        # peft takes adapter_model.safetensors when present and falls back to a pickled adapter_model.bin
        # (it has no use_safetensors switch): require the safetensors file that save_adapter writes
        check_safetensors_weights(Path(adapter_dir), ("adapter_model.safetensors",))
        self.peft = PeftModel.from_pretrained(self.model, str(adapter_dir), is_trainable=trainable)

    def weights_dir(self) -> Path:
        """The directory of the weights LoRA adapts (whose dtype the merged weights are written in)."""
        return Path(self.model_cfg.path)

    def lora_module_names(self) -> list[str]:
        return [name for name, module in self.model.named_modules() if hasattr(module, "lora_A")]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.peft is None:
            raise RuntimeError("no LoRA adapter: call add_lora first")
        return [p for p in self.peft.parameters() if p.requires_grad]

    def save_adapter(self, out_dir: str | Path, master: Master = own_values) -> None:
        """The adapter in float32, from ``master`` (the optimizer's float32 copy under bf16 training)."""
        if self.peft is None:
            raise RuntimeError("no LoRA adapter to save: call add_lora first")
        self.peft.save_pretrained(str(out_dir), state_dict=adapter_state_dict(self.peft, master),
                                  safe_serialization=True)

    def merge_adapter(self, master: Master = own_values) -> dict[str, torch.Tensor]:
        """Fold the adapter into the weights in float32 (silmm.backends.lora); returns the merged weights in
        the dtype of the checkpoint loaded (what merge_and_save writes). The backend keeps the merged
        model, without adapter, holding exactly what was written (cast to its compute dtype)."""
        state = merged_state_dict(self.model, stored_dtype(self.weights_dir()), master)
        if self.peft is not None:
            self.model = self.peft.unload()  # LoRA layers out, nothing merged: the values come from `state`
            self.peft = None
            self.model.load_state_dict(state)
        return state


def per_image(p_yes: torch.Tensor, p_no: torch.Tensor,
              questions: Sequence[Sequence[str]]) -> list[tuple]:
    """Flat per-question probabilities -> [(p_yes [Q_i], p_no [Q_i]) float32 numpy] per image."""
    out, k = [], 0
    for qs in questions:
        out.append((p_yes[k:k + len(qs)].numpy().astype("float32"), p_no[k:k + len(qs)].numpy().astype("float32")))
        k += len(qs)
    return out


# ------------------------------------------------------------------------- per-sample randomness
def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, so that a sample's draws depend only on its own seed."""
    return [generator(int(s), device) for s in seeds]


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, *shape] Gaussian noise, row b drawn from generators[b] (on the generator's device)."""
    rows = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


def multinomial_per_sample(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One draw per row of ``probs`` [B, V] -> [B] int64, row b drawn with generators[b]."""
    draws = [torch.multinomial(probs[b].float(), 1, generator=g) for b, g in enumerate(generators)]
    return torch.cat(draws).to(probs.device)


def next_text_token(logits: torch.Tensor, temperature: float, top_p: float,
                    generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One text token per row: greedy at temperature 0, else nucleus sampling from each row's generator."""
    if temperature == 0:
        return logits.argmax(-1)
    return multinomial_per_sample(warp_logits(logits, temperature, 0, top_p).softmax(-1), generators)


# ------------------------------------------------------------------------------ discrete token sequences
@dataclass
class ImageSamples:
    """What the sampling loop drew, with the log-probability of every sequence under three views.

    ``logp_sampling``: under the distribution actually sampled (CFG mix, then temperature/top-k/top-p).
    ``logp_cfg``: the CFG-mixed logits before temperature/top-k/top-p (``logprob_mode="cfg"``).
    ``logp_conditional``: the text-conditioned branch alone (``logprob_mode="conditional"``).
    """

    tokens: torch.Tensor  # [B, T] int64, CPU
    logp_sampling: torch.Tensor  # [B] float32, CPU
    logp_cfg: torch.Tensor
    logp_conditional: torch.Tensor


# ------------------------------------------------------------------------------------ logits warping
def warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering, in transformers' order; removed -> -inf."""
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # mass strictly before each token: a token is kept while that mass is below top_p (the first always)
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens] without materialising the full log-softmax: gather - logsumexp."""
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def write_tokens(forward: Callable[..., Any], logits_of: Callable[[torch.Tensor], torch.Tensor],
                 rows: Sequence[Sequence[int]], seeds: Sequence[int], max_new_tokens: int, temperature: float,
                 top_p: float, pad_id: int, eos_id: int, device: torch.device) -> torch.Tensor:
    """Seeded text continuation of token ``rows`` (left-padded, KV-cached): the ids written [B, T] on the CPU,
    ``pad_id`` after a row's EOS; row b draws only from seeds[b] (temperature 0: greedy).
    ``forward(ids, mask, pos, cache=None)`` returns ``.last_hidden_state`` and ``.cache``; ``logits_of(hidden
    [B, D])`` the float32 next-token logits (the backend's head, any bias on words)."""
    if len(rows) != len(seeds):
        raise ValueError(f"{len(rows)} prompts but {len(seeds)} seeds")
    if not rows or max_new_tokens <= 0:
        return torch.zeros(len(rows), 0, dtype=torch.long)
    ids, mask = left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    gens = make_generators(seeds, device)
    pos = positions(mask)
    out = forward(ids, mask, pos)
    pos = pos[:, -1:]
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    written: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        nxt = next_text_token(logits_of(out.last_hidden_state[:, -1]), temperature, top_p, gens)
        nxt = nxt.masked_fill(done, pad_id)
        written.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        out = forward(nxt[:, None], mask, pos, out.cache)
    return torch.stack(written, 1).cpu()


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, L] and attention mask [B, L] (1 = real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def positions(mask: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Position ids that skip left padding: cumsum(mask) - 1 (pads get the first real position)."""
    return (mask.cumsum(-1) - 1).clamp(min=0) + offset


def image_code_logprobs(hidden: torch.Tensor | tuple[torch.Tensor, ...], logits_fn: Callable[..., torch.Tensor],
                        tokens: torch.Tensor, chunk: int = 64,
                        entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """sum_t log pi(z_t | .) over image positions, chunk by chunk: [B] float32 (differentiable).

    ``hidden``: the hidden states [B, T, D] at the T positions that predict ``tokens`` [B, T], or a tuple of
    such tensors (e.g. conditional and unconditional for a classifier-free-guidance mix). ``logits_fn``
    maps one chunk of them (``logits_fn(*[h[:, a:b] for h in hidden])``) to logits over the image codes
    only, [B, b - a, V], in the model's dtype (or float32, e.g. a CFG mix done in float32 as when
    sampling). Each chunk is upcast to float32 for gather - logsumexp, so no [B, T, V] float32 tensor ever
    exists: with autograd on, every chunk runs under non-reentrant activation checkpointing (its logits
    are recomputed in the backward instead of being kept), so the logits of ONE chunk are alive at a time,
    forward and backward -- ``chunk / T`` of the memory of full logits -- for the cost of recomputing the
    head once. The result equals ``log_softmax(logits_fn(*hidden).float()).gather(tokens).sum(-1)`` up to
    float rounding, for any ``chunk`` (it need not divide T; ``chunk >= T`` is one chunk).

    ``entropy=True`` returns ``(logps [B], entropy [B])``: the entropy (nats) of the distribution
    ``logits_fn`` defines, averaged over the T positions, computed without gradient (a diagnostic).
    """
    from torch.utils.checkpoint import checkpoint

    hiddens = hidden if isinstance(hidden, tuple) else (hidden,)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, t = tokens.shape
    for h in hiddens:
        if tuple(h.shape[:2]) != (b, t):
            raise ValueError(f"hidden states {tuple(h.shape)} do not match tokens {tuple(tokens.shape)}")
    tokens = tokens.to(hiddens[0].device, torch.long)
    logps = torch.zeros(b, dtype=torch.float32, device=hiddens[0].device)
    entropies = torch.zeros(b, dtype=torch.float32, device=hiddens[0].device)
    for start in range(0, t, chunk):
        parts = tuple(h[:, start:start + chunk] for h in hiddens)
        args = (logits_fn, tokens[:, start:start + chunk], entropy, *parts)
        if torch.is_grad_enabled():
            picked, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            picked, ent = _chunk_logprobs(*args)
        logps = logps + picked.sum(-1)
        if entropy:
            entropies += ent.sum(-1)
    return (logps, entropies / max(t, 1)) if entropy else logps


def _chunk_logprobs(logits_fn: Callable[..., torch.Tensor], tokens: torch.Tensor, entropy: bool,
                    *hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: log-probs of ``tokens`` [B, c] float32, and the per-position entropy [B, c] (no grad)."""
    logits = logits_fn(*hidden).float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    ent = None
    if entropy:  # last, so that the backward's recomputation stops before it (nothing of it is saved)
        with torch.no_grad():
            probs = torch.exp(logits - lse.unsqueeze(-1))
            ent = lse - torch.where(probs > 0, probs * logits, 0.0).sum(-1)
    return picked, ent


# ------------------------------------------------------------------------------ gradient checkpointing
def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation (gradient) checkpointing on every decoder layer of the HF model ``model``.

    Non-reentrant (``use_reentrant=False``): under LoRA the layers' inputs are frozen (no requires_grad),
    and the reentrant implementation then returns outputs without a graph, so the LoRA weights inside a
    checkpointed layer would silently get no gradient; non-reentrant checkpointing differentiates with
    respect to the parameters used inside whatever the inputs are. transformers checkpoints a layer only
    while the module is in training mode with autograd on (no-grad reference forwards and sampling are
    unaffected) and it turns ``use_cache`` off there.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
