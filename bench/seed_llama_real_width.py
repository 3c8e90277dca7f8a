"""SEED-LLaMA at its released widths on the CPU (random weights, reduced LLM depth): load, sample, decode, yes/no
and DPO log-probs through the backend's real ``load()`` path. Not a test (a few minutes, ~10 GB of RAM): a smoke
of the real shapes that the tiny model cannot exercise (issue #18).

    .venv/bin/python bench/seed_llama_real_width.py [--layers 2] [--samples 10] [--steps 4] [--resolution 256]
                                                    [--questions 4] [--out DIR] [--keep]

What is built (in our layout: llm/, tokenizer/, decoder/), float32, random weights:
  llm/        LlamaForCausalLM at SEED-LLaMA 8B's widths (Vicuna-7B: hidden 4096, MLP 11008, 32 heads, untied head,
              vocabulary 32,000 + 8,192 image tokens + <img>, </img> = 40,194 rows) with --layers decoder layers
              (the release has 32). Its text tokenizer is our small byte-level one plus the release's image tokens,
              so the image tokens' ids start at 512 instead of 32,000 (rows 8,706 to 40,193 have no token string;
              every cost is that of the 40,194-row model).
  tokenizer/  the SEED image tokenizer at the released sizes (SeedTokenizerConfig defaults: EVA ViT-g/14 at 224 px,
              39 blocks of width 1408, MLP 6144, 16 heads; causal Q-Former 768 wide, 12 layers, 32 queries; codebook
              8192 x 32; 4 code->embedding blocks; 1024-d unCLIP embedding): random weights drawn in the RELEASED
              layout and mapped by the converter's key table (convert_state_dict), so the map runs at real shapes.
  decoder/    a REDUCED Stable unCLIP 2.1 pipeline: the VAE at its real widths (128, 256, 512, 512; 2 layers per
              block); a UNet with SD 2.1's first three levels only (320, 640, 1280; the real one has a fourth
              1280 level), 1 ResNet/transformer layer per block instead of 2, cross-attention in the first two
              levels, SD's 64-wide heads, cross-attention width 1024, class projection 2048 as unCLIP's; a CLIP text
              encoder at the real width 1024 with 2 layers (23 in OpenCLIP-H) over a byte-level tokenizer; a tiny
              image encoder (unused when image embeddings are given, as the backend always gives them).
              Images at --resolution px (768 in the release) and --steps denoising steps (20 in the release):
              the UNet at 768 px x 20 steps takes many minutes per image on 2 cores.

Measured (seconds; RSS high-water mark from resource.getrusage, cumulative; the build runs in a child process,
so the mark is the load and the work only): (a) load() and a page-in of every weight (the loaders map the
safetensors files lazily, so without it the first forward pays for the reads; the files are in the page cache,
just written), (b) --samples samples for one prompt (32 codes each, one batch), (c) decode of one image, (d)
yes/no for --questions questions about one image (SEED-encoded once, prefix KV reused; the encode is timed
apart), (e) DPO sequence_logprobs for a (chosen, rejected) pair: without grad (the stored reference values)
and with LoRA r 32 forward + backward (the policy side of one DPO step).

Extrapolations, printed as ESTIMATES, not measurements:
  32L CPU  the LLM parts times 32 / --layers (the image tokenizer is already at full depth); decode times the
           ratio of FLOP counts (meta device) of the real unCLIP (full UNet, 768 px, 20 steps, VAE) to the built
           one at the run's size; load times the parameter ratio of the full model to the built one.
  H200     a roofline over the full-depth model in bf16 with ASSUMED efficiencies (H200_* in bench/_real_width.py):
           max(FLOPs / (989 TFLOP/s x 0.35), weight bytes read / (4.8 TB/s x 0.6)); LLM FLOPs are 2 x layer
           parameters x tokens forward, 4 x for LoRA forward + backward (no weight gradients for the frozen
           weights); ViT-g / Q-Former / UNet / VAE FLOPs counted with torch's FlopCounterMode on meta tensors.

Defaults run in about 1.5 minutes on 2 shared cores with a 9.3 GiB peak (the build child 4.7 GiB; 8.5 GiB on
disk under /tmp, deleted unless --keep).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _real_width import (  # noqa: E402  (bench/ is on sys.path when this file runs as a script)
    Row,
    Timed,
    child_peak_gib,
    h200_assumption,
    h200_seconds,
    loadavg,
    meta_flops,
    peak_gib,
    print_table,
    vae_decode_flops,
)

from silmm.plan import page_in  # noqa: E402

CONFIG = ROOT / "configs" / "seed_llama_8b_slurm.yaml"
RELEASE_LAYERS, RELEASE_STEPS, RELEASE_RESOLUTION = 32, 20, 768
WORDS, CODES = 32000, 8192
PROMPT = "a red apple and a blue cup on a wooden table"
QUESTIONS = ["Is there an apple?", "Is the apple red?", "Is there a cup?", "Is the cup blue?",
             "Is there a table?", "Is the table wooden?", "Is the apple on the table?", "Is the cup on the table?"]
# Stable Diffusion 2.1 unCLIP (stabilityai/stable-diffusion-2-1-unclip): the real UNet and VAE
REAL_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, class_embed_type="projection",
                 projection_class_embeddings_input_dim=2048)
REDUCED_UNET = REAL_UNET | dict(block_out_channels=(320, 640, 1280), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
                                attention_head_dim=(5, 10, 20))
REAL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


# ------------------------------------------------------------------------------------------ build
def build_image_tokenizer(out: Path, seed: int) -> None:
    """Released-size random weights in the release's key layout, mapped by the converter's table."""
    from silmm.backends.seed_tokenizer import (
        SeedImageTokenizer,
        SeedTokenizerConfig,
        convert_state_dict,
        random_released_state,
    )

    cfg = SeedTokenizerConfig()
    ours = convert_state_dict(random_released_state(cfg, seed), "random released-layout state")[0]
    with torch.device("meta"):
        model = SeedImageTokenizer(cfg)
    model.load_state_dict(ours, strict=True, assign=True)
    del ours
    model.save_pretrained(out)


def build_llm(out: Path, layers: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from silmm.backends.seed_llama import build_tiny_text_tokenizer

    tok = build_tiny_text_tokenizer(CODES)
    vocab = WORDS + CODES + 2
    if len(tok) > vocab:
        raise RuntimeError(f"the text tokenizer has {len(tok)} tokens, more than SEED-LLaMA's {vocab}")
    config = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(str(out))


def build_decoder(out: Path, resolution: int, seed: int) -> None:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from silmm.backends.seed_llama import _tiny_clip_tokenizer  # byte-level CLIP tokenizer, 514 tokens

    torch.manual_seed(seed)
    vae = AutoencoderKL(**REAL_VAE, sample_size=resolution)
    unet = UNet2DConditionModel(**REDUCED_UNET, sample_size=resolution // 8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                                        num_attention_heads=16, hidden_act="gelu", max_position_embeddings=77,
                                        bos_token_id=512, eos_token_id=513))
    image = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, image_size=32, patch_size=8,
                                                           projection_dim=1024))
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}), image_encoder=image,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=1024),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=_tiny_clip_tokenizer(),
        text_encoder=text, unet=unet, vae=vae,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                                clip_sample=False))
    pipe.save_pretrained(str(out))


def build(out: Path, layers: int, resolution: int, seed: int) -> None:
    """Runs in a child process: its memory does not count in the parent's high-water mark."""
    torch.set_num_threads(os.cpu_count() or 1)
    from silmm.backends.seed_llama import DECODER_DIR, LLM_DIR, TOKENIZER_DIR

    build_image_tokenizer(out / TOKENIZER_DIR, seed)
    build_llm(out / LLM_DIR, layers, seed)
    build_decoder(out / DECODER_DIR, resolution, seed)


