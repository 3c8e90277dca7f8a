"""DreamLLM at its released widths on the CPU (random weights, reduced LLM depth and UNet): the release written in
DreamLLM's own layout, converted by ``convert_dreamllm``, then load, DropDiv samples, decode, yes/no and the KC-DPO
policy step through the dream backend's real ``load()`` path. Not a test (a few minutes, ~10 GB of RAM): a smoke of
the real shapes that the tiny model cannot exercise (issue #19).

    .venv/bin/python bench/dreamllm_real_width.py [--layers 2] [--samples 10] [--steps 4] [--resolution 256]
                                                  [--questions 4] [--out DIR] [--keep]

What is built (build_tiny_dreamllm_released with ReleaseSizes; float32, random weights), in the RELEASED layout
(config.json, two safetensors shards of the LLM, dream_embedding.bin, clip_vision_embedding.bin,
stable_diffusion_head.bin, the CLIP and SD configs as local folders):
  LLM      LLaMA at Vicuna-7B's widths (hidden 4096, MLP 11008, 32 heads, untied head, 2048 positions) with
           --layers decoder layers (the release has 32); vocabulary 32,000 + [PAD] + the 7 added tokens = 32,008
           rows. The tokenizer is our small byte-level one with the release's additions (ids 512..519 instead of
           32,000..32,007; rows past 519 have no token string; every cost is that of the 32,008-row model). Being
           byte-level it cuts text into more tokens than Vicuna's SentencePiece: the token counts are printed.
  queries  the real 64 dream queries [64, 4096]; the projector into the UNet [1024, 4096], no bias.
  CLIP     ViT-L/14 at its real size (224 px, 24 layers, hidden 1024, MLP 4096, 16 heads) + the image projector
           [4096, 1024] with bias.
  VAE      SD 2.x's autoencoder at its real widths (128, 256, 512, 512; 2 layers per block).
  UNet     a REDUCED Stable Diffusion 2.1-base UNet: its first three levels only (320, 640, 1280, all three with
           cross-attention as in the release; the real one has a fourth, 1280-wide level without it), 1 ResNet /
           transformer layer per block instead of 2, SD's 64-wide heads, linear projections, cross-attention width
           1024 (real). DDPM scheduler from SD 2.1-base's config, as the release builds it. Images at --resolution
           px (512 in the release) and --steps denoising steps (the config: 50; the release's CLI: 100).

Measured (seconds; RSS high-water marks from resource.getrusage): the build and the conversion each run in a child
process that reports its own mark, so the parent's mark is the load and the work only. (0) convert_dreamllm on the
release (what a user runs once on the 7B release), (a) DreamBackend.load with configs/dreamllm_7b_slurm.yaml's
settings and a page-in of every weight (the loaders map the safetensors files lazily, so without it the first
forward pays for the reads; the files are in the page cache, just written), (b) --samples DropDiv samples for one
prompt (features H [64, 4096], one batch), (c) decode of one image with classifier-free guidance 7.5 (2 UNet passes
per step, plus the empty prompt's LLM forward, timed apart), (d) yes/no for --questions questions about one image
(the CLIP tower timed apart), (e) KC-DPO as silmm.trainer computes it: the reference's H_r (no grad, the
backend's reference()), then the policy forward + backward of one (chosen, rejected) pair with LoRA r 32 through
trainer.Policy, trainer.pair_loss (kcdpo_loss, gamma 3, AvgPool + cosine) and gradient checkpointing as configured.
H bytes per sample AS STORED: the samples are written as a real samples shard (store.write_shard with the
config's store options: float16, gzip level 1 + shuffle, one chunk per row) and the HDF5 storage of its
``features`` column read back.

Extrapolations, printed as ESTIMATES, not measurements:
  32L CPU  the LLM parts times 32 / --layers; decode's UNet + VAE part times the ratio of FLOP counts (meta device)
           of the real SD 2.1-base UNet at 512 px x 50 steps x 2 (CFG) + the VAE to the built one at the run's
           size; CLIP kept as measured; load and convert times the parameter ratio of the full model to the built.
  H200     a roofline over the full-depth model in bf16 with ASSUMED efficiencies (H200_* in bench/_real_width.py, as in
           bench/seed_llama_real_width.py): max(FLOPs / (989 TFLOP/s x 0.35), weight bytes read / (4.8 TB/s x 0.6));
           LLM FLOPs 2 x layer parameters x tokens forward; UNet / VAE / CLIP FLOPs counted with torch's
           FlopCounterMode on meta tensors.

Defaults run in about 2 minutes on 2 shared cores with a 6.5 GiB peak in this process (the build and convert
children ~6 GiB each, one after the other; 11 GiB on disk under /tmp, deleted unless --keep).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _real_width import (  # noqa: E402  (bench/ is on sys.path when this file runs as a script)
    Row,
    Timed,
    h200_assumption,
    h200_seconds,
    loadavg,
    meta_flops,
    peak_gib,
    print_table,
    vae_decode_flops,
)

from silmm.plan import page_in  # noqa: E402

CONFIG = ROOT / "configs" / "dreamllm_7b_slurm.yaml"
RELEASE_LAYERS, RELEASE_RESOLUTION = 32, 512
WORDS, ADDED = 32000, 8  # Vicuna's vocabulary; [PAD] + <image> <im_patch> <im_start> <im_end> <dream> ...
PROMPT = "a red apple and a blue cup on a wooden table"
QUESTIONS = ["Is there an apple?", "Is the apple red?", "Is there a cup?", "Is the cup blue?",
             "Is there a table?", "Is the table wooden?", "Is the apple on the table?", "Is the cup on the table?"]
ITERATION_PROMPTS = 16000  # the paper's prompts per iteration (configs/dreamllm_7b_slurm.yaml: prompts.count)


def real_unet() -> dict:
    from silmm.backends.dreamllm import BUILTIN_UNET, SD21_BASE

    return dict(BUILTIN_UNET[SD21_BASE])


def reduced_unet(resolution: int) -> dict:
    """SD 2.1-base's first three levels, 1 layer per block (see the module docstring)."""
    return real_unet() | dict(sample_size=resolution // 8, block_out_channels=[320, 640, 1280], layers_per_block=1,
                              down_block_types=["CrossAttnDownBlock2D"] * 3, up_block_types=["CrossAttnUpBlock2D"] * 3,
                              attention_head_dim=[5, 10, 20])


