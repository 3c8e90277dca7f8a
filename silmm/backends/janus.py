"""The discrete backend: Janus / Janus-Pro (``JanusForConditionalGeneration``) through transformers.

One model writes text, samples image tokens, decodes them with its VQ model and answers yes/no questions.
The same code loads a real Janus-Pro-1B/7B directory and the tiny random checkpoint of
:func:`build_tiny_janus`.

Image sampling uses our own loop instead of ``generate(generation_mode="image")`` because the library
draws every row from the global RNG; here each sample has its own ``torch.Generator``, and the loop also
returns the log-probabilities of what it drew. The loop reproduces the library's classifier-free
guidance exactly: the unconditional branch is the prompt with every token except BOS and
begin-of-image replaced by the pad token, and the mixed logits are ``uncond + scale * (cond - uncond)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
)
from transformers.cache_utils import DynamicCache
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

from silmm.backends.base import CheckpointError, LMMBackend, check_transformers_checkpoint
from silmm.backends.common import (
    ImageSamples,
    InPlaceLora,
    build_tiny_tokenizer,
    enable_gradient_checkpointing,
    image_code_logprobs,
    left_pad,
    make_generators,
    multinomial_per_sample,
    next_text_token,
    per_image,
    positions,
    token_logprobs,
    warp_logits,
    yes_no_token_ids,
)
from silmm.backends.lora import Master, own_values
from silmm.config import LogprobMode, ModelConfig, SamplingConfig

# The chat template of the official Janus-Pro conversion (transformers' convert_janus_weights_to_hf.py):
# "<|User|>: <image_placeholder>\n{text}\n\n<|Assistant|>:". Used when a checkpoint carries none.
JANUS_CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}"
    "{%for message in messages%}"
    "{%if message['role']|lower=='user'%}<|User|>: "
    "{%elif message['role']|lower=='assistant'%}<|Assistant|>:"
    "{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}{{message['role'].capitalize()}}: {%endif%}"
    "{%for content in message['content']%}"
    "{%if content['type']=='image'%}"
    "{%if not loop.first%}{{'\n'}}{%endif%}<image_placeholder>{%if not loop.last%}{{'\n'}}{%endif%}"
    "{%elif content['type']=='text'%}"
    "{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}{{' '+text}}"
    "{%else%}{{text}}{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}{{seps[0]}}{%else%}{{seps[1]}}{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)

JANUS_SPECIAL_TOKENS = {
    "image_token": "<image_placeholder>",
    "boi_token": "<begin_of_image>",
    "eoi_token": "<end_of_image>",
}


# ------------------------------------------------------------------------------------ tiny checkpoint
def build_tiny_janus(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Janus checkpoint (config, safetensors weights, tokenizer, processor,
    generation config) to ``out_dir`` in the layout of a real converted Janus-Pro directory.

    Deterministic: the same seed writes byte-identical weights. 16 image tokens (a 4x4 grid), 32x32
    pixels in and out, a 2-layer language model of width 32.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(None, JANUS_SPECIAL_TOKENS, chat_template=None)
    hidden, image_size, patch = 32, 32, 8
    n_image_tokens = (image_size // patch) ** 2
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        # far above the usual 0.02: peaked attention and logits, so that a wrong position id or mask
        # changes the outputs measurably (at 0.02 a random model is almost position-blind)
        initializer_range=0.3,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = JanusVisionConfig(
        hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
        patch_size=patch, projection_dim=hidden, num_image_tokens=n_image_tokens, mlp_ratio=2.0,
    )
    # 4 resolutions = 3 upsamplings: the 4x4 token grid decodes to 32x32 pixels
    vq = JanusVQVAEConfig(
        embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 1, 1],
        num_res_blocks=1, projection_dim=hidden, image_token_embed_dim=hidden,
    )
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tok.convert_tokens_to_ids(JANUS_SPECIAL_TOKENS["image_token"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    # a fresh GenerationConfig: the default one loses generation_kwargs (the begin-of-image id) on reload
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        guidance_scale=5.0, temperature=1.0,
        generation_kwargs={"boi_token_id": tok.convert_tokens_to_ids(JANUS_SPECIAL_TOKENS["boi_token"])},
    )
    model.save_pretrained(out)
    image_processor = JanusImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tok, chat_template=JANUS_CHAT_TEMPLATE,
                               use_default_system_prompt=True, num_image_tokens=n_image_tokens)
    processor.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------ loading checks
def check_checkpoint(path: Path) -> None:
    check_transformers_checkpoint(path, "janus", "janus")


# ------------------------------------------------------------------------------------------ backend
class JanusBackend(InPlaceLora, LMMBackend):
    """Janus / Janus-Pro as a SILMM policy.

    ``logprob_mode`` chooses what :meth:`sequence_logprobs` (the DPO log-likelihood) measures:
    ``"conditional"`` (default) -- log pi(z | x) of the text-conditioned branch alone: the model's own
    likelihood, what DPO's derivation assumes, and half the compute; ``"cfg"`` -- the log-softmax of the
    classifier-free-guidance mix ``uncond + scale * (cond - uncond)`` exactly as used when sampling (before
    temperature/top-k/top-p), so DPO optimises the distribution that actually produces the images.
    """

    family = "discrete"
    logprob_chunk = 64  # image positions per generation-head chunk in sequence_logprobs

    def __init__(self, model_cfg: ModelConfig, sampling: SamplingConfig,
                 logprob_mode: LogprobMode | str = LogprobMode.conditional, score_batch_size: int = 16):
        super().__init__(model_cfg, sampling)
        self.logprob_mode = LogprobMode(logprob_mode)
        self.score_batch_size = score_batch_size
        path = Path(model_cfg.path)
        check_checkpoint(path)
        trust = model_cfg.trust_remote_code
        try:
            self.processor = JanusProcessor.from_pretrained(str(path), trust_remote_code=trust)
            model = JanusForConditionalGeneration.from_pretrained(
                str(path), dtype=self.dtype, use_safetensors=True, trust_remote_code=trust)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise CheckpointError(f"{path}: cannot load the Janus checkpoint: {exc}") from exc
        self.model: JanusForConditionalGeneration = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.generation_config = self._generation_config(path)
        self._init_tokens()

    @classmethod
    def load(cls, model_cfg: ModelConfig, sampling: SamplingConfig, **kwargs) -> JanusBackend:
        return cls(model_cfg, sampling, **kwargs)

    def _generation_config(self, path: Path) -> GenerationConfig:
        # read from disk: the model's default copy may have dropped generation_kwargs
        if (path / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(str(path))
        return self.model.generation_config

    def _init_tokens(self) -> None:
        tok = self.tokenizer
        if self.processor.chat_template is None:
            self.processor.chat_template = JANUS_CHAT_TEMPLATE
        self.image_token_id = tok.convert_tokens_to_ids(self.processor.image_token)
        self.boi_id = tok.convert_tokens_to_ids(self.processor.image_start_token)
        self.eoi_id = tok.convert_tokens_to_ids(self.processor.image_end_token)
        pad = self.generation_config.pad_token_id
        self.pad_id = int(pad if pad is not None else tok.pad_token_id)
        self.bos_id = tok.bos_token_id
        eos = self.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted({*eos, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
        yes, no = yes_no_token_ids(tok)
        self.yes_ids = torch.tensor(yes, device=self.device)
        self.no_ids = torch.tensor(no, device=self.device)

    # ------------------------------------------------------------------------------- properties
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def num_image_tokens(self) -> int:
        return self.model.config.vision_config.num_image_tokens

    @property
    def _lm(self):
        return self.model.model.language_model

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    # ------------------------------------------------------------------------------- prompts
    def _chat(self, text: str, image: bool = False, system: bool = True) -> str:
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        chat = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        if system and self.processor.use_default_system_prompt:
            chat = DEFAULT_SYSTEM_PROMPT + chat
        if image:
            block = (self.processor.image_start_token + self.processor.image_token * self.num_image_tokens
                     + self.processor.image_end_token)
            chat = chat.replace(self.processor.image_token, block, 1)
        return chat

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(t)["input_ids"] for t in texts]

    def _generation_row(self, prompt: str) -> list[int]:
        # rendering the chat template costs more than a tiny model's forward, and training asks for the
        # same prompts again and again (chosen and rejected share one): keep the token ids per prompt
        cache = self.__dict__.setdefault("_generation_rows", {})
        if prompt not in cache:
            if len(cache) > 100_000:
                cache.clear()
            cache[prompt] = self._encode([self._chat(prompt, system=False)])[0] + [self.boi_id]
        return cache[prompt]

    def _generation_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-generation inputs as Janus builds them: chat turn, no system prompt, then <begin_of_image>."""
        rows = [self._generation_row(p) for p in prompts]
        ids, mask = left_pad(rows, self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    def _unconditional(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids == self.boi_id
        if self.bos_id is not None:
            keep |= ids == self.bos_id
        return ids.masked_fill(~keep, self.pad_id)

    # ------------------------------------------------------------------------------- text
    @torch.no_grad()
    def write_text(self, prompts: list[str], seeds: list[int], max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Chat-formatted continuation; temperature 0 is greedy. Row b draws only from seeds[b]."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        ids, mask = left_pad(self._encode([self._chat(p) for p in prompts]), self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        gens = make_generators(seeds, self.device)
        out = self._lm(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        pos = positions(mask)[:, -1:]
        eos = torch.tensor(self.eos_ids, device=self.device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        written: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()
            nxt = next_text_token(logits, temperature, top_p, gens).masked_fill(done, self.pad_id)
            written.append(nxt)
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = self._lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=out.cache,
                           use_cache=True)
        rows = torch.stack(written, 1).cpu() if written else torch.zeros((len(prompts), 0), dtype=torch.long)
        return [s.strip() for s in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    # ------------------------------------------------------------------------------- image tokens
    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Image tokens [B, T] int64 (CPU). A row depends only on its prompt, seed and the model
        (for a fixed batch size and device: batched kernels may round differently at other sizes)."""
        return self.sample_with_logprobs(prompts, seeds).tokens

    @torch.no_grad()
    def sample_with_logprobs(self, prompts: list[str], seeds: list[int]) -> ImageSamples:
        """Classifier-free-guided sampling with a KV cache and one generator per sample."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        s = self.sampling
        ids, mask = self._generation_prompts(prompts)
        n = ids.shape[0]
        both = torch.cat([ids, self._unconditional(ids)])
        mask2 = torch.cat([mask, mask])
        pos = positions(mask2)
        out = self._lm(inputs_embeds=self._embed(both), attention_mask=mask2, position_ids=pos, use_cache=True)
        pos = pos[:, -1:]
        gens = make_generators(seeds, self.device)
        tokens = torch.zeros((n, self.num_image_tokens), dtype=torch.long, device=self.device)
        logp = {k: torch.zeros(n, device=self.device) for k in ("sampling", "cfg", "conditional")}
        for t in range(self.num_image_tokens):
            cond, uncond = self.model.model.generation_head(out.last_hidden_state[:, -1]).float().chunk(2)
            mixed = uncond + s.guidance_scale * (cond - uncond)
            warped = warp_logits(mixed, s.temperature, s.top_k, s.top_p)
            nxt = multinomial_per_sample(warped.softmax(-1), gens)
            tokens[:, t] = nxt
            logp["sampling"] += token_logprobs(warped, nxt)
            logp["cfg"] += token_logprobs(mixed, nxt)
            logp["conditional"] += token_logprobs(cond, nxt)
            if t + 1 == self.num_image_tokens:
                break
            embeds = self.model.prepare_embeddings_for_image_generation(torch.cat([nxt, nxt])[:, None])
            mask2 = torch.cat([mask2, torch.ones_like(mask2[:, :1])], dim=1)
            pos = pos + 1
            out = self._lm(inputs_embeds=embeds, attention_mask=mask2, position_ids=pos, cache=out.cache,
                           use_cache=True)
        return ImageSamples(tokens.cpu(), logp["sampling"].cpu(), logp["cfg"].cpu(), logp["conditional"].cpu())

    @torch.no_grad()
    def decode(self, samples: torch.Tensor, seeds: list[int] | None = None) -> np.ndarray:
        """Token ids [B, T] -> uint8 images [B, H, W, 3]. The VQ decoder is deterministic: seeds unused."""
        pixels = self.model.decode_image_tokens(samples.to(self.device, torch.long))  # [B, H, W, 3] in [-1, 1]
        chw = list(pixels.permute(0, 3, 1, 2).float().cpu().numpy())  # the Pil postprocess wants channels first
        images = self.processor.image_processor.postprocess(chw, input_data_format="channels_first")
        return np.stack([np.asarray(im).transpose(1, 2, 0) for im in images["pixel_values"]]).astype(np.uint8)

    # ------------------------------------------------------------------------------- yes / no
    def _pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        pv = self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return pv.to(self.device, self.dtype)

    def _question_rows(self, questions: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Split each full prompt after its image block: (shared prefix ids, per-question suffix ids).

        The full prompt is tokenized whole so that each row is exactly what a one-question-at-a-time
        forward sees; the image block ends with a special token, where tokenization restarts anyway.
        """
        rows = self._encode([self._chat(q, image=True) for q in questions])
        prefix: list[int] | None = None
        suffixes = []
        for row in rows:
            cut = len(row) - row[::-1].index(self.eoi_id)
            if prefix is None:
                prefix = row[:cut]
            elif row[:cut] != prefix:
                raise ValueError("the chat template puts question text before the image: no shared prefix")
            suffixes.append(row[cut:])
        return prefix or [], suffixes

    def _prefill_images(self, prefix: list[int], images: Sequence[np.ndarray]) -> DynamicCache:
        """Run the shared prefix (system prompt + image block) once per image; return its KV cache."""
        ids = torch.tensor([prefix] * len(images), device=self.device)
        embeds = self._embed(ids)
        features = self.model.model.get_image_features(self._pixel_values(images)).pooler_output
        slot = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slot, features.to(embeds.dtype))
        mask = torch.ones_like(ids)
        out = self._lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        return out.cache

    def _answer(self, cache: DynamicCache, prefix_len: int, rows: torch.Tensor,
                suffixes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of question suffixes on copies of their images' prefix caches -> p_yes, p_no."""
        picked = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v, *_ in cache],
                              config=self.model.config.text_config)
        ids, smask = left_pad(suffixes, self.pad_id)
        ids, smask = ids.to(self.device), smask.to(self.device)
        mask = torch.cat([torch.ones((len(suffixes), prefix_len), dtype=smask.dtype, device=self.device), smask], 1)
        out = self._lm(input_ids=ids, attention_mask=mask, position_ids=positions(smask, prefix_len),
                       cache=picked, use_cache=True)
        probs = self.model.lm_head(out.last_hidden_state[:, -1]).float().softmax(-1)  # last position only
        return probs[:, self.yes_ids].sum(-1), probs[:, self.no_ids].sum(-1)

    @staticmethod
    def _plan(questions: Sequence[Sequence[str]], batch: int) -> Iterator[tuple[list[int], list[int]]]:
        """Groups of whole images with at most ``batch`` questions in all (an image with more questions
        forms its own group): (image indices, flat question indices). Each image is prefilled once."""
        owners: list[int] = []
        chunk: list[int] = []
        k = 0
        for i, qs in enumerate(questions):
            if chunk and len(chunk) + len(qs) > batch:
                yield owners, chunk
                owners, chunk = [], []
            if qs:
                owners.append(i)
                chunk.extend(range(k, k + len(qs)))
            k += len(qs)
        if chunk:
            yield owners, chunk

    @torch.no_grad()
    def yes_no(self, images: np.ndarray, questions: list[list[str]],
               batch_size: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """p("yes"), p("no") for each image's questions: softmax over the whole vocabulary at the last
        position, summed over the spelling variants. Each image is encoded once; its prefix KV cache is
        copied to its questions, and at most ``batch_size`` (image, question) rows go through one forward.
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        batch = batch_size or self.score_batch_size
        flat = [(i, q) for i, qs in enumerate(questions) for q in qs]
        p_yes = torch.zeros(len(flat))
        p_no = torch.zeros(len(flat))
        if flat:
            prefix, suffixes = self._question_rows([q for _, q in flat])
            for owners, chunk in self._plan(questions, batch):
                cache = self._prefill_images(prefix, [images[i] for i in owners])
                for sub in (chunk[k:k + batch] for k in range(0, len(chunk), batch)):
                    rows = torch.tensor([owners.index(flat[j][0]) for j in sub], device=self.device)
                    y, n = self._answer(cache, len(prefix), rows, [suffixes[j] for j in sub])
                    p_yes[sub], p_no[sub] = y.cpu(), n.cpu()
        return per_image(p_yes, p_no, questions)

    # ------------------------------------------------------------------------------- training
    def sequence_logprobs(self, prompts: list[str], tokens: torch.Tensor,
                          entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """sum_t log pi(z_t | x, z_<t) over the image tokens [B, T] -> [B] (float32, differentiable).

        Teacher forcing: prompt embeddings, then the generation embeddings of z_<T, through the language
        model (no KV cache) and the generation head; left padding is masked with explicit position ids.
        ``logprob_mode`` (see the class docstring) selects the conditional branch or the CFG mix used when
        sampling. The head runs in the model's dtype on ``logprob_chunk`` positions at a time, with a
        float32 log-sum-exp (:func:`~silmm.backends.common.image_code_logprobs`): no [B, T, 16384] float32
        logits. ``entropy=True`` returns ``(logps, mean per-token entropy [B], no grad)`` of that same
        distribution (conditional or CFG mix).
        """
        ids, mask = self._generation_prompts(prompts)
        tokens = tokens.to(self.device, torch.long)
        head = self.model.model.generation_head
        cond = self._image_hidden(ids, mask, tokens)
        if self.logprob_mode is LogprobMode.conditional:
            return image_code_logprobs(cond, head, tokens, self.logprob_chunk, entropy)
        uncond = self._image_hidden(self._unconditional(ids), mask, tokens)
        scale = self.sampling.guidance_scale

        def mixed(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # mixed in float32, as when sampling
            c, u = head(c).float(), head(u).float()
            return u + scale * (c - u)

        return image_code_logprobs((cond, uncond), mixed, tokens, self.logprob_chunk, entropy)

    def _image_hidden(self, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, T, D] (model dtype) at the positions that predict each image token."""
        image_embeds = self.model.prepare_embeddings_for_image_generation(tokens[:, :-1])
        embeds = torch.cat([self._embed(ids), image_embeds.to(self.dtype)], dim=1)
        full = torch.cat([mask, torch.ones_like(tokens[:, :-1])], dim=1)
        hidden = self._lm(inputs_embeds=embeds, attention_mask=full, position_ids=positions(full),
                          use_cache=False).last_hidden_state
        # position L-1 is <begin_of_image>, which predicts the first image token
        return hidden[:, ids.shape[1] - 1:]

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of the language model's decoder layers (non-reentrant: the inputs are
        frozen under LoRA; see :func:`~silmm.backends.common.enable_gradient_checkpointing`). Active only
        in training mode (:meth:`train`)."""
        enable_gradient_checkpointing(self.model)

    def train(self, mode: bool = True) -> None:
        """Training mode switches LoRA dropout on; the VQ model stays in eval mode (it is frozen)."""
        self.model.train(mode)
        self.model.model.vqmodel.eval()

    def merge_and_save(self, out_dir: str | Path, master: Master = own_values) -> None:
        """Merge the adapter into the weights in float32 (the backend keeps the merged model, without
        adapter) and write model (in the loaded checkpoint's dtype), processor and generation config in the
        layout :meth:`load` reads."""
        state = self.merge_adapter(master)
        out = Path(out_dir)
        self.model.save_pretrained(out, state_dict=state)
        self.generation_config.save_pretrained(out)  # after the model: keeps generation_kwargs
        self.processor.save_pretrained(out)
