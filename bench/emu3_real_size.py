"""Emu3 at its released widths on the CPU (random weights, 2 text layers): one sample, its decode, one yes/no,
one DPO step. Prints seconds, peak memory and bytes per sample, and an extrapolation to the full model.

Not a test (minutes, ~10 GB of RAM): a smoke of the real shapes that the tiny model cannot exercise.

    .venv/bin/python bench/emu3_real_size.py [--grid 16] [--layers 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def build(out: Path, layers: int) -> None:
    """A random checkpoint with Emu3-Gen's text widths (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary
    184,622 with 32,768 visual tokens) and the VQ model's default (released) widths, saved in bf16."""
    from transformers import (
        Emu3Config,
        Emu3ForConditionalGeneration,
        Emu3ImageProcessor,
        Emu3Processor,
        Emu3TextConfig,
        Emu3VQVAEConfig,
        GenerationConfig,
    )

    from silmm.backends.common import build_tiny_tokenizer
    from silmm.backends.emu3 import EMU3_CHAT_TEMPLATE, EMU3_SPECIAL_TOKENS, EOL_TOKEN, VISUAL_TOKEN

    vq = Emu3VQVAEConfig()  # codebook 32,768: the released tokenizer's widths
    tok = build_tiny_tokenizer(None, EMU3_SPECIAL_TOKENS, add_bos=False)
    tok.add_tokens([EOL_TOKEN] + [VISUAL_TOKEN.format(i) for i in range(vq.codebook_size)], special_tokens=True)
    text = Emu3TextConfig(vocab_size=184622, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=9216,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Emu3Config(text_config=text, vq_config=vq, vocabulary_map=tok.get_vocab())
    with torch.device("cpu"):
        model = Emu3ForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    Emu3Processor(image_processor=Emu3ImageProcessor(), tokenizer=tok,
                  chat_template=EMU3_CHAT_TEMPLATE).save_pretrained(out)
    del model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", type=int, default=16, help="image tokens per side (the VQ decodes 8 px per token)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from silmm.backends.emu3 import Emu3Backend
    from silmm.config import Dtype, LoraConfig, ModelConfig, SamplingConfig

    with tempfile.TemporaryDirectory(prefix="silmm_emu3_real_") as tmp:
        t0 = time.time()
        build(Path(tmp), args.layers)
        t_build = time.time() - t0
        sampling = SamplingConfig(guidance_scale=3.0, top_k=2048, top_p=1.0, image_height=args.grid,
                                  image_width=args.grid)
        t0 = time.time()
        backend = Emu3Backend.load(ModelConfig(path=tmp, dtype=Dtype.float32), sampling)
        t_load = time.time() - t0
        t0 = time.time()
        samples = backend.sample(["a red apple on a wooden table"], [0])
        t_sample = time.time() - t0
        t0 = time.time()
        images = backend.decode(samples, [0])
        t_decode = time.time() - t0
        t0 = time.time()
        backend.yes_no(images, [["Is there a red apple?", "Is the table wooden?"]])
        t_yes_no = time.time() - t0
        backend.add_lora(LoraConfig(r=32, alpha=32, dropout=0.0))
        pair = torch.cat([samples, backend.sample(["a red apple on a wooden table"], [1])])
        t0 = time.time()
        logps = backend.sequence_logprobs(["a red apple on a wooden table"] * 2, pair)
        (-(logps[0] - logps[1])).backward()  # one DPO-direction step's forward + backward (chosen, rejected)
        t_dpo = time.time() - t0
        n_tokens = samples.shape[1]
        print(f"Emu3 real widths, {args.layers} text layers, random weights, fp32 on CPU, {args.threads} threads")
        print(f"  grid {args.grid}x{args.grid} = {n_tokens} visual tokens, image {images.shape[1]}x{images.shape[2]} px")
        print(f"  build+save {t_build:.1f} s, load {t_load:.1f} s; sample (CFG) {t_sample:.1f} s "
              f"({t_sample / n_tokens * 1000:.1f} ms/token); decode {t_decode:.1f} s; yes/no (2 q) {t_yes_no:.1f} s; "
              f"DPO pair forward+backward {t_dpo:.1f} s")
        print(f"  peak RSS {peak_gib():.1f} GiB; a sample stored: {samples.numel() * 2} bytes of codes (int16)")


if __name__ == "__main__":
    main()
