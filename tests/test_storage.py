"""Storage at paper scale (issue #17): half-precision H, pairs.h5 indexing rows of the samples shards, the
scores stage streaming its samples shard, best/worst images re-decoded from what the samples stage stored."""

from __future__ import annotations

import shutil
import tracemalloc

import h5py
import numpy as np
import pytest
import torch

import jobs.pairs as JP
import jobs.prompts as JPr
import jobs.samples as JS
import jobs.scores as JSc
from bench.scale import StandInJudge, synthetic_run
from silmm import store as S
from silmm.config import FeaturesDtype, TrainConfig
from silmm.inspection import verify_run
from silmm.losses import kcdpo_loss
from silmm.models import load_backend
from silmm.tasks import StageTask, output_problem, run_task
from silmm.trainer import PairsFile, TrainingError
from tests.helpers import tiny_run

HALF_ULP = 2.0 ** -11  # float16 rounding to nearest: |error| <= 2^-11 |x| (normal), 2^-25 (subnormal)


def _samples(run, shard: int = 0) -> S.Shard:
    return S.read_shard(run.shard_path(1, "samples", shard), stage="samples", config_hash=run.config_hash)


# --------------------------------------------------------------------------------- half-precision H
def test_float16_h_within_half_an_ulp_of_float32_and_float32_exact(tiny_checkpoints, tmp_path):
    """The samples stage on the tiny dream model with both store.features_dtype: float32 stores exactly what
    the model sampled; float16 stores its rounding (within half an ulp), and KC-DPO barely moves."""
    stored = {}
    for dtype in ("float32", "float16"):
        run = tiny_run(tmp_path / dtype, tiny_checkpoints("dream"), "dream", f"store.features_dtype={dtype}")
        JPr.run(run, 1, 0)
        JS.run(run, 1, 0)
        stored[dtype] = _samples(run)
    h32, r32 = stored["float32"]["features"], stored["float32"]["ref_features"]
    h16, r16 = stored["float16"]["features"], stored["float16"]["ref_features"]
    assert h32.dtype == r32.dtype == np.float32 and h16.dtype == r16.dtype == np.float16
    n = run.config.sampling.samples_per_prompt
    texts = list(S.read_shard(run.shard_path(1, "prompts", 0))["text"])
    z = load_backend(run, 1).sample([texts[0]] * n, stored["float32"]["seed"][:n].tolist())  # the stage's batch
    assert np.array_equal(h32[:n], z.numpy())  # float32: bit for bit
    for half, full in ((h16, h32), (r16, r32)):
        assert np.array_equal(half, full.astype(np.float16))  # the rounding of the float32 values...
        error = np.abs(half.astype(np.float32) - full)
        assert np.all(error <= HALF_ULP * np.abs(full) + 2.0 ** -25)  # ...so within half an ulp
        assert error.max() > 0  # (the tiny model's H is not already float16)
    # KC-DPO on the stored values: chosen sample 0, rejected 1, a policy at sample 2 (away from H_r)
    gamma = TrainConfig().gamma

    def kcdpo(h: np.ndarray, r: np.ndarray):
        h = torch.from_numpy(h.astype(np.float32)).reshape(len(r), n, *h.shape[1:])
        return kcdpo_loss(h[:, 2], torch.from_numpy(r.astype(np.float32)), h[:, 0], h[:, 1], gamma=gamma)

    full, half = kcdpo(h32, r32), kcdpo(h16, r16)
    torch.testing.assert_close(half.losses, full.losses, atol=1e-6, rtol=0)  # README: |delta loss| <= 5e-7
    torch.testing.assert_close(half.chosen_rewards - half.rejected_rewards,
                               full.chosen_rewards - full.rejected_rewards, atol=2e-6, rtol=0)


