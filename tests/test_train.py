"""The training stage (jobs/train.py + silmm/trainer.py) with real DeepSpeed on CPU, both tiny backends.

Each test writes a tiny run and a synthetic-but-valid pairs.h5 (silmm.store.write_shard) holding samples
drawn from the tiny model itself and reference values computed by the backend under ``reference()``, so
the stored-reference path is exact. Random tiny models learn nothing meaningful: the tests check
plumbing, equalities and exactness, not learning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import jobs.pairs as P
import jobs.train as J
from silmm import distributed as D
from silmm import trainer as T
from silmm.backends.janus import JanusBackend
from silmm.config import Loss, ModelConfig, SamplingConfig, TrainConfig
from silmm.losses import kernel_distance
from silmm.models import load_backend
from silmm.store import ShardMeta, StoreOptions, read_shard, write_shard
from silmm.tasks import StageTask, run_task
from tests.helpers import tiny_run

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "two cats on a wooden table", "a dog to the left of a green car", "three blue spheres",
           "a small yellow bird", "a tree"]
TARGETED = re.compile(r".*language_model\.(model\.)?layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight")
# a short, fast schedule; lr high enough that every LoRA-targeted weight visibly moves
TRAIN = ["train.max_steps=4", "train.warmup_steps=1", "train.batch_size=2", "train.grad_accum=1", "train.lr=1e-3",
         "train.log_every=1", "train.checkpoint_every=2"]
DPO_KEYS = {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "lr", "grad_norm", "pairs_per_second",
            "entropy/image_tokens", "kl/reference", "logps/chosen_drift", "logps/rejected_drift"}
KCDPO_KEYS = {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "distance/policy_chosen", "distance/ref_chosen", "distance/policy_rejected", "distance/ref_rejected",
              "distance/chosen_rejected", "distance/policy_ref", "lr", "grad_norm", "pairs_per_second"}


# ------------------------------------------------------------------------------------ synthetic pairs
def _meta_columns(n: int) -> dict:
    return {"prompt_id": np.arange(n), "text": PROMPTS[:n], "category": ["color"] * n,
            "chosen_index": np.zeros(n, np.int32), "rejected_index": np.ones(n, np.int32),
            "chosen_score": np.ones(n, np.float32), "rejected_score": np.zeros(n, np.float32)}


@pytest.fixture(scope="module")
def janus_pairs(tiny_checkpoints) -> dict:
    """Two samples per prompt from the tiny Janus model, with their reference log-probs."""
    backend = JanusBackend.load(ModelConfig(path=str(tiny_checkpoints("janus"))), SamplingConfig())
    n = len(PROMPTS)
    tokens = backend.sample(PROMPTS * 2, list(range(2 * n)))
    with torch.no_grad(), backend.reference():
        ref = backend.sequence_logprobs(PROMPTS * 2, tokens)
    return {**_meta_columns(n), "chosen_tokens": tokens[:n].numpy(), "rejected_tokens": tokens[n:].numpy(),
            "chosen_ref_logprob": ref[:n].numpy(), "rejected_ref_logprob": ref[n:].numpy()}


@pytest.fixture(scope="module")
def dream_pairs(tiny_checkpoints, tmp_path_factory) -> dict:
    """DropDiv samples and the reference's deterministic features (float32: the stored reference is exact),
    2 pairs per prompt sharing them; the matrices go into a samples shard the pairs index (write_pairs)."""
    run = tiny_run(tmp_path_factory.mktemp("dream_pairs"), tiny_checkpoints("dream"), "dream")
    backend = load_backend(run, 1)
    n = 3
    prompts = PROMPTS[:n]
    features = backend.sample(prompts * 2, list(range(2 * n)))
    with torch.no_grad(), backend.reference():
        ref = backend.features(prompts)
    meta = _meta_columns(n)
    data = {k: np.concatenate([v, v]) if isinstance(v, np.ndarray) else v + v for k, v in meta.items()}
    data["prompt_id"] = np.concatenate([np.arange(n), np.arange(n)])
    samples = {"prompt_id": np.r_[np.arange(n), np.arange(n)], "sample_index": np.repeat([0, 1], n),
               "seed": np.arange(2 * n), "features": features.numpy(), "image_png": [b""] * 2 * n,
               "ref_prompt_id": np.arange(n), "ref_features": ref.numpy()}
    return {**data, "samples_shard": np.zeros(2 * n, np.int32), "chosen_row": np.r_[np.arange(n), np.arange(n) + n],
            "rejected_row": np.r_[np.arange(n) + n, np.arange(n)], "ref_row": np.r_[np.arange(n), np.arange(n)],
            SAMPLES: samples}


SAMPLES = "samples shard"  # continuous pairs data: the samples shard they index, written beside pairs.h5


def write_pairs(run, data: dict, config_hash: str | None = None) -> Path:
    data, extra = dict(data), {}
    samples = data.pop(SAMPLES, None)
    if samples is not None:
        path = write_shard(run.shard_path(1, "samples", 0), ShardMeta("samples", 1, 0, 2, run.config_hash), samples)
        extra["samples_shards"] = [P.samples_reference(run, 1, read_shard(path, columns=()))]
    meta = ShardMeta("pairs", 1, 0, 1, config_hash or run.config_hash, extra)
    return write_shard(run.pairs_path(1), meta, data)


def make_run(root: Path, ckpt: Path, backend: str, pairs: dict | None, *overrides: str):
    run = tiny_run(root, ckpt, backend, *TRAIN, *overrides)
    if pairs is not None:
        write_pairs(run, pairs)
    return run


def metrics(run) -> list[dict]:
    lines = (run.train_dir(1) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(run) -> list[float]:
    return [m["loss"] for m in metrics(run)]


# ------------------------------------------------------------------------------------------ pure parts
def test_micro_batch_math_and_clear_error():
    assert T.micro_batch_size(32, 4, 2) == 4
    assert T.micro_batch_size(8, 1, 1) == 8
    with pytest.raises(T.TrainingError, match="not divisible by train.grad_accum=4 x world size 3 = 12"):
        T.micro_batch_size(32, 4, 3)


def test_data_order_is_a_per_epoch_permutation_split_alike_for_any_world_size():
    order = T.DataOrder(10, seed=7)
    first_epoch = order.rows(0, 10)
    assert sorted(first_epoch) == list(range(10))
    assert sorted(order.rows(10, 10)) == list(range(10)) and list(order.rows(10, 10)) != list(first_epoch)
    # the global batch of a step is the same whether 1 rank runs 4 micro-batches or 2 ranks run 2 each
    one = np.concatenate([order.micro_rows(3, m, 0, 2, 1, 8) for m in range(4)])
    two = np.concatenate([order.micro_rows(3, m, r, 2, 2, 8) for m in range(2) for r in range(2)])
    assert sorted(one) == sorted(two)
    assert list(one) == list(order.rows(24, 8))


def test_warmup_cosine_schedule():
    f = T.WarmupCosine(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and 0 < f(11) < 0.05


@pytest.mark.parametrize(("gamma", "pair", "warns"), [(3.0, 0.09, True), (10.0, 0.094, True), (20.0, 0.09, True),
                                                     (30.0, 0.089, False), (1000.0, 0.09, False), (3.0, 1.0, False),
                                                     (3.0, 0.0, True), (3.0, None, False)])
def test_kcdpo_gamma_warning_when_gamma_x_chosen_rejected_distance_is_small(gamma, pair, warns):
    """The continuous toy's gamma sweep (chosen-rejected distance 0.09): gamma 3, 10 and 20 dragged H away and
    lost alignment, gamma 30 and 1000 did not."""
    t = TrainConfig(loss=Loss.kcdpo, gamma=gamma)
    values = {"loss": 0.69} if pair is None else {"loss": 0.69, "distance/chosen_rejected": pair}
    warning = T.kcdpo_gamma_warning(t, values)
    assert (warning is not None) == warns
    if warns and pair:
        reach = gamma * pair
        assert f"is {reach:.3g} < {T.KCDPO_MIN_REACH:g}" in warning
        assert f"about {T.KCDPO_MIN_REACH / pair:.3g}" in warning  # the gamma that lifts gamma x k(H_w, H_l) to the line
        assert "avgpool + cosine" in warning
    if warns and pair == 0.0:
        assert "chosen and rejected features are equal" in warning


def test_launcher_env_world_size_from_torchrun_slurm_and_default():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert D.launcher_env(torchrun) == torchrun
    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
             "SLURM_JOB_NODELIST": "gpu[07-08]"}
    env = D.launcher_env(slurm)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(D.job_port("1234"))}
    single = D.launcher_env({"SLURM_NTASKS": "1"})
    assert (single["RANK"], single["WORLD_SIZE"], single["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert D.first_host("node[03-05,9],gpu1") == "node03" and D.first_host("login1,login2") == "login1"


def test_stop_request_sets_a_flag_then_hands_over_to_the_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with T.StopRequest().installed() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            assert stop.signum == signal.SIGUSR2 and calls == []  # only a flag: training goes on
            with pytest.raises(SystemExit) as exc:
                stop.exit(3, "ckpt")
        assert calls == [signal.SIGUSR2] and exc.value.code == 128 + signal.SIGUSR2  # submitit's turn, then exit
    finally:
        signal.signal(signal.SIGUSR2, previous)


class _Engine:
    def __init__(self, state):
        self.state = state

    def save_checkpoint(self, root, tag, client_state, save_latest, exclude_frozen_parameters):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")

    def load_checkpoint(self, root, tag, load_module_strict):
        return f"{root}/{tag}", {"silmm": self.state}


def test_resume_refuses_a_checkpoint_of_another_layout(tmp_path):
    ckpts = T.Checkpoints(tmp_path, is_main=True, config_hash="0123456789abcdef")
    state = {"step": 2, "world_size": 2, "batch_size": 4}
    assert ckpts.save(_Engine(state), state) == "step_00000002" == ckpts.latest()
    assert ckpts.resume(_Engine(state), {"world_size": 2, "batch_size": 4}) == state
    with pytest.raises(T.TrainingError, match=r"different layout \{'world_size': \(2, 1\)\}"):
        ckpts.resume(_Engine(state), {"world_size": 1, "batch_size": 4})
    assert T.Checkpoints(tmp_path / "none", is_main=True, config_hash="0").resume(_Engine(state), {}) is None


def test_loss_that_does_not_fit_the_backend_is_refused(tiny_checkpoints, tmp_path):
    cfg = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus").config
    cfg.train.loss = Loss.kcdpo
    with pytest.raises(T.TrainingError, match="kcdpo does not fit the discrete backend"):
        T.check_loss(cfg, "discrete")
    cfg.train.loss = Loss.dpo
    with pytest.raises(T.TrainingError, match="holds continuous pairs"):
        T.check_loss(cfg, "continuous")


# ------------------------------------------------------------------------------------------- janus DPO
@pytest.fixture(scope="module")
def janus_run(tiny_checkpoints, janus_pairs, tmp_path_factory):
    """Iteration 1 trained through the stage task, as the driver runs it."""
    run = make_run(tmp_path_factory.mktemp("janus_run"), tiny_checkpoints("janus"), "janus", janus_pairs)
    stats = run_task(StageTask(str(run.path), 1, "train"))
    return run, stats


def test_janus_run_writes_metrics_adapter_model_and_done(janus_run):
    run, stats = janus_run
    assert stats["steps"] == 4 and stats["reference"] == "stored" and stats["world_size"] == 1
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert all(set(m) == DPO_KEYS for m in rows)
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at step 1
    assert all(np.isfinite(v) for m in rows for v in m.values())
    assert (run.train_dir(1) / "adapter" / "adapter_model.safetensors").is_file()
    assert (run.model_dir(1) / "DONE").is_file()
    assert sorted(p.name for p in (run.train_dir(1) / "checkpoints").glob("step_*")) == ["step_00000004"]
    # a finished iteration is skipped, by the task and by the job itself
    assert run_task(StageTask(str(run.path), 1, "train"))["skipped"]
    assert J.run(run, 1)["skipped"]


def test_exported_janus_model_differs_only_in_lora_targets(janus_run, tiny_checkpoints):
    run, _ = janus_run
    before = load_file(str(tiny_checkpoints("janus") / "model.safetensors"))
    after = load_file(str(run.model_dir(1) / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targeted = {k for k in before if TARGETED.fullmatch(k)}
    assert changed == targeted and len(targeted) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)


def test_iteration_2_reference_is_the_merged_model(janus_run, janus_pairs, tiny_checkpoints):
    run, _ = janus_run
    tokens = torch.from_numpy(janus_pairs["chosen_tokens"])
    base = JanusBackend.load(ModelConfig(path=str(tiny_checkpoints("janus"))), SamplingConfig())
    trained = JanusBackend.load(ModelConfig(path=str(tiny_checkpoints("janus"))), SamplingConfig())
    trained.load_adapter(run.train_dir(1) / "adapter", trainable=False)
    nxt = load_backend(run, 2)
    nxt.add_lora(run.config.train.lora)
    with torch.no_grad():
        with nxt.reference():
            ref2 = nxt.sequence_logprobs(PROMPTS, tokens)
        policy1 = trained.sequence_logprobs(PROMPTS, tokens)
        base1 = base.sequence_logprobs(PROMPTS, tokens)
    torch.testing.assert_close(ref2, policy1, atol=1e-4, rtol=0)  # merged = base + trained adapter
    assert (ref2 - base1).abs().max() > 100 * 1e-4  # and not the original base


def test_stored_reference_gives_the_losses_of_the_reference_forward(janus_run, tiny_checkpoints, janus_pairs, tmp_path):
    run, _ = janus_run
    forward = make_run(tmp_path, tiny_checkpoints("janus"), "janus", janus_pairs)
    assert J.run(forward, 1, reference="forward")["reference"] == "forward"
    np.testing.assert_allclose(losses(forward), losses(run), rtol=0, atol=2e-6)
    logps = [(m["logps/chosen"], m["logps/rejected"]) for m in metrics(forward)]
    np.testing.assert_allclose(logps, [(m["logps/chosen"], m["logps/rejected"]) for m in metrics(run)], atol=1e-4)


def test_zero3_gathers_before_export_and_matches_zero2(janus_run, tiny_checkpoints, janus_pairs, tmp_path):
    run, _ = janus_run
    z3 = make_run(tmp_path, tiny_checkpoints("janus"), "janus", janus_pairs, "train.zero_stage=3")
    J.run(z3, 1)
    np.testing.assert_allclose(losses(z3), losses(run), rtol=0, atol=1e-5)
    z2_weights = load_file(str(run.model_dir(1) / "model.safetensors"))
    z3_weights = load_file(str(z3.model_dir(1) / "model.safetensors"))
    for k, v in z2_weights.items():  # no empty tensor from a partitioned parameter
        torch.testing.assert_close(z3_weights[k], v, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- dream KC-DPO
def test_dream_kcdpo_run_and_export_changes_lora_targets_and_queries(tiny_checkpoints, dream_pairs, tmp_path, caplog):
    ckpt = tiny_checkpoints("dream")
    run = make_run(tmp_path, ckpt, "dream", dream_pairs, "train.batch_size=4", "train.grad_accum=2")
    with caplog.at_level(logging.WARNING, logger="jobs.train"):
        stats = J.run(run, 1)
    assert stats["reference"] == "stored"
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4] and all(set(m) == KCDPO_KEYS for m in rows)
    # the chosen-rejected kernel distance lies among the pairs' own (a batch mean), and the first logging
    # step's value decides the gamma warning, logged once
    feats = torch.from_numpy(dream_pairs[SAMPLES]["features"])
    k_wl = kernel_distance(feats[dream_pairs["chosen_row"]], feats[dream_pairs["rejected_row"]])
    assert all(k_wl.min() - 1e-6 <= m["distance/chosen_rejected"] <= k_wl.max() + 1e-6 for m in rows)
    warned = [r.getMessage() for r in caplog.records if "KC-DPO: train.gamma" in r.getMessage()]
    assert len(warned) == (run.config.train.gamma * rows[0]["distance/chosen_rejected"] < T.KCDPO_MIN_REACH)
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    out = run.model_dir(1)
    assert (out / "DONE").is_file()
    before, after = load_file(str(ckpt / "lmm" / "model.safetensors")), load_file(str(out / "lmm" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if TARGETED.fullmatch(k)} and len(changed) == 4 * 7
    head_before = load_file(str(ckpt / "dream_head" / "model.safetensors"))
    head_after = load_file(str(out / "dream_head" / "model.safetensors"))
    assert not torch.equal(head_before["queries"], head_after["queries"])  # the dream queries train
    for part in ("unet", "vae"):  # the decoder is frozen: copied byte for byte
        for f in (ckpt / "decoder" / part).iterdir():
            assert f.read_bytes() == (out / "decoder" / part / f.name).read_bytes()
    nxt = load_backend(run, 2)  # the exported model loads through the same code
    with torch.no_grad():
        assert nxt.features(PROMPTS[:2]).shape == (2, *dream_pairs[SAMPLES]["features"].shape[1:])
    saved = assert_checkpoint_holds_only_trainable_weights(run, "step_00000004")  # LoRA and the dream head
    assert any("lora_" in k for k in saved) and any(k.endswith("queries") for k in saved)


@pytest.mark.parametrize("backend, loss, keys", [
    ("janus", "ipo", DPO_KEYS),
    ("janus", "cdpo", DPO_KEYS),
    ("janus", "sft", {"step", "loss", "logps/chosen", "nll/per_token", "entropy/image_tokens", "lr",
                      "pairs_per_second"}),
    ("dream", "sft", {"step", "loss", "distance/policy_chosen", "lr", "pairs_per_second"}),
])
def test_other_losses_train(tiny_checkpoints, janus_pairs, dream_pairs, tmp_path, backend, loss, keys):
    pairs = janus_pairs if backend == "janus" else dream_pairs
    # grad_clip=0: no clipping (grad_norm is logged when DeepSpeed computes one, left out otherwise)
    smoothing = ["train.label_smoothing=0.1"] if loss == "cdpo" else []
    run = make_run(tmp_path, tiny_checkpoints(backend), backend, pairs, f"train.loss={loss}", "train.max_steps=2",
                   "train.grad_clip=0", *smoothing)
    stats = J.run(run, 1)
    assert stats["reference"] == ("none" if loss == "sft" else "stored")
    assert all(keys <= set(m) <= keys | {"grad_norm"} for m in metrics(run))
    assert (run.model_dir(1) / "DONE").is_file()


# ---------------------------------------------------------------------------------- resume, errors
def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # this process's world-size-1 group must not leak into the child
    return env


def test_local_train_job_ignores_the_drivers_own_process_group(tiny_checkpoints, janus_pairs, tmp_path,
                                                               monkeypatch):
    # A process that trained in-process (debug executor, these tests) keeps its group and its port; a local
    # train job that inherited RANK/MASTER_PORT would fail with EADDRINUSE on every attempt.
    import socket

    from silmm.driver import Driver

    run = make_run(tmp_path, tiny_checkpoints("janus"), "janus", janus_pairs, "train.max_steps=1",
                   "executor.kind=local", "executor.retries=0", "executor.poll_interval_s=0.1")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(held.getsockname()[1])}.items():
            monkeypatch.setenv(key, value)
        Driver(run).run_stage(1, "train")
        assert os.environ["MASTER_PORT"] == str(held.getsockname()[1])  # this process keeps its own group's
    assert (run.model_dir(1) / "DONE").is_file()


def test_sigusr2_checkpoints_and_resume_repeats_the_uninterrupted_losses(tiny_checkpoints, janus_pairs, tmp_path):
    steps = ["train.max_steps=24", "train.checkpoint_every=2"]
    ckpt = tiny_checkpoints("janus")
    whole = make_run(tmp_path / "whole", ckpt, "janus", janus_pairs, *steps)
    J.run(whole, 1)
    cut = make_run(tmp_path / "cut", ckpt, "janus", janus_pairs, *steps)
    latest = cut.train_dir(1) / "checkpoints" / "latest"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", "--run", str(cut.path), "--iteration", "1"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR2)  # after the checkpoint at step 2
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, output[-3000:]
    stopped_at = int(latest.read_text().strip().removeprefix("step_"))
    assert 2 <= stopped_at < 24 and not (cut.model_dir(1) / "DONE").exists()
    assert J.run(cut, 1)["resumed_from"] == stopped_at
    assert [m["step"] for m in metrics(cut)] == list(range(1, 25))
    np.testing.assert_allclose(losses(cut), losses(whole), rtol=0, atol=1e-6)


def test_empty_pairs_file_is_refused(tiny_checkpoints, janus_pairs, tmp_path):
    run = make_run(tmp_path, tiny_checkpoints("janus"), "janus", None)
    empty = {k: v[:0] for k, v in janus_pairs.items()}
    write_pairs(run, empty)
    with pytest.raises(T.TrainingError, match="holds no pairs"):
        J.run(run, 1)


def test_pairs_of_another_run_are_refused(tiny_checkpoints, janus_pairs, tmp_path):
    run = make_run(tmp_path, tiny_checkpoints("janus"), "janus", None)
    write_pairs(run, janus_pairs, config_hash="0123456789abcdef")
    with pytest.raises(T.TrainingError, match="differs from the run's .* another run"):
        J.run(run, 1)


def test_nan_loss_names_step_and_pair_and_keeps_last_good_checkpoint(tiny_checkpoints, janus_pairs, tmp_path):
    run = make_run(tmp_path, tiny_checkpoints("janus"), "janus", None, "train.checkpoint_every=1")
    t, seed = run.config.train, T.order_seed(run.config.run.seed, 1)
    pool, _ = T.heldout_split(janus_pairs["prompt_id"], t.heldout_fraction, t.heldout_max_pairs, seed)
    bad = int(T.DataOrder(len(PROMPTS), seed, pool).rows(2, 1)[0])  # the first pair of step 2 (batch size 2)
    data = dict(janus_pairs, chosen_ref_logprob=janus_pairs["chosen_ref_logprob"].copy())
    data["chosen_ref_logprob"][bad] = np.nan
    write_pairs(run, data)
    with pytest.raises(T.TrainingError, match=rf"step 2 \(micro-batch 1, batch of pairs.h5 rows \[{bad}\]\).*"
                                              r"last good checkpoint: .*step_00000001"):
        J.run(run, 1)
    assert (run.train_dir(1) / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (run.model_dir(1) / "DONE").exists()


# ------------------------------------------------------------------------------------- world size 2
@pytest.mark.slow
def test_world_size_2_matches_world_size_1(tiny_checkpoints, janus_pairs, tmp_path):
    # same global batch of 4: one rank x 4 pairs vs two ranks x 2 pairs; no LoRA dropout (its masks
    # depend on the micro-batch shape)
    opts = ["train.batch_size=4", "train.lora.dropout=0.0", "train.max_steps=3"]
    ckpt = tiny_checkpoints("janus")
    one = make_run(tmp_path / "one", ckpt, "janus", janus_pairs, *opts)
    J.run(one, 1)
    two = make_run(tmp_path / "two", ckpt, "janus", janus_pairs, *opts)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "jobs.train",
           "--run-dir", str(two.path), "--iteration", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["world_size"] == 2
    np.testing.assert_allclose(losses(two), losses(one), rtol=0, atol=1e-5)
    assert (two.model_dir(1) / "DONE").is_file()


# ------------------------------------------------------------------------- issue #11: at real size
def assert_checkpoint_holds_only_trainable_weights(run, step: str) -> dict[str, torch.Tensor]:
    """The DeepSpeed checkpoint's module state (loaded weights-only, as a resume loads it) holds exactly what
    the optimizer updates -- name, shape, element count -- and none of the frozen base weights."""
    (states,) = (run.train_dir(1) / "checkpoints" / step).glob("mp_rank_*_model_states.pt")
    with torch.serialization.safe_globals(T.deepspeed_safe_globals()):
        saved = torch.load(states, map_location="cpu", weights_only=True)["module"]
    backend = load_backend(run, 1)
    backend.add_lora(run.config.train.lora)
    updated = {id(p) for p in backend.trainable_parameters()}
    named = dict(T.Policy(backend).named_parameters(remove_duplicate=False))  # the names DeepSpeed saves under
    want = {n: p for n, p in named.items() if id(p) in updated}
    assert set(saved) == set(want)  # no frozen weight, no tied lm_head, no buffer
    assert all(saved[n].shape == p.shape for n, p in want.items())
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in backend.trainable_parameters())
    frozen = sum(p.numel() for p in {id(p): p for p in named.values() if id(p) not in updated}.values())
    assert frozen > 10 * sum(t.numel() for t in saved.values())  # what leaving them out saves, at tiny size
    return saved


def test_checkpoint_holds_only_trainable_weights(janus_run):
    run, _ = janus_run
    saved = assert_checkpoint_holds_only_trainable_weights(run, "step_00000004")
    assert all("lora_" in k for k in saved)


def test_bf16_training_exports_the_fp32_master_adapter_and_a_float32_merge(tiny_checkpoints, janus_pairs, tmp_path):
    # The CUDA path on the CPU: a bf16 model under DeepSpeed bf16 (ZeRO-2 keeps float32 master weights).
    ckpt = tiny_checkpoints("janus")
    run = make_run(tmp_path, ckpt, "janus", janus_pairs, "model.dtype=bfloat16")
    stats = J.run(run, 1)
    assert np.isfinite(stats["loss"]) and all(np.isfinite(m["loss"]) for m in metrics(run))
    adapter = load_file(str(run.train_dir(1) / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype for v in adapter.values()} == {torch.float32}
    b = torch.cat([v.flatten() for k, v in adapter.items() if "lora_B" in k])
    # the module copy is bf16: had the adapter come from it, every value would be bf16-representable
    assert (b.bfloat16().float() != b).float().mean() > 0.5
    base, merged = load_file(str(ckpt / "model.safetensors")), load_file(str(run.model_dir(1) / "model.safetensors"))
    assert {v.dtype for v in merged.values()} == {torch.float32}  # the input checkpoint's dtype
    lora = run.config.train.lora
    for key in [k for k in base if TARGETED.fullmatch(k)]:
        stem = key.removesuffix(".weight")
        a, bb = (next(v for k, v in adapter.items() if k.endswith(f"{stem}.lora_{x}.weight")) for x in "AB")
        # loaded in bf16, merged once in float32 from the float32 adapter, stored in float32
        expected = base[key].bfloat16().float() + (bb @ a) * (lora.alpha / lora.r)
        torch.testing.assert_close(merged[key], expected, atol=1e-7, rtol=0)


def _dropout_policy(ckpt, dropout: float):
    backend = JanusBackend.load(ModelConfig(path=str(ckpt)), SamplingConfig())
    torch.manual_seed(0)
    from silmm.config import LoraConfig

    backend.add_lora(LoraConfig(r=4, alpha=4, dropout=dropout,
                                target_regex=r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"))
    return T.Policy(backend)


@pytest.mark.parametrize("disable", [True, False])
def test_policy_forward_has_no_dropout_after_updates(tiny_checkpoints, janus_pairs, disable):
    policy = _dropout_policy(tiny_checkpoints("janus"), dropout=0.5)
    if disable:
        assert T.disable_dropout(policy) == 14  # LoRA dropout of 2 layers x 7 projections
    batch = T.PairsFile.to_batch({"rows": np.arange(2), "text": PROMPTS[:2],
                                  "chosen_tokens": janus_pairs["chosen_tokens"][:2],
                                  "rejected_tokens": janus_pairs["rejected_tokens"][:2],
                                  "chosen_ref_logprob": janus_pairs["chosen_ref_logprob"][:2],
                                  "rejected_ref_logprob": janus_pairs["rejected_ref_logprob"][:2]}, torch.device("cpu"))
    opt = torch.optim.SGD(policy.backend.trainable_parameters(), lr=0.05)
    policy.train()
    for _ in range(3):  # after a few updates LoRA's B is not zero: dropout would now change the outputs
        out = policy(batch)
        T.pair_loss(TrainConfig(beta=0.2), Loss.dpo, batch, out,
                    (batch.chosen_ref_logps, batch.rejected_ref_logps)).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = policy(batch).chosen_logps
        policy.eval()
        evaluated = policy(batch).chosen_logps
    if disable:
        assert torch.equal(trained, evaluated)
    else:
        assert not torch.allclose(trained, evaluated, atol=1e-3)


def test_heldout_split_keeps_whole_prompts_and_is_seeded():
    ids = np.repeat(np.arange(50), 4)  # 50 prompts x 4 pairs
    train, held = T.heldout_split(ids, 0.2, 1000, seed=3)
    assert len(train) + len(held) == 200 and not set(train) & set(held)
    assert not set(ids[train]) & set(ids[held])  # a prompt is on one side only
    assert 0 < len(held) <= 0.4 * 200
    again, held_again = T.heldout_split(ids, 0.2, 1000, seed=3)
    assert np.array_equal(held, held_again) and not np.array_equal(held, T.heldout_split(ids, 0.2, 1000, seed=4)[1])
    assert len(T.heldout_split(ids, 0.2, 10, seed=3)[1]) <= 8  # capped at whole prompts
    assert len(T.heldout_split(ids, 0.0, 10, seed=3)[1]) == 0
    assert len(T.heldout_split(np.zeros(5, int), 0.99, 100, seed=0)[0]) == 5  # one prompt: kept for training


def test_prefetcher_reads_what_inline_reads_in_order(tiny_checkpoints, janus_pairs, tmp_path):
    run = make_run(tmp_path, tiny_checkpoints("janus"), "janus", janus_pairs)
    pairs = T.PairsFile(run.pairs_path(1), run.config_hash, 1, StoreOptions())
    schedule = [np.array([i % 6, (i * 5) % 6]) for i in range(7)]
    inline = T.Prefetcher(pairs, schedule, True, depth=0)
    ahead = T.Prefetcher(pairs, schedule, True, depth=3)
    try:
        for _ in schedule:
            a, b = inline.next(), ahead.next()
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        with pytest.raises(StopIteration):
            ahead.next()
    finally:
        ahead.close()
        pairs.close()


def test_ipo_mean_normalisation_and_heldout_metrics_in_a_run(tiny_checkpoints, janus_pairs, tmp_path):
    run = make_run(tmp_path, tiny_checkpoints("janus"), "janus", janus_pairs, "train.loss=ipo",
                   "train.heldout_fraction=0.4", "train.eval_every=2", "train.beta=0.5")
    stats = J.run(run, 1)
    assert stats["heldout_pairs"] > 0 and stats["pairs"] + stats["heldout_pairs"] == len(PROMPTS)
    assert "averaged over the image tokens" in stats["loss_function"]
    rows = metrics(run)
    assert [("eval/loss" in m) for m in rows] == [False, True, False, True]
    # at step 1 policy == reference: IPO's loss is (0 - 1/(2 beta))^2 = 1 whatever the normalisation
    assert rows[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    t = run.config.train
    n_tokens = janus_pairs["chosen_tokens"].shape[1]
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-10.0, -20.0, -11.0, -19.0))
    batch = T.PairBatch(rows=np.zeros(1), prompts=["p"], chosen_tokens=torch.zeros(1, n_tokens, dtype=torch.long))
    out = T.pair_loss(t, Loss.ipo, batch, T.PolicyOut(pc, pr), (rc, rr))
    assert out.loss.item() == pytest.approx(((1.0 - (-1.0)) / n_tokens - 1 / (2 * 0.5)) ** 2)


def test_logged_metrics_are_means_since_the_previous_line(janus_run, tiny_checkpoints, janus_pairs, tmp_path):
    run, _ = janus_run  # log_every=1: one line per step
    every2 = make_run(tmp_path, tiny_checkpoints("janus"), "janus", janus_pairs, "train.log_every=2")
    J.run(every2, 1)
    per_step = metrics(run)
    assert [m["step"] for m in metrics(every2)] == [2, 4]
    for line, (a, b) in zip(metrics(every2), zip(per_step[::2], per_step[1::2], strict=True), strict=True):
        for key in ("loss", "rewards/margins", "entropy/image_tokens", "kl/reference"):
            assert line[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-6, abs=1e-9)


def test_a_joined_group_gets_its_variables_back(janus_run, monkeypatch):
    # submitit's debug executor restores the environment after an in-process job: the group stays, its
    # variables go, and DeepSpeed's next engine asserts LOCAL_RANK
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = D.init(torch.device("cpu"))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert (env.rank, env.world_size) == (0, 1)