def release_sizes(layers: int, resolution: int):
    from silmm.backends.dreamllm import BUILTIN_CLIP, BUILTIN_VAE, CLIP_L14, SD21_BASE, ReleaseSizes

    llama = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=2048, initializer_range=0.02)
    return ReleaseSizes(llama=llama, clip=dict(BUILTIN_CLIP[CLIP_L14]), unet=reduced_unet(resolution),
                        vae=dict(BUILTIN_VAE[SD21_BASE], sample_size=resolution), queries=64,
                        vocab_size=WORDS + ADDED)


# ------------------------------------------------------------------------------ children (build, convert)
def build_child(out: str, layers: int, resolution: int, seed: int, threads: int) -> tuple[float, float]:
    """The released layout at real widths; returns (seconds, own peak GiB)."""
    from silmm.backends.dreamllm import build_tiny_dreamllm_released

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    build_tiny_dreamllm_released(out, seed, release_sizes(layers, resolution))
    return time.perf_counter() - t0, peak_gib()


def convert_child(src: str, dst: str, threads: int) -> tuple[float, float, float]:
    """convert_dreamllm as a user runs it once; returns (seconds, own peak GiB, peak GiB before converting)."""
    torch.set_num_threads(threads)
    from silmm.backends.dreamllm import convert_dreamllm

    before = peak_gib()  # interpreter + torch + transformers/diffusers imports
    t0 = time.perf_counter()
    convert_dreamllm(src, dst)
    return time.perf_counter() - t0, peak_gib(), before


