"""DreamLLM released checkpoints -> the dream backend's layout (:mod:`silmm.backends.dream`).

The release (RunpeiDong/DreamLLM, e.g. ``dreamllm-7b-chat-aesthetic``; ``omni/models/dreamllm``) is one directory::

    config.json          model_type "dreamllm": LLaMA fields (Vicuna-7B), special_tokens2ids_dict, and the plugins'
                         init kwargs (plugins_init_kwargs / plugins_type): dream_embedding, clip_vision_embedding,
                         stable_diffusion_head (their ``_target_`` class entries and training flags are ignored)
    model*.safetensors   the LLM (+ index when sharded); plugin weights are not in it (_keys_to_ignore_on_save)
    tokenizer files      Vicuna's LlamaTokenizer + [PAD] and the added <image> <im_patch> <im_start> <im_end>
                         <dream> <dream_start> <dream_end>
    dream_embedding.bin        {"dream_queries": [1, L, D]}                    (torch pickles: read with
    clip_vision_embedding.bin  CLIP ViT-L/14 + linear projector (with bias)     weights_only=True only)
    stable_diffusion_head.bin  SD 2.1-base UNet + VAE + linear projector (no bias)

The CLIP, UNet, VAE and scheduler *configs* are not in the release: they come from the plugins'
``clip_vision_model_name_or_path`` / ``diffusion_name_or_path``, resolved as: the ``clip`` / ``diffusion`` argument,
else that path if it is a local directory (a relative one is looked up in the release directory first), else the
builtin configs below for exactly "openai/clip-vit-large-patch14" / "stabilityai/stable-diffusion-2-1-base" (also
as the hub-cache folder names ``models--openai--clip-vit-large-patch14`` etc. that the release's MODEL_ZOOS uses).

What the converter writes (:func:`convert_dreamllm`), and why it computes what the release computes:

- ``lmm/``: LlavaForConditionalGeneration in the main weights' dtype. vision tower <- CLIP; language model and
  lm_head <- the main weights. DreamLLM's image projector is ONE linear layer; LLaVA's is linear_1 -> act ->
  linear_2, so: act = "linear" (identity), linear_1 <- the released projector, linear_2 = identity matrix with zero
  bias (exact: x @ I + 0 = x in any float format). Features: CLIP hidden_states[select_layer] without CLS, as the
  release. The processor expands ``<im_patch>`` to (image / patch)^2 positions, so
  "<im_start><im_patch><im_end>" puts the patches exactly where the release replaces its 256 <im_patch> embeddings.
- ``decoder/``: unet/, vae/ (from stable_diffusion_head.bin) and scheduler/ as the release builds it
  (DDPMScheduler.from_pretrained of the SD folder's scheduler config).
- ``dream_head/``: queries [L, D] and projector.weight [C, D] (no bias), float32; prompt_template "{prompt}" (the
  release tokenizes the raw prompt, BOS only), dream_start_token "<dream_start>" (the release feeds
  [<dream_start>, queries, <dream_end>] and takes H at the queries; <dream_end> cannot change them under causal
  attention), Vicuna v1.1 conversation templates for text and yes/no questions.

Dropped on purpose (:data:`DROPPED`): the persistent RoPE buffers ``rotary_emb.inv_freq`` (checked against
1/theta^(2i/d) first: a mismatch is refused) and CLIP's ``embeddings.position_ids`` buffer. Refused: a projector
that is not "linear" with depth 1, and ``use_additional_post_layernorm`` (an extra LayerNorm after the image
projector that LLaVA cannot represent), RoPE scaling.

:func:`build_tiny_dreamllm_released` writes a tiny random release in exactly this layout (configs of its CLIP and
SD in ``tiny_clip_vision/`` and ``tiny_stable_diffusion/`` inside the release, named relative to it in config.json).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from silmm.backends.dream import (
    DECODER_DIR,
    HEAD_CONFIG,
    HEAD_DIR,
    HEAD_WEIGHTS,
    LMM_DIR,
    DreamHeadConfig,
    load_head,
)
from silmm.backends.seed_tokenizer import ConversionError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------- released layout
CONFIG_NAME, INDEX_NAME = "config.json", "model.safetensors.index.json"
DREAM, CLIP, SD = "dream_embedding", "clip_vision_embedding", "stable_diffusion_head"
PLUGIN_TYPES = {DREAM: "embedding", CLIP: "embedding", SD: "head"}
PAD_TOKEN = "[PAD]"
IMAGE_PATCH, IMAGE_START, IMAGE_END = "<im_patch>", "<im_start>", "<im_end>"
DREAM_START, DREAM_END = "<dream_start>", "<dream_end>"
IMAGE_TOKENS = ("<image>", IMAGE_PATCH, IMAGE_START, IMAGE_END)  # tokenization_dreamllm.py's order of addition
DREAM_TOKENS = ("<dream>", DREAM_START, DREAM_END)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
CHAT_TEMPLATE = VICUNA_SYSTEM + " USER: {prompt} ASSISTANT:"
QUESTION_TEMPLATE = VICUNA_SYSTEM + f" USER: {IMAGE_START}{IMAGE_PATCH}{IMAGE_END}\n{{question}} Answer yes or no. ASSISTANT:"


@dataclass(frozen=True)
class Rename:
    """Released keys starting with ``source`` go to ``part`` (lmm, unet, vae, head) as ``target`` + the rest."""
    source: str
    part: str
    target: str


MAIN = "the main weights (model*.safetensors)"
KEY_MAP: dict[str, tuple[Rename, ...]] = {
    MAIN: (Rename("model.embed_tokens.", "lmm", "model.language_model.embed_tokens."),
           Rename("model.layers.", "lmm", "model.language_model.layers."),
           Rename("model.norm.", "lmm", "model.language_model.norm."),
           Rename("lm_head.", "lmm", "lm_head.")),
    f"{CLIP}.bin": (Rename("clip_vision_model.vision_model.", "lmm", "model.vision_tower."),
                    Rename("projector.projector.", "lmm", "model.multi_modal_projector.linear_1.")),
    f"{SD}.bin": (Rename("unet.", "unet", ""), Rename("vae.", "vae", ""),
                  Rename("projector.projector.", "head", "projector.")),
    f"{DREAM}.bin": (Rename("dream_queries", "head", "queries"),),
}
ROTARY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
DROPPED: dict[str, tuple[re.Pattern, ...]] = {
    MAIN: (ROTARY,),  # recomputed by transformers from rope_theta (checked before dropping)
    f"{CLIP}.bin": (re.compile(r"clip_vision_model\.vision_model\.embeddings\.position_ids"),),  # an arange buffer
}
# written by the converter, not read: LLaVA's second projector layer as the identity (see the module docstring)
SYNTHESIZED = ("model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias")

# ------------------------------------------------------------------------------------- builtin configs
CLIP_L14 = "openai/clip-vit-large-patch14"
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
BUILTIN_CLIP = {CLIP_L14: dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                               projection_dim=768, num_channels=3)}
BUILTIN_UNET = {SD21_BASE: dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True, dual_cross_attention=False, only_cross_attention=False, num_class_embeds=None)}
BUILTIN_VAE = {SD21_BASE: dict(  # the SD 2.x autoencoder (scaling_factor 0.18215, the diffusers default)
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512)}
# SD 2.1-base's scheduler/scheduler_config.json; the release reads it with DDPMScheduler.from_pretrained
BUILTIN_SCHEDULER = {SD21_BASE: {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}}


# ------------------------------------------------------------------------------------------ key mapping
def map_release(states: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                              dict[tuple[str, str], tuple[str, str]]]:
    """{released file: state} -> ({part: {our key: tensor}}, {(part, our key): (file, released key)}).

    Pure renaming: every key is mapped by :data:`KEY_MAP` or dropped by :data:`DROPPED`, else ConversionError."""
    parts: dict[str, dict[str, torch.Tensor]] = {"lmm": {}, "unet": {}, "vae": {}, "head": {}}
    origin: dict[tuple[str, str], tuple[str, str]] = {}
    for file, state in states.items():
        group = MAIN if file not in KEY_MAP else file
        for key, tensor in state.items():
            if any(p.fullmatch(key) for p in DROPPED.get(group, ())):
                continue
            if group == f"{CLIP}.bin" and key.startswith("post_layernorm."):
                raise ConversionError(f"{file}: {key!r} is the additional post-projector LayerNorm "
                                      f"(use_additional_post_layernorm), which silmm's LLaVA layout cannot represent")
            rename = next((r for r in KEY_MAP[group] if key.startswith(r.source)), None)
            if rename is None:
                raise ConversionError(f"{file}: unexpected key {key!r} (neither mapped nor dropped on purpose)")
            if key == "dream_queries" and tensor.dim() == 3 and tensor.shape[0] == 1:
                tensor = tensor[0]  # nn.Parameter [1, L, D] in the release, [L, D] in our head
            target = rename.target + key[len(rename.source):]
            parts[rename.part][target] = tensor
            origin[(rename.part, target)] = (file, key)
    return parts, origin


def _released_name(part: str, key: str) -> tuple[str, str]:
    """The inverse of :data:`KEY_MAP`: where a key of ``part`` comes from (file group, released key)."""
    for group, renames in KEY_MAP.items():
        for r in renames:
            if r.part == part and key.startswith(r.target):
                return group, r.source + key[len(r.target):]
    return "?", key


def check_fits(part: str, provided: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
               origin: Mapping[tuple[str, str], tuple[str, str]], sizes_from: str) -> None:
    """The mapped keys of ``part`` are exactly ``expected`` with its shapes, else a ConversionError naming the
    released file and key (``sizes_from`` says where the expected shapes come from)."""
    missing = sorted(set(expected) - set(provided))
    if missing:
        group, key = _released_name(part, missing[0])
        raise ConversionError(f"{group}: missing key {key!r} ({len(missing)} missing in all)")
    for key in sorted(provided):
        file, released = origin.get((part, key), _released_name(part, key))
        if key not in expected:
            raise ConversionError(f"{file}: unexpected key {released!r} (no {part} parameter {key!r} in {sizes_from})")
        if tuple(provided[key].shape) != tuple(expected[key]):
            raise ConversionError(f"{file}: {released!r} has shape {list(provided[key].shape)}, {sizes_from} needs "
                                  f"{list(expected[key])}")


def _shapes(model: torch.nn.Module, leave_out: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in leave_out}


# ------------------------------------------------------------------------------------------ reading
@dataclass
class Release:
    """What :func:`read_release` found: the config, the tokenizer and the released tensors per file."""
    path: Path
    config: dict
    tokenizer: object
    states: dict[str, dict[str, torch.Tensor]]

    def plugin(self, name: str) -> dict:
        return self.config["plugins_init_kwargs"][name]


def _read_config(src: Path) -> dict:
    path = src / CONFIG_NAME
    if not path.is_file():
        raise ConversionError(f"{src}: no {CONFIG_NAME} (a released DreamLLM directory)")
    config = json.loads(path.read_text())
    if config.get("model_type") != "dreamllm":
        raise ConversionError(f"{path}: model_type is {config.get('model_type')!r}, expected 'dreamllm'")
    plugins, types = config.get("plugins_init_kwargs", {}), config.get("plugins_type", {})
    if set(plugins) != set(PLUGIN_TYPES):
        raise ConversionError(f"{path}: plugins_init_kwargs has {sorted(plugins)}, expected {sorted(PLUGIN_TYPES)}")
    for name, kind in PLUGIN_TYPES.items():
        if types.get(name, kind) != kind:
            raise ConversionError(f"{path}: plugins_type[{name!r}] is {types.get(name)!r}, expected {kind!r}")
    for name in (CLIP, SD):
        kw = plugins[name]
        if kw.get("projector_type", "linear") != "linear" or int(kw.get("projector_depth", 1)) != 1:
            raise ConversionError(f"{path}: {name} projector is {kw.get('projector_type')!r} of depth "
                                  f"{kw.get('projector_depth')}; only 'linear' of depth 1 converts")
    if plugins[CLIP].get("use_additional_post_layernorm", False):
        raise ConversionError(f"{path}: {CLIP}.use_additional_post_layernorm is true: an extra LayerNorm after the "
                              f"image projector, which silmm's LLaVA layout cannot represent")
    if config.get("rope_scaling") is not None:
        raise ConversionError(f"{path}: rope_scaling {config['rope_scaling']} is not supported")
    return config


def _tokenizer_class(src: Path):
    """The class tokenizer_config.json names (DreamLLMTokenizer is a LlamaTokenizer), not AutoTokenizer: that would
    read config.json, whose model_type transformers does not know, and warn."""
    import transformers

    path = src / "tokenizer_config.json"
    name = json.loads(path.read_text()).get("tokenizer_class") if path.is_file() else None
    if name in ("DreamLLMTokenizer", "LlamaTokenizer", "LlamaTokenizerFast"):
        return transformers.LlamaTokenizer
    return getattr(transformers, name or "", None) or transformers.AutoTokenizer


def _read_tokenizer(src: Path, config: dict):
    try:
        tokenizer = _tokenizer_class(src).from_pretrained(str(src))
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise ConversionError(f"{src}: cannot read the tokenizer (a release with only tokenizer.model needs "
                              f"`pip install sentencepiece protobuf` to convert it): {exc}") from exc
    ids = config.get("special_tokens2ids_dict", {})
    added = ids.get("additional_special_tokens", {})
    for token in (IMAGE_PATCH, IMAGE_START, IMAGE_END, DREAM_START, DREAM_END):
        if token not in added:
            raise ConversionError(f"{src / CONFIG_NAME}: special_tokens2ids_dict has no {token!r}")
    pairs = [*added.items(), *((k, v) for k, v in ids.items() if k != "additional_special_tokens")]
    for token, expected in pairs:
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected or (got == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ConversionError(f"{src / CONFIG_NAME}: special_tokens2ids_dict gives {token!r} id {expected}, "
                                  f"the tokenizer in {src} gives {got}")
    if len(tokenizer) > int(config["vocab_size"]):
        raise ConversionError(f"{src / CONFIG_NAME}: vocab_size {config['vocab_size']} < the tokenizer's "
                              f"{len(tokenizer)} tokens")
    if tokenizer.pad_token is None and PAD_TOKEN in tokenizer.get_vocab():
        tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = "left"
    return tokenizer


def _main_files(src: Path) -> list[Path]:
    if (src / INDEX_NAME).is_file():
        names = sorted(set(json.loads((src / INDEX_NAME).read_text())["weight_map"].values()))
        files = [src / n for n in names]
        for f in files:
            if not f.is_file():
                raise ConversionError(f"{src / INDEX_NAME}: names {f.name}, which is missing")
        return files
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{src}: no main weights (model.safetensors, {INDEX_NAME} + shards, or pytorch_model*.bin)")
    return bins


def _torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, tensors only (weights_only: no code from the file runs)."""
    if not path.is_file():
        raise ConversionError(f"{path.parent}: missing {path.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... for a bad file
        raise ConversionError(f"{path}: cannot read as a weights-only torch file: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ConversionError(f"{path}: expected a flat state dict (name -> tensor)")
    return state


def read_release(src: str | Path) -> Release:
    src = Path(src)
    config = _read_config(src)
    tokenizer = _read_tokenizer(src, config)
    states: dict[str, dict[str, torch.Tensor]] = {}
    for f in _main_files(src):
        try:
            states[f.name] = load_file(str(f)) if f.suffix == ".safetensors" else _torch_file(f)
        except (OSError, SafetensorError) as exc:
            raise ConversionError(f"{f}: cannot read the safetensors file: {exc}") from exc
    for name in (DREAM, CLIP, SD):
        states[f"{name}.bin"] = _torch_file(src / f"{name}.bin")
    return Release(src, config, tokenizer, states)


def check_rotary(release: Release) -> None:
    """The dropped inv_freq buffers must be what transformers recomputes, 1 / theta^(2i/d)."""
    cfg = release.config
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    expected = 1.0 / float(cfg.get("rope_theta", 10000.0)) ** (torch.arange(0, head_dim, 2).float() / head_dim)
    for file, state in release.states.items():
        for key, value in state.items():
            if ROTARY.fullmatch(key):
                tol = max(1e-6, 2 * torch.finfo(value.dtype).eps)
                if value.shape != expected.shape or not torch.allclose(value.float(), expected, rtol=tol, atol=0):
                    raise ConversionError(f"{file}: {key!r} is not 1/rope_theta^(2i/{head_dim}) for rope_theta "
                                          f"{cfg.get('rope_theta', 10000.0)}: the release's RoPE differs from ours")


# ------------------------------------------------------------------------------------------ configs
def _local_dir(given: str | Path | None, named: str, src: Path) -> Path | None:
    if given is not None:
        if not Path(given).is_dir():
            raise ConversionError(f"{given}: not a directory")
        return Path(given)
    for candidate in (src / named, Path(named)):
        if named and candidate.is_dir():
            return candidate
    return None


def _builtin_name(named: str, builtins: Mapping) -> str | None:
    for name in builtins:
        if named == name or f"models--{name.replace('/', '--')}" in named:
            return name
    return None


def clip_configs(release: Release, clip: str | Path | None):
    """(CLIPVisionConfig, the image processor) for the release's CLIP."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig

    named = str(release.plugin(CLIP).get("clip_vision_model_name_or_path", ""))
    folder = _local_dir(clip, named, release.path)
    if folder is not None:
        if not (folder / "preprocessor_config.json").is_file():
            raise ConversionError(f"{folder}: no preprocessor_config.json (a CLIP model directory)")
        return CLIPVisionConfig.from_pretrained(str(folder)), CLIPImageProcessorPil.from_pretrained(str(folder))
    name = _builtin_name(named, BUILTIN_CLIP)
    if name is None:
        raise ConversionError(f"{release.path / CONFIG_NAME}: clip_vision_model_name_or_path {named!r} is neither a "
                              f"local directory nor {CLIP_L14!r}; pass the CLIP directory (--clip DIR)")
    cfg = BUILTIN_CLIP[name]
    size = cfg["image_size"]  # CLIPImageProcessor's defaults otherwise (bicubic, CLIP mean/std), as the hub's file
    return CLIPVisionConfig(**cfg), CLIPImageProcessorPil(size={"shortest_edge": size},
                                                          crop_size={"height": size, "width": size})


def diffusion_configs(release: Release, diffusion: str | Path | None) -> tuple[dict, dict, dict]:
    """(UNet config, VAE config, scheduler config) for the release's Stable Diffusion."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    named = str(release.plugin(SD).get("diffusion_name_or_path", ""))
    folder = _local_dir(diffusion, named, release.path)
    if folder is not None:
        try:
            return (dict(UNet2DConditionModel.load_config(str(folder), subfolder="unet")),
                    dict(AutoencoderKL.load_config(str(folder), subfolder="vae")),
                    dict(DDPMScheduler.load_config(str(folder), subfolder="scheduler")))
        except (OSError, ValueError) as exc:
            raise ConversionError(f"{folder}: not a Stable Diffusion directory (unet/, vae/, scheduler/ configs): "
                                  f"{exc}") from exc
    name = _builtin_name(named, BUILTIN_UNET)
    if name is None:
        raise ConversionError(f"{release.path / CONFIG_NAME}: diffusion_name_or_path {named!r} is neither a local "
                              f"directory nor {SD21_BASE!r}; pass the Stable Diffusion directory (--diffusion DIR)")
    return dict(BUILTIN_UNET[name]), dict(BUILTIN_VAE[name]), dict(BUILTIN_SCHEDULER[name])


LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "attention_bias", "initializer_range", "bos_token_id", "eos_token_id")


def llava_config(release: Release, vision_config):
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(**{k: release.config[k] for k in LLAMA_FIELDS if k in release.config},
                       pad_token_id=release.tokenizer.pad_token_id, tie_word_embeddings=False)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return LlavaConfig(vision_config=vision_config, text_config=text,
                       image_token_id=release.tokenizer.convert_tokens_to_ids(IMAGE_PATCH),
                       projector_hidden_act="linear", multimodal_projector_bias=True,
                       vision_feature_layer=int(release.plugin(CLIP).get("select_layer", -2)),
                       vision_feature_select_strategy="default", image_seq_length=patches, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------ conversion
def _uniform_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _write_lmm(release: Release, parts, origin, vision_config, image_processor, out: Path) -> int:
    """LLaVA on the meta device, then the released tensors assigned (held once), saved; returns hidden size."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    config = llava_config(release, vision_config)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    check_fits("lmm", parts["lmm"], _shapes(model, SYNTHESIZED), origin, f"{CONFIG_NAME} and the CLIP config")
    dtype = parts["lmm"]["model.language_model.embed_tokens.weight"].dtype  # the release's dtype
    state = {k: v if v.dtype == dtype else v.to(dtype) for k, v in parts["lmm"].items()}
    hidden = config.text_config.hidden_size
    state[SYNTHESIZED[0]] = torch.eye(hidden, dtype=dtype)
    state[SYNTHESIZED[1]] = torch.zeros(hidden, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.config.dtype = dtype
    model.save_pretrained(str(out))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=release.tokenizer,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token=IMAGE_PATCH)
    processor.save_pretrained(str(out))
    return hidden


def _write_decoder(parts, origin, unet_cfg: dict, vae_cfg: dict, scheduler_cfg: dict, out: Path) -> int:
    """UNet and VAE from stable_diffusion_head.bin, the DDPM scheduler; returns the UNet's cross-attention size."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    for part, cls, cfg in (("unet", UNet2DConditionModel, unet_cfg), ("vae", AutoencoderKL, vae_cfg)):
        with torch.device("meta"):
            model = cls.from_config(cfg)
        check_fits(part, parts[part], _shapes(model), origin, f"the Stable Diffusion {part} config")
        dtype = _uniform_dtype(parts[part])
        model.load_state_dict({k: v.to(dtype) for k, v in parts[part].items()}, strict=True, assign=True)
        model.save_pretrained(str(out / part), safe_serialization=True)
    DDPMScheduler.from_config(scheduler_cfg).save_pretrained(str(out / "scheduler"))
    return int(unet_cfg["cross_attention_dim"])


def _write_head(release: Release, parts, origin, hidden: int, cross: int, out: Path) -> None:
    num_queries = int(release.plugin(DREAM).get("num_dream_queries", 64))
    expected = {"queries": (num_queries, hidden), "projector.weight": (cross, hidden)}
    check_fits("head", parts["head"], expected, origin, f"{CONFIG_NAME} (num_dream_queries, hidden_size) and the UNet "
                                                        f"(cross_attention_dim)")
    out.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in parts["head"].items()}, str(out / HEAD_WEIGHTS))
    DreamHeadConfig(num_queries=num_queries, hidden_size=hidden, cross_attention_dim=cross,
                    prompt_template="{prompt}", chat_template=CHAT_TEMPLATE, question_template=QUESTION_TEMPLATE,
                    projector_bias=False, dream_start_token=DREAM_START).write(out / HEAD_CONFIG)


