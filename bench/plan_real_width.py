"""`silmm plan` for the paper-scale configs, calibrated on this machine with random-weight models at the REAL
widths and reduced depth (the plan's --depth-scale = real layers / built layers). Not a test: minutes, GBs.

    .venv/bin/python bench/plan_real_width.py [--which janus dream] [--layers 2] [--gpus 64] [--out /tmp/plan_rw]

janus  configs/janus_pro_7b_slurm.yaml on Janus-Pro-7B widths: Llama LM hidden 4096, MLP 11008, 32 heads, vocabulary
       102,400 (30 layers in the release), SigLIP-L/16 at 384 px (hidden 1024; 24 layers), the released VQ model
       (16,384 codes, 24 x 24 = 576 tokens per image) and a 4096-wide generation head.
dream  configs/examples/dream_7b_plan.yaml on DreamLLM-7B widths: Vicuna-7B LM (hidden 4096, MLP 11008, 32 heads,
       vocabulary 32,000; 32 layers), CLIP ViT-L/14 at 224 px (hidden 1024; 24 layers), 64 dream queries into a
       1024-wide conditioning; the diffusion decoder is a SMALL stand-in (64 px, two UNet blocks): Stable Diffusion's
       UNet at 25 steps x 30 samples does not fit this CPU's 10 minutes, so the samples and scores costs leave the
       real decoder out (pass its measured per-prompt cost with --unit-costs for a real figure).

Each plan's model bytes are those of the full-depth model (its parameters counted on the meta device, bf16),
passed with --unit-costs; the calibrated model's own bytes would undercount it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

JANUS_LAYERS, DREAM_LAYERS = 30, 32


def janus_config(layers: int):
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    from silmm.backends.common import build_tiny_tokenizer
    from silmm.backends.janus import JANUS_SPECIAL_TOKENS

    tok = build_tiny_tokenizer(None, JANUS_SPECIAL_TOKENS, chat_template=None)
    text = LlamaConfig(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = JanusVisionConfig(num_hidden_layers=min(layers, 24), projection_dim=4096)  # SigLIP-L/16, 384 px
    vq = JanusVQVAEConfig(projection_dim=4096, image_token_embed_dim=4096)  # released VQ widths, 7B's head
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tok.convert_tokens_to_ids(JANUS_SPECIAL_TOKENS["image_token"]))
    return config, tok


def build_janus(out: Path, layers: int) -> None:
    from transformers import GenerationConfig, JanusForConditionalGeneration, JanusProcessor
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    from silmm.backends.janus import JANUS_CHAT_TEMPLATE, JANUS_SPECIAL_TOKENS

    config, tok = janus_config(layers)
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        guidance_scale=5.0, temperature=1.0,
        generation_kwargs={"boi_token_id": tok.convert_tokens_to_ids(JANUS_SPECIAL_TOKENS["boi_token"])})
    model.save_pretrained(out)
    del model
    processor = JanusProcessor(image_processor=JanusImageProcessorPil(size={"height": 384, "width": 384},
                                                                      image_mean=[0.5] * 3, image_std=[0.5] * 3),
                               tokenizer=tok, chat_template=JANUS_CHAT_TEMPLATE, use_default_system_prompt=True,
                               num_image_tokens=576)
    processor.save_pretrained(out)


def dream_parts(layers: int, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=min(layers, 24),
                              num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_select_strategy="default", vision_feature_layer=-2)


def build_dream(out: Path, layers: int) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    from silmm.backends.common import build_tiny_tokenizer
    from silmm.backends.dream import DECODER_DIR, HEAD_DIR, LMM_DIR, DreamHead, DreamHeadConfig

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer(extra_special_tokens={"image_token": "<image>"}, vocab_size=512)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 224},
                                                                     crop_size={"height": 224, "width": 224}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    lmm = LlavaForConditionalGeneration(dream_parts(layers, tokenizer)).to(torch.bfloat16).eval()
    lmm.save_pretrained(str(out / LMM_DIR))
    processor.save_pretrained(str(out / LMM_DIR))
    del lmm
    # the stand-in decoder: 64 px, two UNet blocks, but the real 1024-wide conditioning (SD 2.1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(32, 32, 32), norm_num_groups=32, sample_size=64)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
                                attention_head_dim=8, norm_num_groups=32)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
    unet.save_pretrained(str(out / DECODER_DIR / "unet"), safe_serialization=True)
    vae.save_pretrained(str(out / DECODER_DIR / "vae"), safe_serialization=True)
    scheduler.save_pretrained(str(out / DECODER_DIR / "scheduler"))
    head_cfg = DreamHeadConfig(num_queries=64, hidden_size=4096, cross_attention_dim=1024)
    head = DreamHead(head_cfg)
    torch.nn.init.normal_(head.queries, std=0.02)
    head.save(out / HEAD_DIR, head_cfg)


def full_model_bytes(which: str) -> int:
    """bf16 bytes of the full-depth model (parameters counted on the meta device; the stand-in decoder's
    files are not part of it)."""
    from transformers import JanusForConditionalGeneration, LlavaForConditionalGeneration

    from silmm.backends.common import build_tiny_tokenizer

    with torch.device("meta"):
        if which == "janus":
            model = JanusForConditionalGeneration(janus_config(JANUS_LAYERS)[0])
        else:
            tok = build_tiny_tokenizer(extra_special_tokens={"image_token": "<image>"}, vocab_size=512)
            model = LlavaForConditionalGeneration(dream_parts(DREAM_LAYERS, tok))
    return 2 * sum(p.numel() for p in model.parameters())


CASES = {"janus": ("configs/janus_pro_7b_slurm.yaml", build_janus, JANUS_LAYERS),
         "dream": ("configs/examples/dream_7b_plan.yaml", build_dream, DREAM_LAYERS)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--which", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--prompts", type=int, default=1, help="calibration prompts (--calibrate-prompts)")
    p.add_argument("--out", type=Path, default=Path("/tmp/plan_real_width"))
    p.add_argument("--recalibrate", action="store_true")
    args = p.parse_args()
    for which in args.which:
        config, build, real_layers = CASES[which]
        ckpt = args.out / f"{which}_{args.layers}layers"
        if not ckpt.exists():
            print(f"building {ckpt} ({which} real widths, {args.layers} layers, random bf16 weights)", flush=True)
            build(ckpt, args.layers)
        model_bytes = full_model_bytes(which)
        costs = args.out / f"{which}_model_bytes.json"
        costs.write_text(json.dumps({"model_bytes": model_bytes, "export_bytes": model_bytes}))
        cmd = [sys.executable, "-m", "silmm", "--log-level", "WARNING", "plan", config, f"model.path={ckpt}",
               f"run.root={args.out / 'runs'}", "--gpus", str(args.gpus), "--calibrate-prompts", str(args.prompts),
               "--depth-scale", f"{real_layers / args.layers:g}", "--unit-costs", str(costs)]
        cmd += ["--recalibrate"] if args.recalibrate else []
        print("$ silmm " + " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
