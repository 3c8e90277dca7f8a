"""The SEED-LLaMA backend against the LMMBackend contract, on a tiny random model built in the released layout
and converted (``silmm make-tiny seed_llama``), offline.

Reference computations are written here from the documented format, independently of the backend's code
paths: the whole prompt as one text string (image tokens spelled ``<img_00042>``), one plain forward of
``LlamaForCausalLM`` without cache, the full-vocabulary softmax.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from silmm import config as C
from silmm.backends.base import CheckpointError
from silmm.backends.common import lora_target_modules
from silmm.backends.seed_llama import (
    BOI_TOKEN,
    EOI_TOKEN,
    IMG_TOKEN,
    LORA_TARGETS,
    SeedLlamaBackend,
    build_tiny_seed_llama,
    build_tiny_seed_llama_released,
    convert_seed_llama,
)
from silmm.config import LoraConfig, ModelConfig, SamplingConfig
from tests.helpers import tiny_run

PROMPTS = ["a red cube", "two green spheres to the left of a wooden table"]
QUESTIONS = [["Is there a red cube?", "Is the cube above the sphere?", "Are there two dogs?"], [],
             ["Is the table wooden?"], ["Are there two green spheres?", "Is the sphere left of the table?"]]
LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_regex=LORA_TARGETS)
NUM_CODES = 8192


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_tiny_seed_llama(tmp_path_factory.mktemp("seed") / "tiny", seed=0)


def load(path: Path, **sampling) -> SeedLlamaBackend:
    sampling = {"guidance_scale": 1.0, "decoder_steps": 2, **sampling}
    return SeedLlamaBackend.load(ModelConfig(path=str(path), dtype=C.Dtype.float32), SamplingConfig(**sampling))


@pytest.fixture(scope="module")
def backend(ckpt) -> SeedLlamaBackend:
    return load(ckpt)


@pytest.fixture(scope="module")
def images(backend) -> np.ndarray:
    return backend.decode(backend.sample(PROMPTS * 2, [1, 2, 3, 4]), [1, 2, 3, 4])


def text_ids(backend: SeedLlamaBackend, text: str) -> torch.Tensor:
    return torch.tensor([backend.tokenizer(text, add_special_tokens=False)["input_ids"]])


def image_block(codes) -> str:
    return BOI_TOKEN + "".join(IMG_TOKEN.format(int(c)) for c in codes) + EOI_TOKEN


# ------------------------------------------------------------------------------------ layout
def test_make_tiny_converts_the_released_layout(ckpt, tmp_path, capsys):
    released = build_tiny_seed_llama_released(tmp_path / "released", seed=0)
    assert (released / "seed_llama_8b_sft" / "pytorch_model.bin").is_file()  # pickled, as released
    assert (released / "seed_tokenizer" / "seed_quantizer.pt").is_file()
    assert (released / "seed_tokenizer" / "diffusion_model" / "model_index.json").is_file()
    out = convert_seed_llama(released, tmp_path / "ours")
    for sub in ("llm/model.safetensors", "llm/tokenizer.json", "tokenizer/model.safetensors",
                "decoder/model_index.json", "decoder/unet/diffusion_pytorch_model.safetensors"):
        assert (out / sub).is_file(), sub
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    # deterministic: the same seed converts to the same weights as the fixture's
    for sub in ("llm/model.safetensors", "tokenizer/model.safetensors"):
        a, b = load_file(str(out / sub)), load_file(str(ckpt / sub))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        convert_seed_llama(released, out)
    # the CLI: a missing released file is one line naming it, exit status 2, nothing written
    from silmm import cli

    (released / "seed_tokenizer" / "seed_quantizer.pt").unlink()
    assert cli.main(["convert", "seed-llama", str(released), str(tmp_path / "cli")]) == 2
    assert "seed_quantizer.pt" in capsys.readouterr().err and not (tmp_path / "cli").exists()


def test_released_token_strings_and_ids(backend):
    tok = backend.tokenizer
    ids = tok.convert_tokens_to_ids([IMG_TOKEN.format(i) for i in range(NUM_CODES)])
    first = ids[0]
    assert ids == list(range(first, first + NUM_CODES))  # contiguous: word vocabulary + code, as 32000 + code
    assert backend.image_ids.tolist() == ids
    assert tok.convert_tokens_to_ids([BOI_TOKEN, EOI_TOKEN]) == [backend.boi_id, backend.eoi_id]
    assert IMG_TOKEN.format(8191) == "<img_08191>" and (BOI_TOKEN, EOI_TOKEN) == ("<img>", "</img>")
    assert backend.num_image_tokens == 32


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "decoder" / "model_index.json").unlink(), "model_index.json"),
    (lambda p: (p / "llm" / "model.safetensors").rename(p / "llm" / "pytorch_model.bin"), "no weights"),
    (lambda p: __import__("shutil").rmtree(p / "tokenizer"), "tokenizer/"),
])
def test_broken_checkpoint_errors_name_the_path(ckpt, tmp_path, breakage, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    breakage(broken)
    with pytest.raises(CheckpointError, match=message) as err:
        load(broken)
    assert str(broken) in str(err.value)


def test_guidance_is_refused_in_config_and_backend(ckpt, tmp_path):
    with pytest.raises(ValueError, match="classifier-free guidance"):
        load(ckpt, guidance_scale=2.0)
    with pytest.raises(C.ConfigError, match="sampling.guidance_scale"):
        C.load(None, [f"run.root={tmp_path}", "model.backend=seed_llama", f"model.path={ckpt}"])


# ------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("sampling", [{"temperature": 3.0, "top_p": 1.0}, {"top_k": 7}, {"top_p": 0.5}])
def test_every_sample_is_32_image_codes(ckpt, sampling):
    backend = load(ckpt, **sampling)
    codes = backend.sample(PROMPTS * 3, list(range(6)))
    assert codes.shape == (6, 32) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < NUM_CODES
    # the unconstrained head puts real mass on other tokens here: the restriction is what makes every
    # sample decodable
    with torch.no_grad():
        logits = backend.model(text_ids(backend, "<s>" + backend.chat(PROMPTS[0]) + BOI_TOKEN)).logits[0, -1]
    assert float(logits.softmax(-1)[backend.image_ids].sum()) < 0.99


def test_greedy_sampling_equals_an_independent_masked_argmax(ckpt):
    backend = load(ckpt, top_k=1)
    codes = backend.sample(PROMPTS, [5, 6])
    image = backend.image_ids
    for prompt, row in zip(PROMPTS, codes, strict=True):
        text = "<s>" + backend.chat(prompt) + BOI_TOKEN
        want = []
        for _ in range(32):  # no KV cache: the whole string each step
            with torch.no_grad():
                logits = backend.model(text_ids(backend, text)).logits[0, -1]
            code = int(logits[image].argmax())
            want.append(code)
            text += IMG_TOKEN.format(code)
        assert row.tolist() == want


def test_seeds_reproduce_and_rows_are_independent(backend):
    a = backend.sample(PROMPTS, [1, 2])
    assert torch.equal(a, backend.sample(PROMPTS, [1, 2]))
    b = backend.sample([PROMPTS[0], PROMPTS[0]], [1, 9])  # row 0: same prompt and seed, other batch-mate
    assert torch.equal(a[0], b[0]) and not torch.equal(b[0], b[1])


def test_sampling_logprobs_equal_teacher_forcing(backend):
    drawn = backend.sample_with_logprobs(PROMPTS, [3, 4])  # temperature 1, top-p 0.95
    with torch.no_grad():
        forced = backend.sequence_logprobs(PROMPTS, drawn.tokens)
    torch.testing.assert_close(forced, drawn.logp_conditional, atol=1e-4, rtol=0)
    assert torch.equal(drawn.logp_cfg, drawn.logp_conditional)  # no guidance: one distribution


# ------------------------------------------------------------------------------------ decoding
def test_decode_shapes_seeding_and_batching(backend):
    codes = backend.sample(PROMPTS, [1, 2])
    images = backend.decode(codes, [11, 12])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, backend.decode(codes, [11, 12]))
    assert not np.array_equal(images[0], backend.decode(codes[:1], [99])[0])  # the seed drives the noise
    single = replace(backend.sampling)
    assert single.decoder_steps == 2
    backend.decode_batch_size = 1
    try:
        assert np.array_equal(np.concatenate([backend.decode(codes[i:i + 1], [11 + i]) for i in range(2)]),
                              backend.decode(codes, [11, 12]))
    finally:
        backend.decode_batch_size = 8


def test_decode_conditions_the_unet_on_the_codes_embeddings(backend):
    codes = backend.sample(PROMPTS, [1, 2])
    seen = []
    hook = backend.decoder.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["class_labels"].clone()), with_kwargs=True)
    try:
        backend.decode(codes, [1, 2])
    finally:
        hook.remove()
    embeds = backend.image_tokenizer.codes_to_image_embeds(codes)
    e = embeds.shape[1]
    # guidance: [zero embedding (unconditional) rows, conditional rows]; each row = noised embed + noise level
    first = seen[0]
    assert first.shape == (4, 2 * e)
    assert torch.equal(first[:2], torch.zeros_like(first[:2]))
    # noise level 0 still adds the scheduler's first-step noise: close to the codes' embeddings, not equal
    torch.testing.assert_close(first[2:, :e], embeds, atol=0.2 * float(embeds.abs().max()), rtol=0)


# ------------------------------------------------------------------------------------ yes / no
def reference_yes_no(backend: SeedLlamaBackend, image: np.ndarray, question: str) -> tuple[float, float]:
    codes = backend.image_tokenizer.encode(backend.image_tokenizer.preprocess([image]))[0]
    text = "<s>" + f"USER: {image_block(codes)}{question}\nASSISTANT:"
    with torch.no_grad():
        probs = backend.model(text_ids(backend, text)).logits[0, -1].float().softmax(-1)
    return float(probs[backend.yes_ids].sum()), float(probs[backend.no_ids].sum())


def test_yes_no_equals_one_question_at_a_time(backend, images):
    got = backend.yes_no(images, QUESTIONS, batch_size=3)
    for image, qs, (p_yes, p_no) in zip(images, QUESTIONS, got, strict=True):
        assert p_yes.shape == p_no.shape == (len(qs),) and p_yes.dtype == np.float32
        for q, y, n in zip(qs, p_yes, p_no, strict=True):
            want = reference_yes_no(backend, image, q)
            np.testing.assert_allclose([y, n], want, rtol=1e-4, atol=1e-7)


def test_yes_no_encodes_and_prefills_each_image_once(backend, images):
    calls = {"encode": 0, "rows": 0}
    encode, forward = backend.image_tokenizer.encode, backend._forward

    def count_encode(pixels):
        calls["encode"] += len(pixels)
        return encode(pixels)

    def count_forward(ids, mask, pos, cache=None):
        if cache is None:
            calls["rows"] += len(ids)
        return forward(ids, mask, pos, cache)

    backend.image_tokenizer.encode, backend._forward = count_encode, count_forward
    try:
        got = backend.yes_no(images, QUESTIONS, batch_size=2)
    finally:
        del backend.image_tokenizer.encode, backend._forward
    owners = sum(1 for qs in QUESTIONS if qs)
    assert calls == {"encode": owners, "rows": owners}
    for a, b in zip(got, backend.yes_no(images, QUESTIONS, batch_size=16), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------ training
def reference_logprobs(backend: SeedLlamaBackend, prompt: str, codes: torch.Tensor) -> torch.Tensor:
    """log p(z_t | prompt, z_<t) over the image-token rows, from one plain forward of the text string."""
    text = "<s>" + backend.chat(prompt) + BOI_TOKEN + "".join(IMG_TOKEN.format(int(c)) for c in codes[:-1])
    ids = text_ids(backend, text)
    logits = backend.model(ids).logits[0, -32:].float()[:, backend.image_ids]
    return logits.log_softmax(-1).gather(-1, codes[:, None]).sum()


def test_sequence_logprobs_equal_an_independent_forward_with_lora_grads(ckpt):
    backend = load(ckpt)
    backend.add_lora(LORA)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.normal_(0, 0.2)
    codes = backend.sample(PROMPTS, [7, 8])
    got = backend.sequence_logprobs(PROMPTS, codes)
    want = torch.stack([reference_logprobs(backend, p, c) for p, c in zip(PROMPTS, codes, strict=True)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
    grads = torch.autograd.grad(got.sum(), backend.trainable_parameters())
    ref_grads = torch.autograd.grad(want.sum(), backend.trainable_parameters())
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # float32, another summation order
    logps, entropy = backend.sequence_logprobs(PROMPTS, codes, entropy=True)
    assert entropy.shape == (2,) and bool((entropy > 0).all()) and bool((entropy <= np.log(NUM_CODES) + 1e-4).all())


def test_lora_reference_merge_and_reload(ckpt, images, tmp_path):
    backend = load(ckpt)
    codes = backend.sample(PROMPTS, [1, 2])
    with torch.no_grad():
        base = backend.sequence_logprobs(PROMPTS, codes)
    base_yes = backend.yes_no(images[:1], QUESTIONS[:1])[0][0]
    targets = lora_target_modules(backend.model, LORA_TARGETS)
    assert len(targets) == 2 * 7  # q, k, v, o, gate, up, down of both layers; nothing else
    backend.add_lora(LORA)
    assert {n for n, p in backend.model.named_parameters() if p.requires_grad} == {
        n for n, _ in backend.model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.normal_(0, 0.2)
        policy = backend.sequence_logprobs(PROMPTS, codes)
        assert not torch.allclose(policy, base)
        with backend.reference():
            assert torch.equal(backend.sequence_logprobs(PROMPTS, codes), base)
            assert np.array_equal(backend.yes_no(images[:1], QUESTIONS[:1])[0][0], base_yes)
    backend.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    backend.merge_and_save(tmp_path / "merged")
    before = load_file(str(ckpt / "llm" / "model.safetensors"))
    after = load_file(str(tmp_path / "merged" / "llm" / "model.safetensors"))
    assert set(before) == set(after)
    assert {k for k in before if not torch.equal(before[k], after[k])} == {f"{t}.weight" for t in targets}
    for sub in ("tokenizer/model.safetensors", "decoder/unet/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "merged" / sub).read_bytes() == (ckpt / sub).read_bytes()
    reloaded = load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.sequence_logprobs(PROMPTS, codes), policy, atol=1e-4, rtol=0)
    assert torch.equal(reloaded.sample(PROMPTS, [1, 2]), backend.sample(PROMPTS, [1, 2]))


def test_write_text_never_writes_image_tokens(backend):
    texts = backend.write_text(["Write one yes/no question"] * 2, [0, 1], max_new_tokens=12)
    assert len(texts) == 2 and texts == backend.write_text(["Write one yes/no question"] * 2, [0, 1], 12)
    assert all("<img" not in t for t in texts)


# ------------------------------------------------------------------------------------ through the driver
def test_an_iteration_runs_end_to_end_through_the_driver(tiny_checkpoints, tmp_path):
    from silmm import store as S
    from silmm.driver import STAGE_ORDER, Driver
    from silmm.inspection import verify_run
    from silmm.models import load_backend

    run = tiny_run(tmp_path, tiny_checkpoints("seed_llama"), "seed_llama", "executor.kind=debug",
                   "executor.poll_interval_s=0.1")
    driver = Driver(run)
    for stage in STAGE_ORDER:
        driver.run_stage(1, stage)
    assert verify_run(run) == []
    samples = S.read_shard(run.shard_path(1, "samples", 0), stage="samples", config_hash=run.config_hash)
    assert samples["tokens"].shape[1] == 32 and samples["tokens"].max() < NUM_CODES
    n = run.config.sampling.samples_per_prompt
    prompts = S.read_shard(run.shard_path(1, "prompts", 0), stage="prompts", config_hash=run.config_hash)
    text = dict(zip(prompts["prompt_id"].tolist(), prompts["text"], strict=True))
    first = [text[int(p)] for p in samples["prompt_id"][:n]]
    with torch.no_grad():
        ref = load_backend(run, 1).sequence_logprobs(first, torch.from_numpy(samples["tokens"][:n])).numpy()
    np.testing.assert_allclose(samples["ref_logprob"][:n], ref, rtol=1e-5, atol=1e-4)
    trained = load_backend(run, 2)  # iteration 1's merged model, through the same code
    assert isinstance(trained, SeedLlamaBackend)
    assert json.loads((run.model_dir(1) / "llm" / "config.json").read_text())["model_type"] == "llama"
    with torch.no_grad():
        moved = trained.sequence_logprobs(first, torch.from_numpy(samples["tokens"][:n])).numpy()
    assert not np.allclose(moved, ref)