def in_child(fn: Callable, *args):
    """One fresh process per call: its memory does not count in this process's high-water mark."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ------------------------------------------------------------------------------------------ FLOP counts


def unet_step_flops(config: dict, latent: int, tokens: int) -> tuple[float, int]:
    """(FLOPs of one guided UNet step: batch 2, ``tokens`` conditioning rows of 1024; parameter count), meta."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config | dict(sample_size=latent)).requires_grad_(False)
        flops = meta_flops(lambda: unet(torch.zeros(2, 4, latent, latent), torch.full((2,), 10),
                                        encoder_hidden_states=torch.zeros(2, tokens, 1024)))
    return flops, sum(p.numel() for p in unet.parameters())


def clip_flops() -> float:
    """CLIP ViT-L/14 on one 224 px image (LLaVA runs the whole tower, then takes hidden_states[-2])."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from silmm.backends.dreamllm import BUILTIN_CLIP, CLIP_L14

    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig(**BUILTIN_CLIP[CLIP_L14])).requires_grad_(False)
        return meta_flops(lambda: model(torch.zeros(1, 3, 224, 224), output_hidden_states=True))


# ------------------------------------------------------------------------------------------ report


@dataclass
class LlmSizes:
    """What the full-depth estimates need from the built LLM."""

    layer_params: int  # one decoder layer
    hidden: int
    vocab: int

    def forward_flops(self, tokens: int) -> float:
        """2 x parameters x tokens over the full-depth decoder layers (attention is small at these lengths)."""
        return 2.0 * RELEASE_LAYERS * self.layer_params * tokens

    @property
    def layers_bytes(self) -> float:
        """bf16 weights of the full-depth decoder layers, read once per forward pass."""
        return 2.0 * RELEASE_LAYERS * self.layer_params


# ------------------------------------------------------------------------------------------ phases
def phase_load(cfg, reduced_unet_params: int) -> tuple[Row, object, float]:
    from silmm.backends.dream import DreamBackend

    t0 = time.perf_counter()
    backend = DreamBackend.load(cfg.model, cfg.sampling)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    page_in(backend)  # silmm.plan's: what calibration reads too
    t_page = time.perf_counter() - t0
    modules = [backend.base, backend.head, backend.unet, backend.vae]  # the parameters counted
    built = sum(q.numel() for m in modules for q in m.parameters())
    layers = backend.layers
    extra_layers = (RELEASE_LAYERS - len(layers)) * sum(q.numel() for q in layers[0].parameters())
    full = built + extra_layers + unet_step_flops(real_unet(), 8, 64)[1] - reduced_unet_params
    total = t_load + t_page
    print(f"parameters: built {built / 1e9:.2f} B, full DreamLLM-7B {full / 1e9:.2f} B "
          f"({2 * full / 2**30:.1f} GiB in bf16)")
    return Row(f"(a) load {t_load:.1f} + page-in {t_page:.1f}", total, "model", total, peak_gib(),
               total * full / built, None), backend, full / built


def phase_sample(backend, n: int, scale: float, sizes: LlmSizes) -> tuple[Row, torch.Tensor, int]:
    t0 = time.perf_counter()
    h = backend.sample([PROMPT] * n, list(range(n)))
    seconds = time.perf_counter() - t0
    queries, hidden = backend.head_cfg.num_queries, backend.head_cfg.hidden_size
    if h.shape != (n, queries, hidden) or not torch.isfinite(h).all():
        raise RuntimeError(f"sample returned H {list(h.shape)} (finite: {bool(torch.isfinite(h).all())}), expected "
                           f"[{n}, {queries}, {hidden}]")
    if n > 1 and torch.equal(h[0], h[1]):
        raise RuntimeError("two DropDiv samples with different seeds gave the same H")
    prompt = len(backend.tokenizer(PROMPT)["input_ids"])  # BOS + the prompt ("{prompt}" template)
    tokens = prompt + 1 + queries  # + <dream_start> + the queries: ONE forward, no token-by-token decoding
    print(f"sample: {tokens} LLM positions per sample ({prompt} prompt tokens with BOS from our byte-level "
          f"tokenizer, <dream_start>, {queries} queries)")
    gpu = h200_seconds(sizes.forward_flops(n * tokens), sizes.layers_bytes) / n
    return Row(f"(b) sample {n} x H[{queries}, {hidden}] DropDiv", seconds, "sample", seconds / n, peak_gib(),
               seconds * scale / n, gpu), h, tokens


def phase_decode(backend, h: torch.Tensor, steps: int, real_steps: int, resolution: int, scale: float,
                 sizes: LlmSizes):
    llm = Timed(backend._dream_forward)
    backend._dream_forward = llm  # instance attribute: decode's empty-prompt forward goes through it
    try:
        t0 = time.perf_counter()
        images = backend.decode(h[:1], [0])
        seconds = time.perf_counter() - t0
    finally:
        del backend._dream_forward
    if images.shape != (1, resolution, resolution, 3):
        raise RuntimeError(f"decode returned {list(images.shape)}, expected [1, {resolution}, {resolution}, 3]")
    from silmm.backends.dreamllm import BUILTIN_VAE, SD21_BASE

    queries = backend.head_cfg.num_queries
    built = steps * unet_step_flops(reduced_unet(resolution), resolution // 8, queries)[0] \
        + vae_decode_flops(BUILTIN_VAE[SD21_BASE], resolution)
    real = real_steps * unet_step_flops(real_unet(), RELEASE_RESOLUTION // 8, queries)[0] \
        + vae_decode_flops(BUILTIN_VAE[SD21_BASE], RELEASE_RESOLUTION)
    rest = seconds - llm.seconds
    print(f"decode: DDPM, guidance {backend.sampling.decoder_guidance_scale} (2 UNet passes per step); UNet+VAE "
          f"FLOPs per image: built {built / 1e12:.2f} T ({steps} steps, {resolution} px), real {real / 1e12:.1f} T "
          f"({real_steps} steps, {RELEASE_RESOLUTION} px, x{real / built:.0f}); this CPU reached "
          f"{built / rest / 1e9:.0f} GFLOP/s; the empty prompt's LLM forward {llm.seconds:.2f} s")
    empty_tokens = 1 + 1 + queries  # BOS, <dream_start>, the queries
    flops = real + sizes.forward_flops(empty_tokens)
    return Row(f"(c) decode {resolution}px {steps} steps CFG", seconds, "image", seconds, peak_gib(),
               rest * real / built + llm.seconds * scale, h200_seconds(flops, 0.0)), images


def phase_yes_no(backend, images: np.ndarray, k: int, scale: float, sizes: LlmSizes) -> Row:
    """One image's prefix (system prompt, CLIP's 256 patches) encoded once, then k questions on its cache."""
    tower, marks = backend.base.model.vision_tower, []  # perf_counter at the tower's start and end
    handles = [tower.register_forward_pre_hook(lambda *_: marks.append(time.perf_counter())),
               tower.register_forward_hook(lambda *_: marks.append(time.perf_counter()))]
    try:
        t0 = time.perf_counter()
        p_yes, p_no = backend.yes_no(images, [QUESTIONS[:k]])[0]
        seconds = time.perf_counter() - t0
    finally:
        for handle in handles:
            handle.remove()
    clip_seconds = sum(marks[1::2]) - sum(marks[0::2])
    if len(p_yes) != k or not all(0 <= y + n <= 1 + 1e-5 for y, n in zip(p_yes, p_no, strict=True)):
        raise RuntimeError(f"yes_no returned {p_yes}, {p_no}")
    prefix_text, suffix = backend.question_parts()
    enc = backend.processor(text=[prefix_text], images=list(images[:1]), return_tensors="pt")
    prefix = enc["input_ids"].shape[1]
    suffixes = [len(backend.tokenizer(suffix.format(question=q), add_special_tokens=False)["input_ids"])
                for q in QUESTIONS[:k]]
    print(f"yes/no: prefix {prefix} tokens (our tokenizer; 256 of them CLIP patches), question suffixes "
          f"{suffixes}; p(yes)/p(no) (random weights): "
          + ", ".join(f"{y:.1e}/{n:.1e}" for y, n in zip(p_yes, p_no, strict=True)))
    flops = clip_flops() + sizes.forward_flops(prefix + sum(suffixes)) + 2.0 * k * sizes.vocab * sizes.hidden
    clip_bytes = 2.0 * sum(q.numel() for q in tower.parameters())
    full = clip_seconds + (seconds - clip_seconds) * scale
    return Row(f"(d) yes/no {k} q (CLIP {clip_seconds:.1f} s)", seconds, "image", seconds, peak_gib(), full,
               h200_seconds(flops, clip_bytes + 2 * sizes.layers_bytes))


def phase_kcdpo(backend, cfg, h: torch.Tensor, tokens: int, scale: float, sizes: LlmSizes) -> list[Row]:
    """H_r, then the policy forward + backward of one pair, through silmm.trainer's own functions."""
    from silmm.config import Loss
    from silmm.trainer import PairBatch, Policy, disable_dropout, pair_loss, reference_values

    t = cfg.train
    backend.add_lora(t.lora)
    if t.gradient_checkpointing:
        backend.enable_gradient_checkpointing()
    policy = Policy(backend)
    if not t.policy_dropout:
        disable_dropout(policy)
    batch = PairBatch(rows=np.arange(1), prompts=[PROMPT], chosen_features=h[0:1], rejected_features=h[1:2])
    t0 = time.perf_counter()
    ref = reference_values(policy, batch, "forward")
    t_ref = time.perf_counter() - t0
    policy.train()  # as jobs/train.py's engine.train(): what gradient checkpointing needs
    t0 = time.perf_counter()
    out = pair_loss(t, Loss.kcdpo, batch, policy(batch), ref)
    out.loss.backward()
    t_dpo = time.perf_counter() - t0
    # the LoRA weights and the dream queries; the head's projector is trained too but KC-DPO's H does not reach it
    learning = [(n, q) for n, q in policy.named_parameters() if "lora_" in n or n.endswith("queries")]
    missing = [n for n, q in learning if q.grad is None]
    loss = float(out.loss.detach())
    if missing or not learning or not np.isfinite(loss):
        raise RuntimeError(f"KC-DPO loss {loss}; parameters without gradient: {missing[:3]}")
    print(f"KC-DPO: loss {loss:.4f} (log 2 = 0.6931 while the policy equals the reference; gamma {t.gamma}, {t.kernel_aggregation.value} + "
          f"{t.kernel_distance.value}), {sum(q.numel() for q in backend.trainable_parameters()) / 1e6:.1f} M "
          f"trainable (LoRA r{t.lora.r} + dream head), gradient checkpointing "
          f"{'on' if t.gradient_checkpointing else 'off'}")
    flops = sizes.forward_flops(tokens)
    # forward (+ its recompute) + the backward of activations (no weight gradients for the frozen weights)
    passes = 3 if t.gradient_checkpointing else 2
    return [Row("(e) H_r (reference), no grad", t_ref, "prompt", t_ref, peak_gib(), t_ref * scale,
                h200_seconds(flops, 0.0)),
            Row(f"(e) KC-DPO fwd+bwd, LoRA r{t.lora.r}", t_dpo, "pair", t_dpo, peak_gib(), t_dpo * scale,
                h200_seconds(passes * flops, 0.0))]


