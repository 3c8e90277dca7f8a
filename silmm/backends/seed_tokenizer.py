"""The SEED image tokenizer (SEED-LLaMA's image side): pixels -> 32 discrete codes -> an unCLIP image embedding.

Architecture (as released in AILab-CVC/SEED, ``MultiModalLLM/src/tokenizer/qformer/qformer_quantizer.py``,
class ``Blip2QformerQuantizer``), built here from transformers' BLIP-2 parts:

encode (``get_codebook_indices`` in the release)::

    pixels [B,3,224,224] -> EVA-CLIP ViT-g (39 blocks, width 1408, patch 14)  = Blip2VisionModel
                         -> ln_vision (LayerNorm, eps 1e-5)                  = its post_layernorm
    32 learned queries   -> Q-Former (BERT-base, 12 layers, cross-attention to the image features every
                            second layer, *causal* self-attention among the 32 queries) = Blip2QFormerModel
                            with a 4-D causal mask
                         -> encode_task_layer (Linear 768->768, tanh, Linear 768->32)
                         -> nearest codebook entry (8192 x 32, squared L2)   = the codes [B, 32]

codes -> image embedding (``get_codebook_entry`` in the release)::

    codebook[codes] [B,32,32] -> decode_task_layer (Linear 32->32, tanh, Linear 32->768)
                              -> + pos_embed_image -> 4 pre-norm ViT blocks (12 heads, MLP 4x, eps 1e-6)
                                 = Blip2EncoderLayer
                              -> image_down (Linear 768->256, ReLU, 256->128, ReLU, 128->32, no biases)
                              -> flatten [B, 32*32] -> distill_image_proj (Linear 1024->1024)
                              = the image embedding [B, 1024] Stable Diffusion 2.1 unCLIP is conditioned on.

The release ships the weights as one pickled torch file (``seed_quantizer.pt``, a flat state dict of
``Blip2QformerQuantizer``). :func:`convert_seed_tokenizer` reads it with ``torch.load(weights_only=True)``
and writes ``model.safetensors`` + ``config.json`` in our layout; the key map is the table
:data:`KEY_MAP` (every released key is mapped, or listed in :data:`DROPPED` with the reason).
:func:`make_tiny_seed_tokenizer_released` writes a tiny random file in the released layout for tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel
from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer

from silmm.backends.base import CheckpointError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
RELEASED_WEIGHTS_NAME = "seed_quantizer.pt"  # the file the release ships (seed_llama_tokenizer.py)
# written next to a tiny released-layout file only (the release has no config: its sizes are code)
RELEASED_CONFIG_SIDECAR = "seed_quantizer_config.json"
MODEL_TYPE = "seed_image_tokenizer"


class ConversionError(CheckpointError):
    """A released SEED tokenizer file cannot be converted; the message names the file and the key(s)."""


# ------------------------------------------------------------------------------------------ config
@dataclass
class SeedTokenizerConfig:
    """Sizes of the SEED tokenizer. The defaults are the released model's (SEED-LLaMA's seed_quantizer.pt)."""

    # EVA-CLIP ViT-g (create_eva_vit_g): 39 blocks of width 1408, 16 heads, MLP int(1408 * 4.3637) = 6144
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1408
    vision_layers: int = 39
    vision_heads: int = 16
    vision_mlp: int = 6144
    vision_eps: float = 1e-6
    ln_vision_eps: float = 1e-5  # BLIP-2's ln_vision is a default nn.LayerNorm
    # Q-Former (bert-base-uncased with cross-attention every cross_attention_freq layers)
    num_queries: int = 32
    qformer_width: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_mlp: int = 3072
    qformer_eps: float = 1e-12
    cross_attention_freq: int = 2
    # VQ
    codebook_size: int = 8192
    code_dim: int = 32
    # code -> unCLIP embedding: decode_depth ViT blocks (12 heads in the release), image_down, projection
    decoder_layers: int = 4
    decoder_heads: int = 12
    decoder_mlp: int = 3072
    decoder_eps: float = 1e-6
    image_down: tuple[int, ...] = (256, 128, 32)
    embed_dim: int = 1024  # the unCLIP image embedding (image_features_dim)
    # preprocessing (seed_llama_tokenizer.py): bicubic resize to image_size, CLIP mean/std
    pixel_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    pixel_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    attn_implementation: str = "sdpa"
    model_type: str = field(default=MODEL_TYPE)

    def __post_init__(self) -> None:
        self.image_down = tuple(self.image_down)
        self.pixel_mean = tuple(self.pixel_mean)
        self.pixel_std = tuple(self.pixel_std)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_queries != 32:
            # the release switches the Q-Former to causal attention only when it sees exactly 32 queries
            raise ValueError(f"num_queries must be 32 (SEED's causal Q-Former), got {self.num_queries}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping, source: str = "config") -> SeedTokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown SEED tokenizer config fields {unknown}")
        if values.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise CheckpointError(f"{source}: model_type is {values['model_type']!r}, expected {MODEL_TYPE!r}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path) -> SeedTokenizerConfig:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read the SEED tokenizer config: {exc}") from exc
        if not isinstance(values, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        return cls.from_dict(values, source=str(path))


def tiny_config() -> SeedTokenizerConfig:
    """A tiny SEED tokenizer for tests: 28 px images, widths of 32 or less; 32 queries and 8192 codes as
    released (the LLM side relies on both)."""
    return SeedTokenizerConfig(
        image_size=28, patch_size=7, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp=64,
        qformer_width=32, qformer_layers=2, qformer_heads=4, qformer_mlp=64,
        code_dim=8, decoder_layers=2, decoder_heads=4, decoder_mlp=64, image_down=(16, 8, 4), embed_dim=24,
    )


# ------------------------------------------------------------------------------------------ module
def _vision_config(cfg: SeedTokenizerConfig) -> Blip2VisionConfig:
    config = Blip2VisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act="gelu", layer_norm_eps=cfg.vision_eps, attention_dropout=0.0, qkv_bias=True,
    )
    config._attn_implementation = cfg.attn_implementation
    return config


def _qformer_config(cfg: SeedTokenizerConfig) -> Blip2QFormerConfig:
    config = Blip2QFormerConfig(
        hidden_size=cfg.qformer_width, num_hidden_layers=cfg.qformer_layers,
        num_attention_heads=cfg.qformer_heads, intermediate_size=cfg.qformer_mlp, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=cfg.qformer_eps,
        cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=cfg.vision_width,
        use_qformer_text_input=False,
    )
    config._attn_implementation = cfg.attn_implementation
    return config


def _decoder_block_config(cfg: SeedTokenizerConfig) -> Blip2VisionConfig:
    """The release's timm-style ``Block`` (pre-norm, fused qkv with bias, GELU MLP) is BLIP-2's encoder layer."""
    config = Blip2VisionConfig(
        hidden_size=cfg.qformer_width, intermediate_size=cfg.decoder_mlp, num_attention_heads=cfg.decoder_heads,
        hidden_act="gelu", layer_norm_eps=cfg.decoder_eps, attention_dropout=0.0, qkv_bias=True,
    )
    config._attn_implementation = cfg.attn_implementation
    return config


def causal_query_mask(num_queries: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [1, 1, Q, Q]: query i attends to queries 0..i (SEED's causal Q-Former)."""
    allowed = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(num_queries, num_queries, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _mlp(widths: Sequence[int], act: type[nn.Module], bias: bool = True) -> nn.Sequential:
    """Linear layers between consecutive ``widths`` with ``act`` between them (released Sequential indices)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i:
            layers.append(act())
        layers.append(nn.Linear(a, b, bias=bias))
    return nn.Sequential(*layers)


class SeedImageTokenizer(nn.Module):
    """SEED's image tokenizer: :meth:`encode` pixels to 32 codes, :meth:`codes_to_image_embeds` codes to the
    unCLIP image embedding. Inference only (no grad)."""

    def __init__(self, config: SeedTokenizerConfig):
        super().__init__()
        self.config = config
        c = config
        self.vision = Blip2VisionModel(_vision_config(c))
        # the vision model's post_layernorm holds BLIP-2's ln_vision, which has torch's default eps
        self.vision.post_layernorm = nn.LayerNorm(c.vision_width, eps=c.ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_queries, c.qformer_width))
        self.qformer = Blip2QFormerModel(_qformer_config(c))
        self.to_code = _mlp([c.qformer_width, c.qformer_width, c.code_dim], nn.Tanh)
        self.codebook = nn.Embedding(c.codebook_size, c.code_dim)
        self.from_code = _mlp([c.code_dim, c.code_dim, c.qformer_width], nn.Tanh)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, c.num_queries, c.qformer_width))
        block = _decoder_block_config(c)
        self.decoder_blocks = nn.ModuleList(Blip2EncoderLayer(block) for _ in range(c.decoder_layers))
        self.image_down = _mlp([c.qformer_width, *c.image_down], nn.ReLU, bias=False)
        self.image_proj = nn.Linear(c.num_queries * c.image_down[-1], c.embed_dim)
        self.eval()

    # -------------------------------------------------------------------- sizes
    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def device(self) -> torch.device:
        return self.codebook.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.weight.dtype

    # -------------------------------------------------------------------- forward pieces
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 HWC RGB images -> normalised pixel values [B, 3, S, S] (float32, CPU): bicubic resize to
        ``image_size`` (PIL, as torchvision's Resize on PIL images does), then CLIP mean/std."""
        size = self.config.image_size
        mean = torch.tensor(self.config.pixel_mean).view(3, 1, 1)
        std = torch.tensor(self.config.pixel_std).view(3, 1, 1)
        out = []
        for i, image in enumerate(images):
            arr = np.asarray(image)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"image {i}: expected uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
            resized = np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))
            pixels = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255.0
            out.append((pixels - mean) / std)
        return torch.stack(out)

    def query_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The causal Q-Former's outputs for the 32 queries [B, 32, qformer_width]."""
        image = self.vision(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        mask = causal_query_mask(self.num_queries, queries.dtype, queries.device)
        return self.qformer(query_embeds=queries, attention_mask=mask, encoder_hidden_states=image).last_hidden_state

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry (squared L2, as the release computes it) for each row of z."""
        flat = z.reshape(-1, z.shape[-1])
        table = self.codebook.weight
        dist = flat.pow(2).sum(1, keepdim=True) + table.pow(2).sum(1) - 2 * flat @ table.t()
        return dist.argmin(dim=1).view(z.shape[:-1])

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values [B, 3, S, S] -> codes [B, 32] (int64, in [0, codebook_size))."""
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {list(pixel_values.shape)}")
        return self.nearest_codes(self.to_code(self.query_features(pixel_values)))

    @torch.no_grad()
    def codes_to_image_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, 32] -> the unCLIP image embedding [B, embed_dim]."""
        if codes.ndim != 2 or codes.shape[1] != self.num_queries:
            raise ValueError(f"codes must be [B, {self.num_queries}], got {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        h = self.from_code(self.codebook(codes.to(self.device))) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            h = block(h)
        return self.image_proj(self.image_down(h).flatten(1))

    # -------------------------------------------------------------------- checkpoints
    def save_pretrained(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / WEIGHTS_NAME))
        (out / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> SeedImageTokenizer:
        """Load ``config.json`` + ``model.safetensors`` (written by :meth:`save_pretrained` or the converter);
        ``dtype`` None keeps the stored one."""
        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise CheckpointError(f"{path}: no {name} (not a converted SEED tokenizer directory; "
                                      "convert the released seed_quantizer.pt first)")
        config = SeedTokenizerConfig.from_json(path / CONFIG_NAME)
        try:
            state = load_file(str(path / WEIGHTS_NAME), device=str(device))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path / WEIGHTS_NAME}: cannot read: {exc}") from exc
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(state, expected_shapes(model), source=str(path / WEIGHTS_NAME))
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise CheckpointError naming ``source`` and every missing, unexpected or misshapen key."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
    wrong = [f"{k}: {list(state[k].shape)} != {list(shapes[k])}" for k in shapes if tuple(state[k].shape) != shapes[k]]
    if wrong:
        raise CheckpointError(f"{source}: shape mismatch: {'; '.join(wrong)}")


# ------------------------------------------------------------------------------------------ conversion
# Released key (regex, full match) -> our key. The EVA attention's q_bias / v_bias are fused into one qkv
# bias (q, zeros for k, v), as the release computes it in every forward.
_VIT = r"visual_encoder\.blocks\.(\d+)\."
_QF = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
_DEC = r"blocks_image\.(\d+)\."
KEY_MAP: list[tuple[str, str]] = [
    # EVA-CLIP ViT-g -> Blip2VisionModel
    (r"visual_encoder\.cls_token", r"vision.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", r"vision.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision.embeddings.patch_embedding.\1"),
    (_VIT + r"norm1\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm1.\2"),
    (_VIT + r"norm2\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm2.\2"),
    (_VIT + r"attn\.qkv\.weight", r"vision.encoder.layers.\1.self_attn.qkv.weight"),
    (_VIT + r"attn\.proj\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (_VIT + r"mlp\.(fc1|fc2)\.(weight|bias)", r"vision.encoder.layers.\1.mlp.\2.\3"),
    (r"ln_vision\.(weight|bias)", r"vision.post_layernorm.\1"),
    # Q-Former (query path) -> Blip2QFormerModel
    (r"query_tokens", r"query_tokens"),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    (_QF + r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (_QF + r"(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.output.\3.\4"),
    (_QF + r"(intermediate_query|output_query)\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.\3.\4"),
    # VQ
    (r"encode_task_layer\.(0|2)\.(weight|bias)", r"to_code.\1.\2"),
    (r"quantize\.embedding\.weight", r"codebook.weight"),
    # codes -> unCLIP image embedding
    (r"decode_task_layer\.(0|2)\.(weight|bias)", r"from_code.\1.\2"),
    (r"pos_embed_image", r"decoder_pos_embed"),
    (_DEC + r"norm1\.(weight|bias)", r"decoder_blocks.\1.layer_norm1.\2"),
    (_DEC + r"norm2\.(weight|bias)", r"decoder_blocks.\1.layer_norm2.\2"),
    (_DEC + r"attn\.qkv\.(weight|bias)", r"decoder_blocks.\1.self_attn.qkv.\2"),
    (_DEC + r"attn\.proj\.(weight|bias)", r"decoder_blocks.\1.self_attn.projection.\2"),
    (_DEC + r"mlp\.(fc1|fc2)\.(weight|bias)", r"decoder_blocks.\1.mlp.\2.\3"),
    (r"image_down\.(0|2|4)\.weight", r"image_down.\1.weight"),
    (r"distill_image_proj\.(weight|bias)", r"image_proj.\1"),
]
# Released EVA q/v biases -> the fused qkv bias of our layer \1
QV_BIAS = re.compile(_VIT + r"attn\.(q_bias|v_bias)")
QKV_BIAS = "vision.encoder.layers.{}.self_attn.qkv.bias"

# Released keys that are dropped on purpose (regex, reason). None of them takes part in encode or decode.
DROPPED: list[tuple[str, str]] = [
    (r"pos_embed|blocks\.\d+\..+", "recon_s branch: rebuilds the Q-Former features, used in training only"),
    (r"Qformer\.bert\.embeddings\.position_ids", "buffer of the BERT text embeddings (the queries have none)"),
    # BLIP-2's text branch, deleted by Blip2QformerQuantizer (set to None) but present in BLIP-2 checkpoints
    (r"Qformer\.cls\..+", "BERT LM head (text branch, deleted by the release)"),
    (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\..+", "BERT text embeddings (deleted by the release)"),
    (_QF + r"(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)", "text-token FFN (deleted by the release)"),
]


def map_released_key(key: str) -> str | None:
    """Our key for a released key, or None when the key is not in :data:`KEY_MAP`."""
    for pattern, target in KEY_MAP:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def dropped_reason(key: str) -> str | None:
    for pattern, reason in DROPPED:
        if re.fullmatch(pattern, key):
            return reason
    return None


def convert_state_dict(released: Mapping[str, torch.Tensor], source: str = "state dict"
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """Released state dict -> (our state dict, {our key: released key(s)}, {dropped released key: reason}).
    Raises ConversionError naming every released key that is neither mapped nor dropped on purpose."""
    ours: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: dict[str, str] = {}
    qv: dict[int, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in released.items():
        if match := QV_BIAS.fullmatch(key):
            qv.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif (target := map_released_key(key)) is not None:
            ours[target] = value
            origin[target] = key
        elif (reason := dropped_reason(key)) is not None:
            dropped[key] = reason
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{source}: unexpected keys (neither mapped nor dropped on purpose): {sorted(unknown)}")
    for layer, parts in sorted(qv.items()):
        if set(parts) != {"q_bias", "v_bias"}:
            name = "v_bias" if "q_bias" in parts else "q_bias"
            raise ConversionError(f"{source}: missing keys ['visual_encoder.blocks.{layer}.attn.{name}']")
        ours[QKV_BIAS.format(layer)] = torch.cat([parts["q_bias"], torch.zeros_like(parts["q_bias"]), parts["v_bias"]])
        origin[QKV_BIAS.format(layer)] = f"visual_encoder.blocks.{layer}.attn.q_bias/v_bias"
    return ours, origin, dropped


def released_names(config: SeedTokenizerConfig) -> dict[str, str]:
    """Our key -> the released key(s) it is made from, for the sizes in ``config`` (for error messages)."""
    names: dict[str, str] = {}
    for key in released_shapes(config):
        if match := QV_BIAS.fullmatch(key):
            names[QKV_BIAS.format(match.group(1))] = f"visual_encoder.blocks.{match.group(1)}.attn.q_bias/v_bias"
        elif (target := map_released_key(key)) is not None:
            names[target] = key
    return names


def load_released(src_file: str | Path) -> dict[str, torch.Tensor]:
    """The released flat state dict, read with ``torch.load(weights_only=True)`` (no code is unpickled)."""
    src = Path(src_file)
    if not src.is_file():
        raise ConversionError(f"{src}: no such file (the released SEED tokenizer is {RELEASED_WEIGHTS_NAME})")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ... for a bad file
        raise ConversionError(f"{src}: cannot read as a weights-only torch file: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise ConversionError(f"{src}: expected a flat state dict (name -> tensor), as the release's "
                              "Blip2QformerQuantizer.from_pretrained loads it")
    return dict(state)


def convert_seed_tokenizer(src_file: str | Path, dst_dir: str | Path,
                           config: SeedTokenizerConfig | None = None,
                           dtype: torch.dtype | None = None) -> Path:
    """Convert the released ``seed_quantizer.pt`` to ``dst_dir`` (``model.safetensors`` + ``config.json``).

    ``config`` None: the sizes from a ``seed_quantizer_config.json`` next to the file (written by
    :func:`make_tiny_seed_tokenizer_released`) if there is one, else the released model's. Every tensor's
    shape is checked against those sizes; ``dtype`` None keeps the released dtypes.
    """
    src = Path(src_file)
    if config is None:
        sidecar = src.parent / RELEASED_CONFIG_SIDECAR
        config = SeedTokenizerConfig.from_json(sidecar) if sidecar.is_file() else SeedTokenizerConfig()
    ours, origin, _ = convert_state_dict(load_released(src), source=str(src))
    with torch.device("meta"):
        shapes = expected_shapes(SeedImageTokenizer(config))
    names = released_names(config)
    missing = sorted(names.get(k, k) for k in set(shapes) - set(ours))
    if missing:
        raise ConversionError(f"{src}: missing keys {missing}")
    extra = sorted(origin[k] for k in set(ours) - set(shapes))
    if extra:  # e.g. a deeper ViT than the config says
        raise ConversionError(f"{src}: unexpected keys for this config: {extra}")
    wrong = [f"{origin[k]}: {list(ours[k].shape)}, expected {list(shapes[k])}"
             for k in sorted(shapes) if tuple(ours[k].shape) != shapes[k]]
    if wrong:
        raise ConversionError(f"{src}: shape mismatch for the config's sizes: {'; '.join(wrong)}")
    if dtype is not None:
        ours = {k: v.to(dtype) for k, v in ours.items()}
    out = Path(dst_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ours.items()}, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------ tiny release
def released_shapes(cfg: SeedTokenizerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``Blip2QformerQuantizer.state_dict()`` (recon_s and blocks_for_image on, as
    released) with its shape, for the sizes in ``cfg``."""
    v, q, n = cfg.vision_width, cfg.qformer_width, cfg.num_queries
    grid = (cfg.image_size // cfg.patch_size) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "visual_encoder.cls_token": (1, 1, v),
        "visual_encoder.pos_embed": (1, grid + 1, v),
        "visual_encoder.patch_embed.proj.weight": (v, 3, cfg.patch_size, cfg.patch_size),
        "visual_encoder.patch_embed.proj.bias": (v,),
    }
    for i in range(cfg.vision_layers):
        p = f"visual_encoder.blocks.{i}."
        shapes |= {p + "norm1.weight": (v,), p + "norm1.bias": (v,), p + "attn.q_bias": (v,),
                   p + "attn.v_bias": (v,), p + "attn.qkv.weight": (3 * v, v), p + "attn.proj.weight": (v, v),
                   p + "attn.proj.bias": (v,), p + "norm2.weight": (v,), p + "norm2.bias": (v,),
                   p + "mlp.fc1.weight": (cfg.vision_mlp, v), p + "mlp.fc1.bias": (cfg.vision_mlp,),
                   p + "mlp.fc2.weight": (v, cfg.vision_mlp), p + "mlp.fc2.bias": (v,)}
    shapes |= {"ln_vision.weight": (v,), "ln_vision.bias": (v,), "query_tokens": (1, n, q),
               "Qformer.bert.embeddings.position_ids": (1, 512),
               "Qformer.bert.embeddings.LayerNorm.weight": (q,), "Qformer.bert.embeddings.LayerNorm.bias": (q,)}
    for i in range(cfg.qformer_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        kinds = ["attention"] + (["crossattention"] if i % cfg.cross_attention_freq == 0 else [])
        for kind in kinds:
            kv_in = v if kind == "crossattention" else q
            shapes |= {p + f"{kind}.self.query.weight": (q, q), p + f"{kind}.self.query.bias": (q,),
                       p + f"{kind}.self.key.weight": (q, kv_in), p + f"{kind}.self.key.bias": (q,),
                       p + f"{kind}.self.value.weight": (q, kv_in), p + f"{kind}.self.value.bias": (q,),
                       p + f"{kind}.output.dense.weight": (q, q), p + f"{kind}.output.dense.bias": (q,),
                       p + f"{kind}.output.LayerNorm.weight": (q,), p + f"{kind}.output.LayerNorm.bias": (q,)}
        shapes |= {p + "intermediate_query.dense.weight": (cfg.qformer_mlp, q),
                   p + "intermediate_query.dense.bias": (cfg.qformer_mlp,),
                   p + "output_query.dense.weight": (q, cfg.qformer_mlp), p + "output_query.dense.bias": (q,),
                   p + "output_query.LayerNorm.weight": (q,), p + "output_query.LayerNorm.bias": (q,)}
    shapes |= {"quantize.embedding.weight": (cfg.codebook_size, cfg.code_dim),
               "encode_task_layer.0.weight": (q, q), "encode_task_layer.0.bias": (q,),
               "encode_task_layer.2.weight": (cfg.code_dim, q), "encode_task_layer.2.bias": (cfg.code_dim,),
               "decode_task_layer.0.weight": (cfg.code_dim, cfg.code_dim),
               "decode_task_layer.0.bias": (cfg.code_dim,),
               "decode_task_layer.2.weight": (q, cfg.code_dim), "decode_task_layer.2.bias": (q,),
               "pos_embed": (1, n, q), "pos_embed_image": (1, n, q)}
    for prefix in ("blocks", "blocks_image"):
        for i in range(cfg.decoder_layers):
            p = f"{prefix}.{i}."
            shapes |= {p + "norm1.weight": (q,), p + "norm1.bias": (q,), p + "attn.qkv.weight": (3 * q, q),
                       p + "attn.qkv.bias": (3 * q,), p + "attn.proj.weight": (q, q), p + "attn.proj.bias": (q,),
                       p + "norm2.weight": (q,), p + "norm2.bias": (q,),
                       p + "mlp.fc1.weight": (cfg.decoder_mlp, q), p + "mlp.fc1.bias": (cfg.decoder_mlp,),
                       p + "mlp.fc2.weight": (q, cfg.decoder_mlp), p + "mlp.fc2.bias": (q,)}
    widths = [q, *cfg.image_down]
    for j, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        shapes[f"image_down.{2 * j}.weight"] = (b, a)
    shapes |= {"distill_image_proj.weight": (cfg.embed_dim, n * cfg.image_down[-1]),
               "distill_image_proj.bias": (cfg.embed_dim,)}
    return shapes


def random_released_state(cfg: SeedTokenizerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the released layout: LayerNorm scales near 1, everything else N(0, 1) scaled by
    1/sqrt(fan-in) (so activations stay O(1) and every weight moves the outputs), int64 position_ids."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in released_shapes(cfg).items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1]).view(shape)
            continue
        value = torch.randn(shape, generator=gen)
        if re.search(r"(norm\d?|LayerNorm|ln_vision)\.weight$", key):
            value = 1.0 + 0.1 * value
        elif len(shape) >= 2 and not key.startswith(("quantize", "query_tokens", "pos_embed", "visual_encoder.pos",
                                                     "visual_encoder.cls")):
            value = value / float(np.prod(shape[1:])) ** 0.5
        else:
            value = 0.5 * value
        state[key] = value
    return state


def make_tiny_seed_tokenizer_released(out_dir: str | Path, seed: int = 0,
                                      config: SeedTokenizerConfig | None = None) -> Path:
    """Write a tiny random SEED tokenizer in the released layout: ``out_dir/seed_quantizer.pt`` (a flat state
    dict with the release's key names, as ``torch.save(model.state_dict())`` writes it) and the sizes in
    ``seed_quantizer_config.json`` (the release has no config file; the converter reads this one when
    present). Deterministic per seed. Returns the path of the .pt file."""
    cfg = config or tiny_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RELEASED_WEIGHTS_NAME
    torch.save(random_released_state(cfg, seed), path)
    (out / RELEASED_CONFIG_SIDECAR).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return path
