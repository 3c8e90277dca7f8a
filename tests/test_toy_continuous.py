"""The continuous toy LMM (silmm/toy/continuous.py): its designed latents and the oracle's reading of inexact
images, pretraining in the backend's own formats (resumable, cached), the checkpoint as the dream backend
loads it, DropDiv, the KC-DPO kernel and SFT wiring from config to loss, and a smoke run of
configs/toy_continuous_smoke.yaml through the driver."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import jobs.pretrain
from silmm import config as C
from silmm.backends.dream import DreamBackend, save_checkpoint
from silmm.config import Backend, KernelAggregation, KernelDistance, ModelConfig, SamplingConfig
from silmm.driver import run_driver
from silmm.images import from_png
from silmm.questions import load_examples
from silmm.rundir import SHARD_STAGES, RunDir
from silmm.seeding import derive_seed
from silmm.store import read_shard
from silmm.toy import continuous as TC
from silmm.toy import world
from silmm.toy.pretrain import cache_key
from silmm.trainer import pair_loss
from tests.helpers import check_toy_evaluations

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "toy_continuous_smoke.yaml"
FULL = REPO / "configs" / "toy_continuous.yaml"
TINY_PRETRAIN = ["toy.pretrain.steps=5", "toy.pretrain.batch_size=4", "toy.pretrain.hidden=16",
                 "toy.pretrain.layers=2", "toy.pretrain.heads=2", "toy.pretrain.checkpoint_every=3",
                 "toy.pretrain.warmup_steps=2", "toy.continuous.vae_steps=2", "toy.continuous.num_queries=3",
                 "toy.continuous.cross_attention_dim=16", "toy.continuous.vision_layers=1"]


def smoke_config(root: Path, name: str, model: Path, *overrides: str) -> C.SilmmConfig:
    return C.load(SMOKE, [f"run.root={root}", f"run.name={name}", f"model.path={model}", "logging.progress=false",
                          *overrides])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random continuous toy LMM at the smoke config's sizes, written and loaded as the stages load it."""
    cfg = smoke_config(tmp_path_factory.mktemp("cfg"), "t", Path("unused"))
    examples = load_examples(REPO / cfg.questions.icl_examples)
    processor = TC.build_processor(examples)
    modules = TC.build_models(processor, cfg.toy, seed=3)
    out = tmp_path_factory.mktemp("toyc") / "lmm"
    save_checkpoint(out, processor, *modules)
    return cfg, examples, processor, modules, out


def load_backend(path: Path, **sampling) -> DreamBackend:
    return DreamBackend.load(ModelConfig(backend=Backend.dream, path=str(path), device="cpu"),
                             SamplingConfig(**sampling))


# ------------------------------------------------------------------------------------------- latents
def test_designed_cell_codes_are_distinct_and_placed_by_cell():
    codes = [TC.cell_code(c, s) for c, s in [(None, None)] + [(c, s) for c in world.COLOURS for s in world.SHAPES]]
    assert len({c.tobytes() for c in codes}) == 1 + len(world.COLOURS) * len(world.SHAPES)
    assert all(np.abs(c).max() <= 1.0 for c in codes)  # inside the scheduler's clip range
    scene = [world.Obj(1, 2, "red", "circle"), world.Obj(3, 0, "blue", "triangle")]
    latent = TC.scene_latent(scene)
    assert latent.shape == (TC.LATENT_CHANNELS, world.GRID, world.GRID)
    np.testing.assert_array_equal(latent[:, 1, 2], TC.cell_code("red", "circle"))
    np.testing.assert_array_equal(latent[:, 3, 0], TC.cell_code("blue", "triangle"))
    np.testing.assert_array_equal(latent[:, 0, 0], TC.cell_code(None, None))


def test_parse_reads_inexact_renderings_and_refuses_blends():
    rng = np.random.default_rng(0)
    scene = [world.Obj(0, 0, "red", "circle"), world.Obj(2, 3, "green", "square")]
    image = world.render(scene)
    assert world.parse(image) == sorted(scene)
    noisy = np.clip(image.astype(int) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    assert world.parse(noisy) == sorted(scene)  # a decoder's small errors read as the cell
    blend = image.copy()  # a red and a green square averaged: no rendering is near
    blend[:8, :8] = (world.render_cell("red", "square").astype(int) + world.render_cell("green", "square")) // 2
    assert world.parse(blend)[0] == world.Obj(0, 0, world.UNKNOWN, world.UNKNOWN)


# ---------------------------------------------------------------------------------------- pretraining
def test_answer_rows_are_what_the_backend_asks(tiny):
    """The pretraining answer format equals the scores stage's: p(yes) at each row's first question equals
    DreamBackend.yes_no on the same image and question."""
    cfg, examples, processor, modules, path = tiny
    cfg.toy.continuous.answer_pixel_noise = 0.0
    corpus = TC.Corpus(processor, cfg.toy, examples, "named")
    inputs, where, _ = corpus.answer(4, seed=0, step=5)
    backend = load_backend(path)
    with torch.no_grad():
        probs = torch.softmax(backend.base(**inputs).logits.float(), -1)
    yes = backend.yes_ids
    for row in range(4):
        first = int(where[row, 0])
        tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][row, 17:first - 1].tolist())
        question = " ".join(tokens)
        pixels = inputs["pixel_values"][row:row + 1]
        image = _unnormalise(processor, pixels)
        p_yes, _ = backend.yes_no(image, [[question]])[0]
        assert p_yes[0] == pytest.approx(float(probs[row, first, yes].sum()), abs=1e-5)