def test_float16_overflow_is_refused_naming_the_prompt():
    x = torch.zeros(2, 3, 4)
    x[1, 2, 0] = 7.0e4  # beyond float16's 65504: would become inf
    with pytest.raises(S.ShardError, match=r"shard_00000.h5: prompt 'two cats'.*70000.*store.features_dtype=float32"):
        JS.stored_features(x, FeaturesDtype.float16, ["a cube", "two cats"], "shard_00000.h5")
    assert np.array_equal(JS.stored_features(x, FeaturesDtype.float32, ["a", "b"], "s.h5"), x.numpy())
    y = torch.tensor([[[65504.0, -1e-8, 1 / 3]]])
    assert np.array_equal(JS.stored_features(y, FeaturesDtype.float16, ["a"], "s.h5"),
                          y.numpy().astype(np.float16).astype(np.float32))


def test_feature_columns_keep_their_precision_and_refuse_a_mix(tmp_path):
    meta = S.ShardMeta("samples", 1, 0, 1, "abc")
    rows = {"prompt_id": [1, 1], "sample_index": [0, 1], "seed": [1, 2], "image_png": [b"", b""],
            "ref_prompt_id": [1]}
    h = np.random.default_rng(0).normal(size=(2, 3, 4))
    for given, kept in ((np.float16, np.float16), (np.float32, np.float32), (np.float64, np.float32)):
        path = S.write_shard(tmp_path / f"{np.dtype(given).name}.h5", meta,
                             {**rows, "features": h.astype(given), "ref_features": h[:1].astype(given)})
        assert S.read_shard(path)["features"].dtype == kept
    with S.StreamWriter(tmp_path / "mix.h5", meta) as w, pytest.raises(S.ShardError, match="block of float32"):
        w.append({**rows, "features": h.astype(np.float16), "ref_features": h[:1].astype(np.float16)})
        w.append({**rows, "features": h.astype(np.float32), "ref_features": h[:1].astype(np.float32)})
    with h5py.File(tmp_path / "float16.h5", "a") as f:  # a dataset rewritten in another type
        del f["ref_features"]
        f["ref_features"] = np.zeros((1, 3, 4), np.int32)
    with pytest.raises(S.ShardError, match="dataset 'ref_features' is int32, expected float32 or float16"):
        S.read_shard(tmp_path / "float16.h5", verify_checksums=False)


