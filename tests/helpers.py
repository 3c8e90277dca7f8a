"""Shared test helpers: tiny checkpoints (built once per session) and tiny runs."""

from __future__ import annotations

from pathlib import Path

from silmm import config as C
from silmm.rundir import RunDir

TINY_OVERRIDES = {
    "janus": ["sampling.samples_per_prompt=3", "sampling.batch_size=3"],
    "dream": ["sampling.samples_per_prompt=4", "sampling.batch_size=4", "sampling.decoder_steps=2",
              "sampling.dropdiv_layers=1", "pairs.top_k=2"],
    "emu3": ["sampling.samples_per_prompt=3", "sampling.batch_size=3", "sampling.image_height=4",
             "sampling.image_width=4", "sampling.guidance_scale=3.0"],
    "seed_llama": ["sampling.samples_per_prompt=3", "sampling.batch_size=3", "sampling.guidance_scale=1.0",
                   "sampling.decoder_steps=2",
                   r"train.lora.target_regex=model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"],
}


def tiny_config(root: Path, ckpt: Path, backend: str, *overrides: str) -> C.SilmmConfig:
    base = [f"run.root={root}", "run.name=run", f"model.backend={backend}", f"model.path={ckpt}",
            "prompts.count=6", "sharding.prompts_per_shard=3", "sharding.flush_every=1",
            "questions.max_questions=3", "questions.max_new_tokens=12", "feedback.batch_size=8",
            "train.max_steps=2", "train.warmup_steps=0", "train.batch_size=2", "train.grad_accum=1",
            "train.lora.r=4", "train.lora.alpha=4", "logging.progress=false"]
    return C.load(None, base + TINY_OVERRIDES[backend] + list(overrides))


def tiny_run(root: Path, ckpt: Path, backend: str, *overrides: str) -> RunDir:
    return RunDir.create_or_open(tiny_config(root, ckpt, backend, *overrides))


def break_prompts_shard(run: RunDir, shard: int = 0) -> None:
    """Put garbage where a prompts shard belongs: the questions task of that shard then fails."""
    bad = run.shard_path(1, "prompts", shard)
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not hdf5")


def assert_checkpointing_keeps_loss_and_grads(backend, layer, loss_fn, params, set_train) -> None:
    """Gradient checkpointing on: the same loss and gradients, and the layers really run twice (a pre-hook
    on ``layer``, a module inside a decoder layer, fires again when the backward recomputes it: transformers
    checkpoints the layer's forward, not its __call__ where hooks run); only in training mode.
    ``set_train(bool)`` switches the backend's training mode; ``loss_fn()`` is a differentiable scalar."""
    import torch

    calls: list[int] = []
    layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def run():
        calls.clear()
        loss = loss_fn()
        return loss.detach(), torch.autograd.grad(loss, params), len(calls)

    set_train(True)
    plain_loss, plain_grads, plain_calls = run()
    backend.enable_gradient_checkpointing()
    loss, grads, n_calls = run()
    assert (plain_calls, n_calls) == (1, 2)
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-6)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    set_train(False)
    assert run()[2] == 1


def full_logits_reference(logits, tokens):
    """The straightforward computation the chunked head replaces: full float32 log-softmax, gathered and
    summed; the mean entropy of the same logits."""
    import torch

    logits = logits.float()
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
    return logp, torch.distributions.Categorical(logits=logits).entropy().mean(-1)


def assert_chunked_logprobs_match(backend, prompts, tokens, chunks, ref_logp, ref_ent, params) -> None:
    """For each chunk size: ``sequence_logprobs`` (float32, entropy detached) and its gradients equal the
    full-logits reference's (``ref_logp`` differentiable w.r.t. ``params``)."""
    import torch

    weights = torch.tensor([1.0, -0.5])
    ref_grads = torch.autograd.grad((ref_logp * weights).sum(), params)
    for chunk in chunks:
        backend.logprob_chunk = chunk
        logp, ent = backend.sequence_logprobs(prompts, tokens, entropy=True)
        assert logp.dtype == ent.dtype == torch.float32 and not ent.requires_grad
        torch.testing.assert_close(logp, ref_logp.detach(), atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad((logp * weights).sum(), params)
        for got, want in zip(grads, ref_grads, strict=True):  # float32 rounding of sums of ~100 logits
            torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=1e-3)


def mark_model_done(model_dir: Path) -> None:
    """Stand in for the train job's last step: DONE listing every file of the model (what the driver checks)."""
    import json

    from silmm.fsutil import file_manifest
    from silmm.rundir import MODEL_DONE

    (model_dir / MODEL_DONE).write_text(json.dumps({"files": file_manifest(model_dir)}))


def check_toy_evaluations(run: RunDir, iterations: tuple[int, ...] = (0, 1)) -> None:
    """The toy evaluations of a finished run: every held-out prompt scored for each image, the means
    recomputable, and the stored images of the last iteration rescored to the recorded oracle numbers."""
    import json

    import numpy as np
    import pytest

    from silmm.toy import world

    toy = run.config.toy
    for iteration in iterations:
        ev = json.loads((run.path / "eval" / f"iter_{iteration:02d}.json").read_text())
        assert ev["iteration"] == iteration and len(ev["results"]) == toy.eval_prompts
        for r in ev["results"]:  # evaluation prompts are held out, and the oracle's numbers are recomputable
            assert world.is_held_out(r["prompt"], toy.held_out_fraction)
            assert len(r["oracle"]) == len(r["self_score"]) == toy.eval_samples
        assert ev["overall"] == pytest.approx(np.mean([x for r in ev["results"] for x in r["oracle"]]))
    last = iterations[-1]
    with np.load(run.path / "eval" / f"iter_{last:02d}_images.npz", allow_pickle=False) as data:
        ev = json.loads((run.path / "eval" / f"iter_{last:02d}.json").read_text())
        for prompt, images in zip(data["prompts"], data["images"], strict=True):
            stored = next(r for r in ev["results"] if r["prompt"] == prompt)
            assert [world.score(str(prompt), im).overall for im in images] == stored["oracle"]