def _log_dropped(release: Release) -> None:
    counts: dict[str, int] = {}
    for file, state in release.states.items():
        group = file if file in KEY_MAP else MAIN
        for key in state:
            for p in DROPPED.get(group, ()):
                if p.fullmatch(key):
                    counts[p.pattern] = counts.get(p.pattern, 0) + 1
    for pattern, n in counts.items():
        log.info("dropped %d released key(s) on purpose: %s", n, pattern)


def convert_dreamllm(src: str | Path, dst: str | Path, *, clip: str | Path | None = None,
                     diffusion: str | Path | None = None) -> Path:
    """A released DreamLLM directory -> our dream layout in ``dst`` (refused if it exists). Written to a temporary
    sibling and renamed, so ``dst`` exists only complete; nothing is left behind on failure."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists; convert into a new directory")
    release = read_release(src)
    vision_config, image_processor = clip_configs(release, clip)
    unet_cfg, vae_cfg, scheduler_cfg = diffusion_configs(release, diffusion)
    check_rotary(release)
    parts, origin = map_release(release.states)
    tmp = dst.with_name(f".{dst.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        cross = _write_decoder(parts, origin, unet_cfg, vae_cfg, scheduler_cfg, tmp / DECODER_DIR)
        hidden = _write_lmm(release, parts, origin, vision_config, image_processor, tmp / LMM_DIR)
        _write_head(release, parts, origin, hidden, cross, tmp / HEAD_DIR)
        load_head(tmp / HEAD_DIR)  # the backend reads what we wrote
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log_dropped(release)
    tmp.rename(dst)
    return dst


# ------------------------------------------------------------------------------------------ tiny release
TINY_CLIP_DIR, TINY_SD_DIR = "tiny_clip_vision", "tiny_stable_diffusion"
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, use_linear_projection=True)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=[32, 32, 32],
                down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                norm_num_groups=32, sample_size=32)
TINY_QUERIES, TINY_HIDDEN = 8, 64
TINY_LLAMA = dict(hidden_size=TINY_HIDDEN, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)


@dataclass(frozen=True)
class ReleaseSizes:
    """What :func:`build_tiny_dreamllm_released` builds: the tiny sizes by default; bench/dreamllm_real_width.py
    passes DreamLLM-7B's widths. ``llama`` holds LlamaConfig fields; ``vocab_size`` 0 is the tokenizer's size."""
    llama: dict = field(default_factory=lambda: dict(TINY_LLAMA))
    clip: dict = field(default_factory=lambda: dict(TINY_CLIP))
    unet: dict = field(default_factory=lambda: dict(TINY_UNET))
    vae: dict = field(default_factory=lambda: dict(TINY_VAE))
    queries: int = TINY_QUERIES
    vocab_size: int = 0


def tiny_release_tokenizer():
    """The offline byte-level tokenizer with the release's additions: [PAD], then the seven special tokens."""
    from silmm.backends.common import build_tiny_tokenizer

    tok = build_tiny_tokenizer(vocab_size=512)
    tok.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": [*IMAGE_TOKENS, *DREAM_TOKENS]})
    return tok


