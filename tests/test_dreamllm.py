"""DreamLLM's released layout -> the dream backend (silmm.backends.dreamllm), on a tiny random release.

The reference computations are written here from the released architecture (RunpeiDong/DreamLLM:
``DreamLLMForCausalMLM.get_prompt_embeds``, ``StableDiffusionHead.pipeline``, ``CLIPVisionEmbedding.forward``),
reading the *released* files with plain transformers / diffusers classes, independently of the converter:
a LlamaModel over the main safetensors shards, the dream queries from dream_embedding.bin, the UNet, VAE and
projector from stable_diffusion_head.bin, CLIP and its projector from clip_vision_embedding.bin.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from silmm.backends import dreamllm as R
from silmm.backends.dream import DreamBackend
from silmm.backends.seed_tokenizer import ConversionError
from silmm.config import Backend, Device, Loss, ModelConfig, SamplingConfig
from tests.helpers import tiny_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a red cube", "two cats on a wooden table next to a small yellow bird", ""]
ATOL = 1e-5
SAMPLING = {"decoder_steps": 3, "decoder_guidance_scale": 7.5}  # the release's CFG scale; few DDPM steps


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return R.build_tiny_dreamllm_released(tmp_path_factory.mktemp("dreamllm") / "released", seed=0)


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory) -> Path:
    return R.convert_dreamllm(released, tmp_path_factory.mktemp("dreamllm_ours") / "ours")


def load(path: Path, **sampling) -> DreamBackend:
    model = ModelConfig(backend=Backend.dream, path=str(path), device=Device.cpu)
    return DreamBackend.load(model, SamplingConfig(**{**SAMPLING, **sampling}))


@pytest.fixture(scope="module")
def backend(converted) -> DreamBackend:
    return load(converted)


class ReleasedModel:
    """DreamLLM's inference path, from the released files with library classes (see the module docstring)."""

    def __init__(self, src: Path):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import (
            AutoTokenizer,
            CLIPVisionConfig,
            CLIPVisionModel,
            LlamaConfig,
            LlamaForCausalLM,
        )

        cfg = json.loads((src / "config.json").read_text())
        plugins = cfg["plugins_init_kwargs"]
        self.tokenizer = AutoTokenizer.from_pretrained(str(src))
        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings")
        self.llm = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in fields})).eval()
        shards = set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())
        main = {k: v for s in shards for k, v in load_file(str(src / s)).items() if not k.endswith("inv_freq")}
        self.llm.load_state_dict(main, strict=True)
        self.queries = torch.load(src / "dream_embedding.bin", weights_only=True)["dream_queries"]
        added = cfg["special_tokens2ids_dict"]["additional_special_tokens"]
        self.dream_ids = [added["<dream_start>"], added["<dream_end>"]]
        sd = torch.load(src / "stable_diffusion_head.bin", weights_only=True)
        diffusion = src / plugins["stable_diffusion_head"]["diffusion_name_or_path"]
        self.unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(diffusion / "unet"))).eval()
        self.unet.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})
        self.vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(diffusion / "vae"))).eval()
        self.vae.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vae.")})
        self.sd_projector = sd["projector.projector.weight"]
        self.scheduler = DDPMScheduler.from_pretrained(str(diffusion), subfolder="scheduler")
        clip = torch.load(src / "clip_vision_embedding.bin", weights_only=True)
        clip_dir = src / plugins["clip_vision_embedding"]["clip_vision_model_name_or_path"]
        self.clip = CLIPVisionModel(CLIPVisionConfig.from_pretrained(str(clip_dir))).eval()
        prefix = "clip_vision_model.vision_model."  # transformers 4.x names; this version drops "vision_model."
        self.clip.load_state_dict({k[len(prefix):]: v for k, v in clip.items()
                                   if k.startswith(prefix) and not k.endswith("position_ids")})
        self.clip_w, self.clip_b = clip["projector.projector.weight"], clip["projector.projector.bias"]
        self.select_layer = plugins["clip_vision_embedding"]["select_layer"]

    @torch.no_grad()
    def prompt_embeds(self, prompt: str) -> torch.Tensor:
        """get_prompt_embeds: the raw prompt with cache, then [<dream_start>, queries, <dream_end>]; the final
        (normed) hidden states between the two special tokens."""
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        text = self.llm.model(input_ids=ids, use_cache=True)
        special = self.llm.model.embed_tokens(torch.tensor([self.dream_ids]))
        inputs = torch.cat([special[:, :1], self.queries, special[:, 1:]], dim=1)
        out = self.llm.model(inputs_embeds=inputs, past_key_values=text.past_key_values, use_cache=True)
        return out.last_hidden_state[:, 1:-1]

    @torch.no_grad()
    def images(self, prompts: list[str], seeds: list[int], steps: int, scale: float) -> np.ndarray:
        """StableDiffusionHead.pipeline with the empty prompt's embeddings as the unconditional branch and the
        projector without bias; one generator per image (what silmm's decode seeds)."""
        cond = torch.cat([self.prompt_embeds(p) for p in prompts]) @ self.sd_projector.T
        uncond = (self.prompt_embeds("") @ self.sd_projector.T).expand_as(cond)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        size = self.unet.config.sample_size
        latents = torch.stack([torch.randn(4, size, size, generator=g) for g in generators])
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            x = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps_u, eps_c = self.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            latents = self.scheduler.step(eps_u + scale * (eps_c - eps_u), t, latents, generator=generators).prev_sample
        pixels = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    @torch.no_grad()
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIPVisionEmbedding.forward: hidden_states[select_layer] without CLS -> linear projector (bias)."""
        hidden = self.clip(pixel_values, output_hidden_states=True).hidden_states[self.select_layer][:, 1:]
        return hidden @ self.clip_w.T + self.clip_b


@pytest.fixture(scope="module")
def reference(released) -> ReleasedModel:
    return ReleasedModel(released)


# ------------------------------------------------------------------------------------------ the mapping
def test_every_released_key_is_mapped_or_dropped_and_copied_exactly(released, converted, backend):
    release = R.read_release(released)
    parts, origin = R.map_release(release.states)
    mapped = set(origin.values())
    dropped = {(f, k) for f, s in release.states.items() for k in s if (f, k) not in mapped}
    assert {k for _, k in dropped} == {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(4)} | {
        "clip_vision_model.vision_model.embeddings.position_ids"}
    # as the backend loads them (transformers writes LLaVA under its legacy names and renames them on load)
    ours = {"lmm": backend.base.state_dict(), "unet": backend.unet.state_dict(), "vae": backend.vae.state_dict(),
            "head": load_file(str(converted / "dream_head" / "model.safetensors"))}
    for (part, key), (file, released_key) in origin.items():
        original = release.states[file][released_key]
        assert torch.equal(ours[part][key], original.reshape(ours[part][key].shape)), (file, released_key)
    assert set(ours["head"]) == {"queries", "projector.weight"}  # the release's head projector has no bias
    assert sum(len(p) for p in ours.values()) == len(origin) + 2  # + LLaVA's linear_2, written as the identity
    torch.testing.assert_close(ours["lmm"]["model.multi_modal_projector.linear_2.weight"], torch.eye(64), rtol=0, atol=0)
    assert not ours["lmm"]["model.multi_modal_projector.linear_2.bias"].any()
    head_cfg = json.loads((converted / "dream_head" / "config.json").read_text())
    assert head_cfg["projector_bias"] is False and head_cfg["dream_start_token"] == "<dream_start>"
    assert head_cfg["prompt_template"] == "{prompt}" and head_cfg["chat_template"].startswith(R.VICUNA_SYSTEM)
    scheduler = json.loads((converted / "decoder" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDPMScheduler" and scheduler["steps_offset"] == 1


def test_builtin_configs_are_the_released_models_and_take_their_keys():
    """SD 2.1-base UNet / SD 2.x VAE / CLIP ViT-L/14 from the builtin configs, on the meta device: the published
    parameter counts, and the keys the release would hold (Vicuna-7B widths) map onto our models exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaForConditionalGeneration,
    )

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(R.BUILTIN_UNET[R.SD21_BASE])
        vae = AutoencoderKL.from_config(R.BUILTIN_VAE[R.SD21_BASE])
        clip = CLIPVisionModel(CLIPVisionConfig(**R.BUILTIN_CLIP[R.CLIP_L14]))
        vicuna = LlamaForCausalLM(LlamaConfig(vocab_size=32008, hidden_size=4096, intermediate_size=11008,
                                              num_hidden_layers=32, num_attention_heads=32))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, clip)]
    assert counts == [865_910_724, 83_653_863, 303_179_776]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 128, 2).float() / 128)
    main = {**vicuna.state_dict(), **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(32)}}
    states = {"model-00001-of-00002.safetensors": main,
              "clip_vision_embedding.bin": {**{f"clip_vision_model.vision_model.{k}": v for k, v in clip.state_dict().items()},
                                            "projector.projector.weight": torch.empty(4096, 1024, device="meta"),
                                            "projector.projector.bias": torch.empty(4096, device="meta")},
              "stable_diffusion_head.bin": {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
                                            **{f"vae.{k}": v for k, v in vae.state_dict().items()},
                                            "projector.projector.weight": torch.empty(1024, 4096, device="meta")},
              "dream_embedding.bin": {"dream_queries": torch.empty(1, 64, 4096, device="meta")}}
    parts, origin = R.map_release(states)
    tok = R.tiny_release_tokenizer()
    config = {**{k: v for k, v in vicuna.config.to_dict().items() if k in R.LLAMA_FIELDS}, "rope_theta": 10000.0,
              "plugins_init_kwargs": {R.CLIP: {"select_layer": -2}}}
    release = R.Release(Path("vicuna"), config, tok, states)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(R.llava_config(release, CLIPVisionConfig(**R.BUILTIN_CLIP[R.CLIP_L14])))
    R.check_fits("lmm", parts["lmm"], R._shapes(llava, R.SYNTHESIZED), origin, "test")
    R.check_fits("unet", parts["unet"], R._shapes(unet), origin, "test")
    R.check_fits("vae", parts["vae"], R._shapes(vae), origin, "test")
    R.check_fits("head", parts["head"], {"queries": (64, 4096), "projector.weight": (1024, 4096)}, origin, "test")
    assert len(origin) == sum(len(s) for s in states.values()) - 32  # all but the RoPE buffers
    assert llava.config.image_seq_length == 256 and llava.config.vision_feature_layer == -2
    # the release's MODEL_ZOOS may name the hub-cache folder instead of the model
    assert R._builtin_name("huggingface_cache/hub/models--openai--clip-vit-large-patch14/snapshots/8d05", R.BUILTIN_CLIP)