# ------------------------------------------------------------------------------------------ FLOP counts


def unet_step_flops(config: dict, latent: int) -> tuple[float, int]:
    """(FLOPs of one guided UNet step: batch 2, 77 text tokens; parameter count), on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config, sample_size=latent).requires_grad_(False)

        def z(*shape):
            return torch.zeros(*shape)

        flops = meta_flops(lambda: unet(z(2, 4, latent, latent), torch.full((2,), 10),
                                        encoder_hidden_states=z(2, 77, 1024), class_labels=z(2, 2048)))
    return flops, sum(p.numel() for p in unet.parameters())


def seed_encode_flops() -> float:
    """ViT-g + causal Q-Former for one 224 px image at the released sizes."""
    from silmm.backends.seed_tokenizer import SeedImageTokenizer, SeedTokenizerConfig

    with torch.device("meta"):
        model = SeedImageTokenizer(SeedTokenizerConfig()).requires_grad_(False)
        return meta_flops(lambda: model.query_features(torch.zeros(1, 3, 224, 224)))


# ------------------------------------------------------------------------------------------ report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2, help="LLM decoder layers built (the release has 32)")
    p.add_argument("--samples", type=int, default=10, help="samples for one prompt, one batch (paper: 10)")
    p.add_argument("--steps", type=int, default=4, help=f"unCLIP denoising steps (release: {RELEASE_STEPS})")
    p.add_argument("--resolution", type=int, default=256,
                   help=f"decoded image side, px (release: {RELEASE_RESOLUTION})")
    p.add_argument("--questions", type=int, default=4,
                   help=f"yes/no questions about one image (at most {len(QUESTIONS)})")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=None, help="checkpoint directory (default: a new one under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (deleted by default)")
    args = p.parse_args()
    if not 1 <= args.questions <= len(QUESTIONS):
        p.error(f"--questions must be in 1..{len(QUESTIONS)}")
    if args.resolution % 32:
        p.error("--resolution must be a multiple of 32 (the VAE's factor 8 x the UNet's two downsamplings)")
    torch.set_num_threads(args.threads)
    print(f"loadavg at start: {loadavg()} ({os.cpu_count()} CPUs, {args.threads} threads)")
    if args.out is not None and args.out.exists():
        p.error(f"{args.out} exists; pass a new directory")
    ckpt = args.out or Path(tempfile.mkdtemp(prefix="silmm_seed_llama_rw_", dir="/tmp")) / "ckpt"
    try:
        run(args, ckpt)
    finally:
        if not args.keep:
            shutil.rmtree(ckpt.parent if args.out is None else ckpt, ignore_errors=True)
        else:
            print(f"checkpoint kept at {ckpt}")
    print(f"loadavg at end: {loadavg()}")


@dataclass
class LlmSizes:
    """What the full-depth estimates need from the built LLM."""

    layer_params: int  # one decoder layer
    hidden: int
    vocab: int
    prompt_tokens: int  # <s>USER: {prompt}\nASSISTANT:<img>

    def forward_flops(self, tokens: int) -> float:
        """2 x parameters x tokens over the full-depth decoder layers (attention is small at these lengths)."""
        return 2.0 * RELEASE_LAYERS * self.layer_params * tokens

    @property
    def step_bytes(self) -> float:
        """bf16 weights read by one full-depth token step: every layer and the head's image-token rows."""
        return 2.0 * (RELEASE_LAYERS * self.layer_params + CODES * self.hidden)