def _plugin_kwargs(clip_path: str, sd_path: str, hidden: int, queries: int) -> dict:
    """As the release's LazyCall config serialises them (class entry and training flags included)."""
    prefix = "omni.models.dreamllm.modeling_plugins."
    return {
        DREAM: {"_target_": prefix + "DreamEmbedding", "pretrained_model_name_or_path": None,
                "num_dream_queries": queries, "embed_hidden_size": hidden, "freeze_dream_queries": False},
        CLIP: {"_target_": prefix + "CLIPVisionEmbedding", "projector_type": "linear", "projector_depth": 1,
               "clip_vision_model_name_or_path": clip_path, "pretrained_model_name_or_path": None,
               "embed_hidden_size": hidden, "use_additional_post_layernorm": False, "select_layer": -2,
               "freeze_clip_vision_model": True, "freeze_embedding_layers": True, "freeze_projector": False,
               "local_files_only": True},
        SD: {"_target_": prefix + "StableDiffusionHead", "projector_type": "linear", "projector_depth": 1,
             "diffusion_name_or_path": sd_path, "pretrained_model_name_or_path": None, "embed_hidden_size": hidden,
             "freeze_vae": True, "freeze_unet": True, "freeze_projector": False, "local_files_only": True},
    }


def _write_main_shards(state: dict[str, torch.Tensor], out: Path, layers: int) -> None:
    """Two safetensors shards + index, split after the first half of the layers (as a sharded release)."""
    first = {k: v for k, v in state.items() if k == "model.embed_tokens.weight" or
             (k.startswith("model.layers.") and int(k.split(".")[2]) < layers // 2)}
    shards = [first, {k: v for k, v in state.items() if k not in first}]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def build_tiny_dreamllm_released(out_dir: str | Path, seed: int = 0, sizes: ReleaseSizes | None = None) -> Path:
    """A tiny random DreamLLM in the released layout (module docstring), deterministic from ``seed``; written to a
    temporary sibling and renamed. The global RNG is left as it was. ``sizes``: see :class:`ReleaseSizes`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; build into a new directory")
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = tiny_release_tokenizer()
    sizes = sizes or ReleaseSizes()
    clip_cfg, hidden, layers = sizes.clip, sizes.llama["hidden_size"], sizes.llama["num_hidden_layers"]
    llama = LlamaConfig(vocab_size=sizes.vocab_size or len(tok), **sizes.llama, rope_theta=10000.0,
                        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = LlamaForCausalLM(llama)
        clip = CLIPVisionModel(CLIPVisionConfig(**clip_cfg))
        unet, vae = UNet2DConditionModel.from_config(sizes.unet), AutoencoderKL.from_config(sizes.vae)
        queries = 0.1 * torch.randn(1, sizes.queries, hidden)
        clip_proj_w, clip_proj_b = 0.1 * torch.randn(hidden, clip_cfg["hidden_size"]), 0.1 * torch.randn(hidden)
        sd_proj_w = 0.1 * torch.randn(sizes.unet["cross_attention_dim"], hidden)
    # the main weights, with the persistent RoPE buffers an older transformers wrote
    main = {k: v for k, v in llm.state_dict().items() if "rotary_emb" not in k}
    head_dim = hidden // llama.num_attention_heads
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    main.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(layers)})
    _write_main_shards(main, tmp, layers)
    tok.save_pretrained(str(tmp))
    # the plugins: CLIP keys as transformers 4.x named them (vision_model.*, with the position_ids buffer)
    clip_state = {f"clip_vision_model.vision_model.{k}": v for k, v in clip.state_dict().items()}
    clip_state["clip_vision_model.vision_model.embeddings.position_ids"] = torch.arange(
        (clip_cfg["image_size"] // clip_cfg["patch_size"]) ** 2 + 1)[None]
    torch.save({**clip_state, "projector.projector.weight": clip_proj_w, "projector.projector.bias": clip_proj_b},
               tmp / f"{CLIP}.bin")
    torch.save({**{f"unet.{k}": v for k, v in unet.state_dict().items()},
                **{f"vae.{k}": v for k, v in vae.state_dict().items()}, "projector.projector.weight": sd_proj_w},
               tmp / f"{SD}.bin")
    torch.save({"dream_queries": queries}, tmp / f"{DREAM}.bin")
    # the configs the plugins name, as local directories inside the release
    CLIPVisionConfig(**clip_cfg).save_pretrained(str(tmp / TINY_CLIP_DIR))
    size = clip_cfg["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(tmp / TINY_CLIP_DIR))
    for sub, cfg in (("unet", dict(sizes.unet, _class_name="UNet2DConditionModel")),
                     ("vae", dict(sizes.vae, _class_name="AutoencoderKL"))):
        (tmp / TINY_SD_DIR / sub).mkdir(parents=True)
        (tmp / TINY_SD_DIR / sub / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / TINY_SD_DIR / "scheduler").mkdir()
    (tmp / TINY_SD_DIR / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(BUILTIN_SCHEDULER[SD21_BASE], indent=2) + "\n")
    added = {t: tok.convert_tokens_to_ids(t) for t in (*IMAGE_TOKENS, *DREAM_TOKENS)}
    config = {"architectures": ["DreamLLMForCausalMLM"], "model_type": "dreamllm", "torch_dtype": "float32",
              **{k: getattr(llama, k) for k in LLAMA_FIELDS if k != "rope_theta"}, "rope_theta": 10000.0,
              "rope_scaling": None, "pretraining_tp": 1, "tie_word_embeddings": False, "use_cache": True,
              "pad_token_id": tok.pad_token_id,
              "special_tokens2ids_dict": {"additional_special_tokens": added, "<s>": tok.bos_token_id,
                                          "</s>": tok.eos_token_id, "<unk>": tok.unk_token_id, PAD_TOKEN: tok.pad_token_id},
              "plugins_init_kwargs": _plugin_kwargs(TINY_CLIP_DIR, TINY_SD_DIR, hidden, sizes.queries),
              "plugins_type": dict(PLUGIN_TYPES), "loss_weight_lm": 1.0, "loss_weight_vm": 10.0,
              "loss_scale_schedule": "none"}
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    tmp.rename(out)
    return out


def build_tiny_dreamllm(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random DreamLLM in our dream layout: built in the released layout, then converted."""
    with tempfile.TemporaryDirectory() as tmp:
        return convert_dreamllm(build_tiny_dreamllm_released(Path(tmp) / "released", seed=seed), out_dir)