def _edit_bin(name: str, edit):
    def apply(src: Path) -> None:
        state = torch.load(src / name, weights_only=True)
        edit(state)
        torch.save(state, src / name)
    return apply


def _edit_shard(shard: int, edit):
    def apply(src: Path) -> None:
        path = src / f"model-0000{shard}-of-00002.safetensors"
        state = load_file(str(path))
        edit(state)
        save_file(state, str(path))
    return apply


def _edit_config(edit):
    def apply(src: Path) -> None:
        cfg = json.loads((src / "config.json").read_text())
        edit(cfg)
        (src / "config.json").write_text(json.dumps(cfg))
    return apply


BROKEN = {
    "missing main key": (_edit_shard(2, lambda s: s.pop("model.layers.3.mlp.up_proj.weight")),
                         r"model\*\.safetensors.*missing key 'model\.layers\.3\.mlp\.up_proj\.weight'"),
    "missing unet key": (_edit_bin("stable_diffusion_head.bin", lambda s: s.pop("unet.conv_in.weight")),
                         r"stable_diffusion_head\.bin: missing key 'unet\.conv_in\.weight'"),
    "unknown key": (_edit_shard(1, lambda s: s.update({"model.embed_tokens_backup": torch.zeros(2)})),
                    r"model-00001-of-00002\.safetensors: unexpected key 'model\.embed_tokens_backup'"),
    "extra clip layer": (_edit_bin("clip_vision_embedding.bin", lambda s: s.update(
        {"clip_vision_model.vision_model.encoder.layers.7.mlp.fc1.bias": torch.zeros(64)})),
        r"clip_vision_embedding\.bin: unexpected key 'clip_vision_model\.vision_model\.encoder\.layers\.7\.mlp\.fc1\.bias'"),
    "head projector bias": (_edit_bin("stable_diffusion_head.bin", lambda s: s.update(
        {"projector.projector.bias": torch.zeros(32)})), r"stable_diffusion_head\.bin: unexpected key 'projector\.projector\.bias'"),
    "wrong query count": (_edit_bin("dream_embedding.bin", lambda s: s.update({"dream_queries": torch.zeros(1, 7, 64)})),
                          r"dream_embedding\.bin: 'dream_queries' has shape \[7, 64\].*\[8, 64\]"),
    "wrong projector width": (_edit_bin("stable_diffusion_head.bin", lambda s: s.update(
        {"projector.projector.weight": torch.zeros(32, 63)})), r"stable_diffusion_head\.bin: 'projector\.projector\.weight' has shape"),
    "post layernorm": (_edit_bin("clip_vision_embedding.bin", lambda s: s.update({"post_layernorm.weight": torch.ones(64)})),
                       r"clip_vision_embedding\.bin: 'post_layernorm\.weight' is the additional"),
    "post layernorm flag": (_edit_config(lambda c: c["plugins_init_kwargs"]["clip_vision_embedding"].update(
        use_additional_post_layernorm=True)), r"use_additional_post_layernorm"),
    "token ids disagree": (_edit_config(lambda c: c["special_tokens2ids_dict"]["additional_special_tokens"].update(
        {"<dream_start>": 3})), r"config\.json: special_tokens2ids_dict gives '<dream_start>' id 3"),
    "other rope": (_edit_shard(1, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})),
                   r"model-00001-of-00002\.safetensors: 'model\.layers\.0\.self_attn\.rotary_emb\.inv_freq' is not"),
    "pickled object": (lambda src: torch.save({"dream_queries": Path("x")}, src / "dream_embedding.bin"),
                       r"dream_embedding\.bin: cannot read as a weights-only torch file"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_release_is_refused_naming_file_and_key(released, tmp_path, case, capsys):
    from silmm.cli import main

    src = tmp_path / "release"
    shutil.copytree(released, src)
    edit, message = BROKEN[case]
    edit(src)
    with pytest.raises(ConversionError, match=message):
        R.convert_dreamllm(src, tmp_path / "ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # nothing written, nothing left over
    if case == "missing unet key":  # the CLI: exit status 2 and one line saying what is wrong
        capsys.readouterr()
        assert main(["convert", "dreamllm", str(src), str(tmp_path / "ours")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "stable_diffusion_head.bin: missing key 'unet.conv_in.weight'" in err


def test_existing_destination_and_cli(released, converted, tmp_path, capsys):
    from silmm.cli import main

    with pytest.raises(FileExistsError):
        R.convert_dreamllm(released, converted)
    assert main(["convert", "dreamllm", str(released), str(converted)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["make-tiny", "dreamllm", str(tmp_path / "tiny")]) == 0
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["model_type"] == "dreamllm"
    assert (tmp_path / "tiny" / "stable_diffusion_head.bin").read_bytes() == (
        released / "stable_diffusion_head.bin").read_bytes()  # deterministic from the seed
    capsys.readouterr()
    assert main(["make-tiny", "dreamllm", str(tmp_path / "tiny")]) == 2  # never over an existing directory
    assert "exists" in capsys.readouterr().err


def test_configs_from_options_and_a_half_precision_release(released, tmp_path):
    """CLIP / SD configs elsewhere than config.json says: refused without --clip / --diffusion, used with them;
    bfloat16 main weights give a bfloat16 LLaVA (the float32 CLIP cast to it), a float32 head."""
    from transformers import LlavaForConditionalGeneration

    src, elsewhere = tmp_path / "release", tmp_path / "elsewhere"
    shutil.copytree(released, src)
    elsewhere.mkdir()
    for sub in (R.TINY_CLIP_DIR, R.TINY_SD_DIR):
        (src / sub).rename(elsewhere / sub)
    for shard in src.glob("model-*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(shard)).items()}, str(shard))
    with pytest.raises(ConversionError, match="--clip DIR"):
        R.convert_dreamllm(src, tmp_path / "ours")
    with pytest.raises(ConversionError, match="--diffusion DIR"):
        R.convert_dreamllm(src, tmp_path / "ours", clip=elsewhere / R.TINY_CLIP_DIR)
    out = R.convert_dreamllm(src, tmp_path / "ours", clip=elsewhere / R.TINY_CLIP_DIR,
                             diffusion=elsewhere / R.TINY_SD_DIR)
    lmm = LlavaForConditionalGeneration.from_pretrained(str(out / "lmm"))
    assert {p.dtype for p in lmm.parameters()} == {torch.bfloat16}
    clip = torch.load(released / "clip_vision_embedding.bin", weights_only=True)
    assert torch.equal(lmm.model.multi_modal_projector.linear_1.bias, clip["projector.projector.bias"].bfloat16())
    assert load_file(str(out / "dream_head" / "model.safetensors"))["queries"].dtype == torch.float32


# ------------------------------------------------------------------------------------------ generation
def test_features_equal_the_released_forward(backend, reference):
    batched = backend.features(PROMPTS).detach()  # left-padded together, the empty prompt among them
    for i, prompt in enumerate(PROMPTS):
        want = reference.prompt_embeds(prompt)[0]
        torch.testing.assert_close(backend.features([prompt])[0].detach(), want, atol=ATOL, rtol=0)
        torch.testing.assert_close(batched[i], want, atol=ATOL, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_decoded_images_equal_the_released_pipeline(backend, reference):
    seeds = [11, 12]
    got = backend.decode(backend.features(PROMPTS[:2]).detach(), seeds)
    want = reference.images(PROMPTS[:2], seeds, SAMPLING["decoder_steps"], SAMPLING["decoder_guidance_scale"])
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # one uint8 level where float rounding flips
    assert not np.array_equal(got[0], got[1]) and got.std() > 10
    unguided = dataclasses.replace(backend.sampling, decoder_guidance_scale=1.0)
    backend.sampling, guided_sampling = unguided, backend.sampling
    try:
        assert not np.array_equal(backend.decode(backend.features(PROMPTS[:2]).detach(), seeds), got)
    finally:
        backend.sampling = guided_sampling


# ------------------------------------------------------------------------------------------ comprehension
def test_image_patches_sit_where_the_release_puts_them(backend, reference):
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    prefix, _ = backend.question_parts()
    enc = backend.processor(text=[prefix], images=list(images), return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    tok = backend.tokenizer
    start, patch, end = (tok.convert_tokens_to_ids(t) for t in ("<im_start>", "<im_patch>", "<im_end>"))
    i, j = ids.index(start), ids.index(end)
    assert ids[i + 1:j] == [patch] * 16 and ids.count(patch) == 16  # (32 / 8)^2, the release's 256 at 224 / 14
    seen = {}

    def capture(_module, _args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    handle = backend.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            backend.base(**enc)
    finally:
        handle.remove()
    embeds = seen["embeds"][0]
    want = reference.image_embeds(enc["pixel_values"])[0]
    torch.testing.assert_close(embeds[i + 1:j], want, atol=ATOL, rtol=0)
    table = reference.llm.model.embed_tokens.weight
    assert torch.equal(embeds[i], table[start]) and torch.equal(embeds[j], table[end])
    (p_yes, p_no), = backend.yes_no(images, [["Is it red?"]])
    assert p_yes.shape == p_no.shape == (1,)


# ------------------------------------------------------------------------------------------ SILMM on it
def test_dropdiv_changes_h_only_when_on(converted):
    off = load(converted, dropdiv_rate=0.0)
    assert torch.equal(off.sample(PROMPTS[:2], [1, 2]), off.features(PROMPTS[:2]).detach())
    on = load(converted, dropdiv_rate=0.3)
    before = on.features(PROMPTS[:2]).detach()
    assert not torch.allclose(on.sample(PROMPTS[:2], [1, 2]), before)
    assert torch.equal(on.features(PROMPTS[:2]).detach(), before)


def test_kcdpo_trains_the_converted_model_through_the_driver(converted, tmp_path):
    from silmm.driver import STAGE_ORDER, Driver
    from silmm.inspection import verify_run
    from silmm.models import load_backend

    run = tiny_run(tmp_path, converted, "dream", "executor.kind=debug", "executor.poll_interval_s=0.1",
                   "prompts.count=2", "sharding.prompts_per_shard=2", "questions.max_questions=2",
                   "train.max_steps=1", "train.batch_size=2", "train.lr=1e-3")
    assert run.config.train.loss is Loss.kcdpo  # the continuous default
    driver = Driver(run)
    for stage in STAGE_ORDER:
        driver.run_stage(1, stage)
    assert verify_run(run) == []
    metrics = [json.loads(line) for line in (run.train_dir(1) / "metrics.jsonl").read_text().splitlines()]
    assert "distance/policy_chosen" in metrics[-1] and np.isfinite(metrics[-1]["loss"])
    with torch.no_grad():
        before = load_backend(run, 1).features(PROMPTS[:2])
        after = load_backend(run, 2).features(PROMPTS[:2])
    assert not torch.allclose(before, after, atol=1e-4)
    head = json.loads((run.model_dir(1) / "dream_head" / "config.json").read_text())
    assert head["dream_start_token"] == "<dream_start>" and head["projector_bias"] is False