def phase_load(cfg) -> tuple[Row, object]:
    from silmm.backends.seed_llama import SeedLlamaBackend

    t0 = time.perf_counter()
    backend = SeedLlamaBackend.load(cfg.model, cfg.sampling)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    page_in(backend)  # silmm.plan's: what calibration reads too
    t_page = time.perf_counter() - t0
    modules = [backend.model, backend.image_tokenizer, *backend.decoder.components.values()]  # counted
    built = sum(q.numel() for m in modules if isinstance(m, torch.nn.Module) for q in m.parameters())
    layer = sum(q.numel() for q in backend.model.model.layers[0].parameters())
    full = built + (RELEASE_LAYERS - len(backend.model.model.layers)) * layer + real_unclip_extra_params(backend)
    total = t_load + t_page
    print(f"parameters: built {built / 1e9:.2f} B, full model {full / 1e9:.2f} B "
          f"({2 * full / 2**30:.1f} GiB in bf16)")
    return Row(f"(a) load {t_load:.1f} + page-in {t_page:.1f}", total, "model", total, peak_gib(),
               total * full / built, None), backend


def real_unclip_extra_params(backend) -> int:
    """Parameters the real unCLIP pipeline has beyond the built one (UNet, text and image encoders)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                            num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77))
        image = CLIPVisionModelWithProjection(CLIPVisionConfig(  # OpenCLIP ViT-H/14
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
            patch_size=14, projection_dim=1024))
    real = unet_step_flops(REAL_UNET, 8)[1] + sum(q.numel() for m in (text, image) for q in m.parameters())
    pipe = backend.decoder
    return real - sum(q.numel() for m in (pipe.unet, pipe.text_encoder, pipe.image_encoder) for q in m.parameters())


def phase_sample(backend, n: int, scale: float, sizes: LlmSizes) -> tuple[Row, torch.Tensor]:
    t0 = time.perf_counter()
    codes = backend.sample([PROMPT] * n, list(range(n)))
    seconds = time.perf_counter() - t0
    if codes.shape != (n, 32) or int(codes.min()) < 0 or int(codes.max()) >= CODES:
        raise RuntimeError(f"sample returned codes {list(codes.shape)} outside [0, {CODES})")
    tokens = sizes.prompt_tokens + 31  # the prefill, then 31 cached steps
    gpu = h200_seconds(sizes.forward_flops(n * tokens), 32 * sizes.step_bytes) / n
    return Row(f"(b) sample {n} x 32 codes", seconds, "sample", seconds / n, peak_gib(), seconds * scale / n,
               gpu), codes


def phase_decode(backend, codes: torch.Tensor, steps: int, resolution: int):
    t0 = time.perf_counter()
    images = backend.decode(codes[:1], [0])
    seconds = time.perf_counter() - t0
    if images.shape != (1, resolution, resolution, 3):
        raise RuntimeError(f"decode returned {list(images.shape)}, expected [1, {resolution}, {resolution}, 3]")
    built = steps * unet_step_flops(REDUCED_UNET, resolution // 8)[0] + vae_decode_flops(REAL_VAE, resolution)
    real = (RELEASE_STEPS * unet_step_flops(REAL_UNET, RELEASE_RESOLUTION // 8)[0]
            + vae_decode_flops(REAL_VAE, RELEASE_RESOLUTION))
    print(f"decode FLOPs per image: built {built / 1e12:.2f} T ({steps} steps, {resolution} px), real "
          f"{real / 1e12:.1f} T ({RELEASE_STEPS} steps, {RELEASE_RESOLUTION} px, x{real / built:.0f}); "
          f"this CPU reached {built / seconds / 1e9:.0f} GFLOP/s")
    return Row(f"(c) decode {resolution}px {steps} steps", seconds, "image", seconds, peak_gib(),
               seconds * real / built, h200_seconds(real, 0.0)), images


def phase_yes_no(backend, images, k: int, scale: float, sizes: LlmSizes) -> Row:
    """SEED-encode once + k questions on the prefix cache; the encode is timed apart (no LLM part to scale)."""
    encode = Timed(backend.encode_images)
    backend.encode_images = encode  # instance attribute: yes_no calls self.encode_images
    try:
        t0 = time.perf_counter()
        p_yes, p_no = backend.yes_no(images, [QUESTIONS[:k]])[0]
        seconds = time.perf_counter() - t0
    finally:
        del backend.encode_images
    if len(p_yes) != k or not all(0 <= y + n <= 1 + 1e-5 for y, n in zip(p_yes, p_no, strict=True)):
        raise RuntimeError(f"yes_no returned {p_yes}, {p_no}")
    print("yes/no p(yes)/p(no) (random weights): " + ", ".join(f"{y:.1e}/{n:.1e}" for y, n in zip(p_yes, p_no,
                                                                                                strict=True)))
    prefix, _, suffixes = backend.question_rows(QUESTIONS[:k])
    tokens = len(prefix) + sum(len(s) for s in suffixes)
    flops = seed_encode_flops() + sizes.forward_flops(tokens) + 2.0 * k * sizes.vocab * sizes.hidden
    vit_bytes = 2.0 * sum(q.numel() for q in backend.image_tokenizer.vision.parameters())
    full = encode.seconds + (seconds - encode.seconds) * scale
    return Row(f"(d) yes/no {k} q (encode {encode.seconds:.1f} s)", seconds, "image", seconds, peak_gib(), full,
               h200_seconds(flops, vit_bytes + 2 * sizes.step_bytes))


def phase_dpo(backend, cfg, codes: torch.Tensor, scale: float, sizes: LlmSizes) -> list[Row]:
    """The stored reference log-probs of a (chosen, rejected) pair, then the policy's LoRA forward + backward."""
    from silmm.losses import dpo_loss

    pair, prompts = codes[:2], [PROMPT] * 2
    flops = sizes.forward_flops(2 * (sizes.prompt_tokens + 31))
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = backend.sequence_logprobs(prompts, pair)
    t_ref = time.perf_counter() - t0
    backend.add_lora(cfg.train.lora)
    backend.train(True)
    t0 = time.perf_counter()
    logps = backend.sequence_logprobs(prompts, pair)
    dpo_loss(logps[:1], logps[1:], ref[:1], ref[1:], beta=cfg.train.beta).losses.sum().backward()
    t_dpo = time.perf_counter() - t0
    if any(q.grad is None for q in backend.trainable_parameters()):
        raise RuntimeError("a LoRA parameter got no gradient")
    return [Row("(e) ref logprobs, pair, no grad", t_ref, "pair", t_ref, peak_gib(), t_ref * scale,
                h200_seconds(flops, 0.0)),
            Row(f"(e) DPO fwd+bwd, LoRA r{cfg.train.lora.r}", t_dpo, "pair", t_dpo, peak_gib(), t_dpo * scale,
                h200_seconds(2 * flops, 0.0))]