def stored_h(cfg, backend, h: torch.Tensor, where: Path) -> tuple[torch.Tensor, float, float, float]:
    """A samples shard as the samples stage writes it (one prompt, its samples and H_r): (H as stored, as float32;
    bytes per sample; bytes of H_r per prompt; shard file bytes)."""
    import h5py

    from jobs.samples import stored_features
    from silmm import store

    n = len(h)
    with torch.no_grad(), backend.reference():
        ref = stored_features(backend.features([PROMPT]), cfg.store.features_dtype, [PROMPT], where)
    z = stored_features(h, cfg.store.features_dtype, [PROMPT] * n, where)
    dtype = cfg.store.features_dtype.value
    record = {"prompt_id": [0] * n, "sample_index": list(range(n)), "seed": list(range(n)), "image_png": [b""] * n,
              "features": z.astype(dtype), "ref_prompt_id": [0], "ref_features": ref.astype(dtype)}
    meta = store.ShardMeta("samples", 1, 0, 1, "bench", {"samples_per_prompt": n, "family": "continuous",
                                                         "images": "none"})
    path = store.write_shard(where, meta, record, store.StoreOptions.from_config(cfg.store))
    with h5py.File(path, "r") as f:
        per_sample = f["features"].id.get_storage_size() / n
        per_ref = f["ref_features"].id.get_storage_size()
    return torch.from_numpy(z), per_sample, per_ref, path.stat().st_size


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2, help=f"LLM decoder layers built (the release has {RELEASE_LAYERS})")
    p.add_argument("--samples", type=int, default=10, help="DropDiv samples for one prompt, one batch (config: 10)")
    p.add_argument("--steps", type=int, default=4, help="DDPM steps (config: 50)")
    p.add_argument("--resolution", type=int, default=256,
                   help=f"decoded image side, px (release: {RELEASE_RESOLUTION})")
    p.add_argument("--questions", type=int, default=4,
                   help=f"yes/no questions about one image (at most {len(QUESTIONS)})")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=None, help="working directory (default: a new one under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the release and the converted checkpoint")
    args = p.parse_args()
    if not 1 <= args.questions <= len(QUESTIONS):
        p.error(f"--questions must be in 1..{len(QUESTIONS)}")
    if args.samples < 2:
        p.error("--samples must be at least 2 (a chosen and a rejected H)")
    if args.resolution % 32:
        p.error("--resolution must be a multiple of 32 (the VAE's factor 8 x the UNet's two downsamplings)")
    if args.out is not None and args.out.exists():
        p.error(f"{args.out} exists; pass a new directory")
    torch.set_num_threads(args.threads)
    print(f"loadavg at start: {loadavg()} ({os.cpu_count()} CPUs, {args.threads} threads)")
    work = args.out or Path(tempfile.mkdtemp(prefix="silmm_dreamllm_rw_", dir="/tmp"))
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"loadavg at end: {loadavg()}")