def _unnormalise(processor, pixels: torch.Tensor) -> np.ndarray:
    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    return ((pixels[0] * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()[None]


def test_caption_rows_name_every_object_of_their_image(tiny):
    cfg, examples, processor, *_ = tiny
    corpus = TC.Corpus(processor, cfg.toy, examples, "named")
    batch = TC.caption_batch(corpus, 6, seed=0, step=2)
    for labels, pixels in zip(batch["labels"], batch["pixel_values"], strict=True):
        supervised = labels[labels >= 0].tolist()
        assert supervised[-1] == corpus.eos and labels[:17].eq(-100).all()  # <s> and the image are context
        words = processor.tokenizer.decode(supervised[:-1]).split()
        objects = world.parse(_unnormalise(processor, pixels[None])[0])
        if not objects:
            assert words == ["empty"]
            continue
        phrases = " ".join(words).split(" and ")
        assert phrases == [world.Phrase(o.shape, o.colour).with_article() for o in objects]


def _cells_of(latent: torch.Tensor) -> dict[tuple[int, int], tuple[str, str]]:
    """The (colour, shape) of every non-empty cell of a designed latent (exact codes)."""
    codes = {TC.cell_code(c, s).tobytes(): (c, s) for c in world.COLOURS for s in world.SHAPES}
    flat = latent.numpy().transpose(1, 2, 0)
    empty = TC.cell_code(None, None)
    return {(r, c): codes[flat[r, c].tobytes()] for r in range(world.GRID) for c in range(world.GRID)
            if not np.array_equal(flat[r, c], empty)}


@pytest.mark.parametrize("layout", ["canonical", "random"])
def test_generation_rows_place_objects_as_the_layout_says(tiny, layout):
    """Generation examples (no caption noise, no distractors) meet their prompt, and with layout canonical
    fill exactly the cells world.canonical_cells names, whatever the step; random layouts vary them."""
    cfg, examples, processor, *_ = tiny
    toy = C.ToyConfig(**{**vars(cfg.toy)})
    toy.continuous = C.ToyContinuousConfig(layout=layout, caption_noise=0.0, uncond_p=0.0)
    toy.pretrain = C.ToyPretrainConfig(distractor_p=0.0)
    corpus = TC.Corpus(processor, toy, examples, "named")
    at_canonical_cells = []
    for step in range(4):
        prompts, latents = corpus.generate(16, seed=0, step=step)
        for prompt, latent in zip(prompts, latents, strict=True):
            spec = world.parse_prompt(prompt)
            cells = _cells_of(latent)
            scene = [world.Obj(r, c, *cells[r, c]) for r, c in sorted(cells)]
            assert world.score(spec, world.render(scene)).overall == 1.0, prompt
            want = world.canonical_cells(spec)[::-1][:sum(p.count for p in spec.phrases)]
            at_canonical_cells.append(set(cells) == set(want))
    assert all(at_canonical_cells) if layout == "canonical" else sum(at_canonical_cells) < 8


def test_continuous_pretraining_resumed_equals_uninterrupted(tmp_path):
    whole = RunDir.create_or_open(smoke_config(tmp_path, "a", tmp_path / "lmm_a", *TINY_PRETRAIN))
    jobs.pretrain.run(whole, 0, 0)
    split = RunDir.create_or_open(smoke_config(tmp_path, "b", tmp_path / "lmm_b", *TINY_PRETRAIN))
    assert jobs.pretrain.run(split, 0, 0, stop_after=4) == {"stopped_at": 4}  # phase 2 has begun at step 2
    assert not (tmp_path / "lmm_b").exists()
    jobs.pretrain.run(split, 0, 0)
    for part in ("lmm/model.safetensors", "decoder/unet/diffusion_pytorch_model.safetensors",
                 "decoder/vae/diffusion_pytorch_model.safetensors", "dream_head/model.safetensors"):
        a, b = load_file(str(tmp_path / "lmm_a" / part)), load_file(str(tmp_path / "lmm_b" / part))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{part}: {key}")
    record = json.loads((tmp_path / "lmm_b" / "pretrain.json").read_text())
    assert record["key"]["continuous"]["num_queries"] == 3
    assert 0.0 <= record["quality"]["vae_cell_accuracy"] <= 1.0
    backend = load_backend(tmp_path / "lmm_b")  # the dream backend reads it as is
    assert backend.features(["a red circle"]).shape == (1, 3, 16)


def test_cache_keys_of_the_two_forms_differ():
    examples = load_examples(REPO / "configs/examples/toy_questions.yaml")
    toy = C.load(FULL, []).toy
    discrete, continuous = cache_key(toy, examples), cache_key(toy, examples, continuous=True)
    assert "continuous" not in discrete and continuous["continuous"]["num_queries"] == toy.continuous.num_queries
    assert {k: v for k, v in continuous.items() if k != "continuous"} == discrete


def test_discrete_toy_config_hashes_are_unchanged():
    """toy.continuous at its defaults stays out of the hash (runs of the discrete toy started before it existed
    stay open); a value that differs is in it."""
    toy = C.load(REPO / "configs" / "toy.yaml", [])
    assert not [k for k in C.result_keys(toy) if k.startswith("toy.continuous.")]
    assert "sampling.decoder_noise" not in C.result_keys(toy)  # added later, like toy.continuous
    changed = C.load(REPO / "configs" / "toy.yaml", ["toy.continuous.num_queries=4"])
    assert C.result_keys(changed)["toy.continuous.num_queries"] == 4
    assert C.config_hash(changed) != C.config_hash(toy)


# -------------------------------------------------------------------------------------------- backend
def test_checkpoint_loads_as_the_in_memory_modules(tiny):
    cfg, examples, processor, (lmm, head, head_cfg, unet, vae, scheduler), path = tiny
    in_memory = TC.backend_of(processor, lmm, head, head_cfg, unet, vae, scheduler, path)
    loaded = load_backend(path)
    prompts = ["a red circle", "two blue squares and one triangle"]
    torch.testing.assert_close(loaded.features(prompts), in_memory.features(prompts), rtol=0, atol=0)
    for name in ("base", "head", "unet", "vae"):  # every weight and buffer round-trips exactly
        want, got = getattr(in_memory, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    images = np.stack([world.render([world.Obj(0, 1, "red", "circle")])] * 2)
    a = loaded.yes_no(images, [["is there a circle ?"], ["is there a square ?"]])
    b = in_memory.yes_no(images, [["is there a circle ?"], ["is there a square ?"]])
    # the same weights answer alike; not bit for bit: once in the full suite p(yes) differed by 1 ulp (float32
    # kernels can depend on where a tensor lies in memory, and the loaded weights lie elsewhere)
    for (ya, na), (yb, nb) in zip(a, b, strict=True):
        np.testing.assert_allclose(ya, yb, rtol=1e-6, atol=0)
        np.testing.assert_allclose(na, nb, rtol=1e-6, atol=0)
    decoded = loaded.decode(loaded.sample(prompts, [1, 2]), [1, 2])
    assert decoded.shape == (2, world.SIZE, world.SIZE, 3) and decoded.dtype == np.uint8


def test_dropdiv_changes_H_only_when_on(tiny):
    *_, path = tiny
    prompts = ["a red circle", "a blue square on the left of a green triangle"]
    plain = load_backend(path).features(prompts)
    off = load_backend(path, dropdiv_rate=0.0, dropdiv_layers=1)
    torch.testing.assert_close(off.sample(prompts, [1, 2]), plain, rtol=0, atol=0)
    on = load_backend(path, dropdiv_rate=0.3, dropdiv_layers=1)
    a, again, other = on.sample(prompts, [1, 2]), on.sample(prompts, [1, 2]), on.sample(prompts, [3, 4])
    torch.testing.assert_close(a, again, rtol=0, atol=0)  # seeded
    assert (a - plain).abs().amax(dim=(1, 2)).min() > 0 and (a - other).abs().amax(dim=(1, 2)).min() > 0
    torch.testing.assert_close(on.features(prompts), plain, rtol=0, atol=0)  # only while sampling


# -------------------------------------------------------------------------------------- loss wiring
class _Batch:
    def __init__(self, chosen, rejected):
        self.chosen_features, self.rejected_features = chosen, rejected


class _Out:
    def __init__(self, features):
        self.features = features


def _kernel(a: np.ndarray, b: np.ndarray, aggregation: str, distance: str) -> np.ndarray:
    agg = {"none": lambda h: h.reshape(len(h), -1), "avgpool": lambda h: h.mean(1), "maxpool": lambda h: h.max(1)}
    u, v = agg[aggregation](a.astype(np.float64)), agg[aggregation](b.astype(np.float64))
    if distance == "euclidean":
        return ((u - v) ** 2).sum(-1)
    return 1 - (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))


@pytest.mark.parametrize("aggregation", [a.value for a in KernelAggregation])
@pytest.mark.parametrize("distance", [d.value for d in KernelDistance])
def test_kernel_ablation_reaches_the_loss_from_config(aggregation, distance):
    """SILMM Table 3 in miniature: train.kernel_* of configs/toy_continuous.yaml select the KC-DPO kernel."""
    cfg = C.load(FULL, [f"train.kernel_aggregation={aggregation}", f"train.kernel_distance={distance}"])
    g = torch.Generator().manual_seed(0)
    policy, ref, chosen, rejected = (torch.randn(3, 8, 96, generator=g) for _ in range(4))
    out = pair_loss(cfg.train, cfg.train.loss, _Batch(chosen, rejected), _Out(policy), (ref,))
    p, r, w, losing = (x.numpy() for x in (policy, ref, chosen, rejected))
    k = lambda a, b: _kernel(a, b, aggregation, distance)  # noqa: E731
    margin = cfg.train.gamma * ((k(r, w) - k(p, w)) - (k(r, losing) - k(p, losing)))
    np.testing.assert_allclose(out.losses.numpy(), np.log1p(np.exp(-margin)), rtol=1e-4, atol=1e-6)

    sft = C.load(FULL, ["train.loss=sft", f"train.kernel_aggregation={aggregation}",
                        f"train.kernel_distance={distance}"])
    out = pair_loss(sft.train, sft.train.loss, _Batch(chosen, rejected), _Out(policy), (ref,))
    np.testing.assert_allclose(out.losses.numpy(), k(p, w), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ smoke run
@pytest.mark.parametrize("overrides", [[]], ids=["dropdiv_kcdpo"])
def test_continuous_smoke_run_writes_valid_shards_evaluations_and_report(tmp_path, overrides):
    cfg = smoke_config(tmp_path, "toyc_smoke", tmp_path / "lmm", *overrides)
    run = RunDir.create_or_open(cfg)
    run_driver(run)

    record = json.loads((tmp_path / "lmm" / "pretrain.json").read_text())
    assert record["key"]["continuous"]["vae_steps"] == cfg.toy.continuous.vae_steps
    for stage in SHARD_STAGES:
        for shard in range(run.num_shards(1)):
            read_shard(run.shard_path(1, stage, shard), stage, run.config_hash, 1, verify_checksums=True)
    samples = read_shard(run.shard_path(1, "samples", 0), "samples", run.config_hash, 1)
    assert samples["features"].shape[1:] == (cfg.toy.continuous.num_queries, cfg.toy.pretrain.hidden)
    for png in samples["image_png"][:2]:
        assert from_png(png).shape == (world.SIZE, world.SIZE, 3)
    read_shard(run.pairs_path(1), "pairs", run.config_hash, 1, verify_checksums=True)
    assert (run.model_dir(1) / "DONE").is_file()
    check_toy_evaluations(run)
    assert (run.path / "report" / "report.md").is_file()
    check_evaluation_draws_without_dropdiv(run)


def check_evaluation_draws_without_dropdiv(run: RunDir) -> None:
    """Iteration 0's stored evaluation images are the pretrained model's plain features decoded with the
    evaluation's seeds (its first batch, recomputed here): the paper evaluates without DropDiv."""
    cfg, toy = run.config, run.config.toy
    backend = DreamBackend.load(cfg.model, cfg.sampling)
    prompts = world.eval_prompts(toy.eval_prompts, toy.held_out_fraction)
    flat = [(i, j) for i in range(len(prompts)) for j in range(toy.eval_samples)][:cfg.sampling.batch_size]
    texts = [prompts[i] for i, _ in flat]
    seeds = [derive_seed(cfg.run.seed, 0, i, j, "toy-eval") for i, j in flat]
    plain = backend.decode(backend.features(texts).float(), seeds)
    dropdiv = backend.decode(backend.sample(texts, seeds), seeds)
    with np.load(run.path / "eval" / "iter_00_images.npz", allow_pickle=False) as data:
        stored = data["images"].reshape(-1, *data["images"].shape[2:])
    shown = min(len(stored), len(flat))
    assert shown >= 4
    # equal up to one level of rounding: the task ran under its own thread count, which changes float sums
    gap_plain = np.abs(stored[:shown].astype(int) - plain[:shown])
    gap_dropdiv = np.abs(stored[:shown].astype(int) - dropdiv[:shown])
    assert gap_plain.max() <= 1
    # the check can tell the two apart (measured: 0 pixels off the plain decode, 3996 of 18432 off DropDiv's)
    assert (gap_dropdiv > 0).sum() > 10 * max((gap_plain > 0).sum(), 1)