def run(args: argparse.Namespace, ckpt: Path) -> None:
    from silmm import config as silmm_config

    t0 = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=build, args=(ckpt, args.layers, args.resolution, 0))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"building the checkpoint failed (exit code {child.exitcode})")
    disk = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**30
    print(f"build (child process): {time.perf_counter() - t0:.1f} s, peak RSS {child_peak_gib():.2f} GiB, "
          f"{disk:.2f} GiB at {ckpt}")

    cfg = silmm_config.load(CONFIG, overrides=[f"model.path={ckpt}", "model.dtype=float32", "model.device=cpu",
                                               f"sampling.decoder_steps={args.steps}"])
    scale = RELEASE_LAYERS / args.layers
    load_row, backend = phase_load(cfg)
    llm = backend.model.config
    sizes = LlmSizes(sum(q.numel() for q in backend.model.model.layers[0].parameters()), llm.hidden_size,
                     llm.vocab_size, len(backend.generation_row(PROMPT)))
    sample_row, codes = phase_sample(backend, args.samples, scale, sizes)
    decode_row, images = phase_decode(backend, codes, args.steps, args.resolution)
    rows = [load_row, sample_row, decode_row, phase_yes_no(backend, images, args.questions, scale, sizes),
            *phase_dpo(backend, cfg, codes, scale, sizes)]

    print(f"\nSEED-LLaMA at real widths, {args.layers} of {RELEASE_LAYERS} LLM layers, random weights, float32 on "
          f"CPU, {args.threads} threads; settings from {CONFIG.relative_to(ROOT)} (top-p {cfg.sampling.top_p}, "
          f"unCLIP guidance {cfg.sampling.decoder_guidance_scale}, DPO beta {cfg.train.beta})")
    print_table(rows, width=34)
    print(f"\n'32L CPU est': an ESTIMATE, seconds per unit. LLM parts x {RELEASE_LAYERS}/{args.layers} (embedding and "
          f"head do not grow: a slight over-count); yes/no keeps its measured encode; decode x the FLOP ratio of the "
          f"real unCLIP ({RELEASE_STEPS} steps, {RELEASE_RESOLUTION} px, full UNet); load x the parameter ratio "
          f"(the checkpoint is read from the page cache: it was just written).")
    print(f"'H200 est': an ASSUMPTION, not a measurement, seconds per unit at full depth in bf16: "
          f"{h200_assumption()}. Sampling is bandwidth-bound "
          f"({sizes.step_bytes / 2**30:.1f} GiB per token step, shared by the batch of {args.samples}); decode and "
          f"DPO count compute only (a training batch shares the weight reads).")


if __name__ == "__main__":
    main()