def disk_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def run(args: argparse.Namespace, work: Path) -> None:
    from silmm import config as silmm_config

    released, ours = work / "released", work / "ours"
    seconds, peak = in_child(build_child, str(released), args.layers, args.resolution, 0, args.threads)
    print(f"build of the release (child process): {seconds:.1f} s, peak RSS {peak:.2f} GiB, "
          f"{disk_gib(released):.2f} GiB at {released}")
    t_convert, convert_peak, convert_base = in_child(convert_child, str(released), str(ours), args.threads)
    release_bytes = disk_gib(released)
    print(f"convert_dreamllm (child process): {t_convert:.1f} s, peak RSS {convert_peak:.2f} GiB "
          f"({convert_base:.2f} before converting), {release_bytes:.2f} GiB read, {disk_gib(ours):.2f} GiB written")

    overrides = [f"model.path={ours}", "model.dtype=float32", "model.device=cpu"]
    config_steps = silmm_config.load(CONFIG, overrides=overrides).sampling.decoder_steps
    cfg = silmm_config.load(CONFIG, overrides=[*overrides, f"sampling.decoder_steps={args.steps}"])
    scale = RELEASE_LAYERS / args.layers
    reduced_params = unet_step_flops(reduced_unet(args.resolution), 8, 64)[1]
    load_row, backend, param_ratio = phase_load(cfg, reduced_params)
    layer = backend.layers[0]
    text = backend.base.config.text_config
    sizes = LlmSizes(sum(q.numel() for q in layer.parameters()), text.hidden_size, text.vocab_size)
    convert_row = Row("(0) convert_dreamllm (child)", t_convert, "release", t_convert, convert_peak,
                      t_convert * param_ratio, None)
    sample_row, h, tokens = phase_sample(backend, args.samples, scale, sizes)
    # from here on H as the samples stage stores it (rounded to float16), as decode and training see it
    h, per_sample, per_ref, shard_bytes = stored_h(cfg, backend, h, work / "samples-bench.h5")
    decode_row, images = phase_decode(backend, h, args.steps, config_steps, args.resolution, scale, sizes)
    rows = [convert_row, load_row, sample_row, decode_row,
            phase_yes_no(backend, images, args.questions, scale, sizes),
            *phase_kcdpo(backend, cfg, h, tokens, scale, sizes)]

    s = cfg.sampling
    print(f"\nDreamLLM at real widths, {args.layers} of {RELEASE_LAYERS} LLM layers, reduced UNet, random weights, "
          f"float32 on CPU, {args.threads} threads; settings from {CONFIG.relative_to(ROOT)} ({s.diversity.value} "
          f"rate {s.dropdiv_rate} in the {s.dropdiv_placement.value} {s.dropdiv_layers} layers, guidance "
          f"{s.decoder_guidance_scale}, {type(backend.scheduler).__name__}, KC-DPO gamma {cfg.train.gamma})")
    print_table(rows, width=38)
    raw = sizes.hidden * backend.head_cfg.num_queries * np.dtype(cfg.store.features_dtype.value).itemsize
    n_iter = cfg.sampling.samples_per_prompt
    per_iteration = ITERATION_PROMPTS * (n_iter * per_sample + per_ref)
    print(f"\nH per sample AS STORED ({cfg.store.features_dtype.value}, {cfg.store.compression.value} level "
          f"{cfg.store.compression_level}; measured from a samples shard of this run, {shard_bytes / 2**20:.1f} MiB "
          f"for {args.samples} samples + H_r): {per_sample / 2**10:.0f} KiB (raw {raw / 2**10:.0f} KiB, "
          f"x{per_sample / raw:.3f}); H_r {per_ref / 2**10:.0f} KiB per prompt. Per iteration of "
          f"{ITERATION_PROMPTS} prompts x {n_iter} samples: {per_iteration / 1e9:.0f} GB "
          f"({per_iteration / 2**30:.0f} GiB; random weights: real H may compress differently).")
    full_release = release_bytes * param_ratio
    held = (convert_peak - convert_base) / release_bytes  # the converter's memory per released byte, measured
    print(f"'32L CPU est': an ESTIMATE, seconds per unit. LLM parts x {RELEASE_LAYERS}/{args.layers} (embedding and "
          f"head do not grow: a slight over-count); yes/no keeps its measured CLIP time; decode's UNet + VAE x the "
          f"FLOP ratio of the real SD 2.1-base UNet ({config_steps} steps, {RELEASE_RESOLUTION} px, CFG); load and "
          f"convert x the parameter ratio {param_ratio:.1f} (files in the page cache: they were just written). "
          f"The converter holds every released tensor at once (here {held:.2f} GiB per GiB of release above "
          f"the imports): at full depth ~{convert_base + held * full_release:.0f} GiB for the {full_release:.0f} "
          f"GiB release in float32, ~{convert_base + held * full_release / 2:.0f} GiB in float16/bfloat16. Token counts come from our "
          f"byte-level tokenizer (more tokens per prompt than Vicuna's), an over-count for the LLM parts.")
    print(f"'H200 est': an ASSUMPTION, not a measurement, seconds per unit at full depth in bf16: "
          f"{h200_assumption()}. Sampling is one forward of {tokens} positions per "
          f"sample ({sizes.layers_bytes / 2**30:.1f} GiB of layer weights read once per batch of {args.samples}); "
          f"decode, H_r and KC-DPO count compute only; KC-DPO counts "
          f"{'3' if cfg.train.gradient_checkpointing else '2'} forward-equivalents (forward, "
          f"{'its recompute, ' if cfg.train.gradient_checkpointing else ''}the backward of activations: no weight "
          f"gradients for the frozen weights).")


if __name__ == "__main__":
    main()