# ------------------------------------------------------------------------------- pairs index rows
def test_pairs_file_reads_the_indexed_rows_and_refuses_a_changed_samples_shard(tmp_path):
    run = synthetic_run(tmp_path / "run", 12, per_shard=4, samples=5, L=3, D=8, top_k=2)
    JP.run(run, 1)
    options = S.StoreOptions.from_config(run.config.store)
    pairs = S.read_shard(run.pairs_path(1))
    samples = [_samples(run, i) for i in range(3)]
    pf = PairsFile(run.pairs_path(1), run.config_hash, 1, options)
    rows = np.array([len(pf) - 1, 0, 5, 0, len(pf) // 2, 17])  # any order, repeats, across shards
    got = pf.read(rows, with_reference=True)
    for k, row in enumerate(rows):
        sa = samples[pairs["samples_shard"][row]]
        for name, column, index in (("chosen_features", "features", "chosen_row"),
                                    ("rejected_features", "features", "rejected_row"),
                                    ("ref_features", "ref_features", "ref_row")):
            assert got[name].dtype == np.float32
            assert np.array_equal(got[name][k], sa[column][pairs[index][row]].astype(np.float32))
        assert sa["prompt_id"][pairs["chosen_row"][row]] == pairs["prompt_id"][row]
        assert sa["sample_index"][pairs["rejected_row"][row]] == pairs["rejected_index"][row]
    pf.close()
    assert verify_run(run) == []

    # samples shard 1 regenerated (other H): refused at open, naming it; `silmm verify` says so too
    other = synthetic_run(tmp_path / "other", 12, per_shard=4, samples=5, L=3, D=8, top_k=2, seed=1)
    shard1 = run.shard_path(1, "samples", 1)
    kept = tmp_path / "kept.h5"
    shutil.copy(shard1, kept)
    copy_for_run = S.read_shard(other.shard_path(1, "samples", 1)).data
    S.write_shard(shard1, S.ShardMeta("samples", 1, 1, 3, run.config_hash, _samples(run, 1).meta.extra),
                  copy_for_run, S.StoreOptions("none"))
    with pytest.raises(TrainingError, match=r"shard_00001.h5: \['features', 'ref_features'\] differ .* re-run the "
                                            "pairs stage"):
        PairsFile(run.pairs_path(1), run.config_hash, 1, options)
    assert [str(p) for p, problem in verify_run(run) if "indexes a bad samples shard" in problem] == \
        [str(run.pairs_path(1))]
    # the driver's completion test: stale pairs are not done (settle moves them aside, pairs runs again)
    pairs_task = StageTask(str(run.path), 1, "pairs")
    assert output_problem(run, pairs_task).startswith(f"stale: {shard1}: ['features', 'ref_features'] differ")
    shard1.unlink()  # removed (gc before the model was DONE)
    with pytest.raises(TrainingError, match="shard_00001.h5: shard does not exist"):
        PairsFile(run.pairs_path(1), run.config_hash, 1, options)
    shutil.copy(kept, shard1)
    PairsFile(run.pairs_path(1), run.config_hash, 1, options).close()  # the original again: fine
    assert output_problem(run, pairs_task) is None

    with h5py.File(run.pairs_path(1), "a") as f:  # the older layout copied the matrices into pairs.h5
        f["features"] = np.zeros((1, 3, 8), np.float32)
    with pytest.raises(TrainingError, match="older layout .*re-run the pairs stage"):
        PairsFile(run.pairs_path(1), run.config_hash, 1, options)


# ---------------------------------------------------------------------------------- scores stream
@pytest.mark.parametrize("images", ["all", "none"])
def test_scores_job_memory_does_not_grow_with_the_shard_size(tmp_path, monkeypatch, images):
    """The scores job holds one prompt's PNGs (images stored) or H (to decode) at a time: a shard 4x larger
    leaves its peak allocation where it was. (It read the whole shard at once.) A stand-in judge: no model."""
    monkeypatch.setattr(JSc, "load_judge", lambda *_: StandInJudge())
    monkeypatch.setattr(S, "_BLOCK_BYTES", 1 << 20)  # the checksums of the unread columns: 1 MiB blocks
    peaks = []
    for prompts in (8, 32):
        run = synthetic_run(tmp_path / f"{images}{prompts}", prompts, per_shard=prompts, samples=6, L=16, D=2048,
                            top_k=2, image_side=96 if images == "all" else 0, scores=False, store_images=images)
        tracemalloc.start()
        JSc.run(run, 1, 0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        scores = S.read_shard(run.shard_path(1, "scores", 0))
        assert scores["score"].tolist() == [0.25] * prompts * 6  # p(yes) - p(no) of the stand-in judge
    shard_bytes = 32 * 6 * (16 * 2048 * 2 if images == "none" else 96 * 96 * 3)
    assert peaks[1] < peaks[0] + shard_bytes / 8, (peaks, shard_bytes)


# ------------------------------------------------------------------------------ images at paper scale
@pytest.mark.parametrize("backend", ["janus", "dream"])
def test_best_worst_images_are_those_an_all_run_stored(tiny_checkpoints, tmp_path, backend):
    """store_images=best_worst: scoring re-decodes the stored tokens (janus) or float16 H (dream) with the
    decode seeds, and the PNGs it keeps are byte for byte those a store_images=all run stored."""
    shards = {}
    for images in ("all", "best_worst"):
        run = tiny_run(tmp_path / images, tiny_checkpoints(backend), backend, f"sampling.store_images={images}")
        for stage in ("prompts", "questions", "samples", "scores"):
            run_task(StageTask(str(run.path), 1, stage, 0))
        shards[images] = (_samples(run), S.read_shard(run.shard_path(1, "scores", 0)))
    stored, _ = shards["all"]
    samples, scores = shards["best_worst"]
    assert all(len(b) == 0 for b in samples["image_png"])
    kept = [r for r, png in enumerate(scores["image_png"]) if len(png)]
    assert len(kept) == 2 * len(set(scores["prompt_id"].tolist()))  # best and worst of each prompt
    assert scores["score"].tolist() == shards["all"][1]["score"].tolist()  # the same images were scored
    for r in kept:
        assert bytes(scores["image_png"][r]) == bytes(stored["image_png"][r])
