"""Stages 1-4 and pair selection with both tiny backends, run as the executors run them (StageTask)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from silmm import feedback as F
from silmm import store as S
from silmm.images import from_png
from silmm.inspection import stage_status, verify_run
from silmm.models import load_backend
from silmm.seeding import decode_seed, derive_seed, fixed_decode_seed
from silmm.tasks import StageTask, run_task
from tests.helpers import mark_model_done, tiny_run
from tests.test_store import content as shard_content

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prompts", "questions", "samples", "scores")


def run_iteration(run, iteration=1):
    for stage in STAGES:
        for shard in range(run.config.num_shards):
            run_task(StageTask(str(run.path), iteration, stage, shard))
    return run_task(StageTask(str(run.path), iteration, "pairs"))


@pytest.fixture(scope="module", params=["janus", "dream"])
def done_run(request, tiny_checkpoints, tmp_path_factory):
    backend = request.param
    run = tiny_run(tmp_path_factory.mktemp(f"stages_{backend}"), tiny_checkpoints(backend), backend)
    stats = run_iteration(run)
    return backend, run, stats


def read(run, stage, shard, **kw):
    return S.read_shard(run.shard_path(1, stage, shard), stage=stage, config_hash=run.config_hash, **kw)


def test_every_shard_valid_and_consistent(done_run):
    backend, run, stats = done_run
    assert verify_run(run) == []
    ids = np.concatenate([read(run, "prompts", i)["prompt_id"] for i in range(2)])
    assert ids.tolist() == list(range(6))
    n = run.config.sampling.samples_per_prompt
    for i in range(2):
        prompts, questions = read(run, "prompts", i), read(run, "questions", i)
        samples, scores = read(run, "samples", i), read(run, "scores", i)
        assert questions["prompt_id"].tolist() == prompts["prompt_id"].tolist()
        assert (questions["question_count"] >= 1).all()
        assert samples["prompt_id"].tolist() == np.repeat(prompts["prompt_id"], n).tolist()
        assert samples["sample_index"].tolist() == list(range(n)) * len(prompts["prompt_id"])
        expected = [derive_seed(0, 1, int(p), int(j), "sample") for p, j in zip(samples["prompt_id"],
                                                                                  samples["sample_index"], strict=True)]
        assert samples["seed"].tolist() == expected
        # scores: per sample the questions of its prompt, and Eq. 1 exactly
        qcount = dict(zip(questions["prompt_id"].tolist(), questions["question_count"].tolist(), strict=True))
        assert scores["question_count"].tolist() == [qcount[int(p)] for p in scores["prompt_id"]]
        offsets = np.concatenate([[0], np.cumsum(scores["question_count"])])
        for r in range(len(scores["score"])):
            y, no = scores["p_yes"][offsets[r]:offsets[r + 1]], scores["p_no"][offsets[r]:offsets[r + 1]]
            assert scores["score"][r] == np.float32(F.vqa_score(y, no))
            assert ((y > 0) & (no > 0) & (y + no <= 1 + 1e-6)).all()
    assert stats["pairs"] > 0


def test_samples_hold_what_was_sampled_and_exact_reference_values(done_run):
    backend, run, _ = done_run
    model = load_backend(run, 1)
    samples, prompts = read(run, "samples", 0), read(run, "prompts", 0)
    text = dict(zip(prompts["prompt_id"].tolist(), prompts["text"], strict=True))
    n = run.config.sampling.samples_per_prompt
    first = [text[int(p)] for p in samples["prompt_id"][:n]]
    z = model.sample(first, samples["seed"][:n].tolist())  # same batch as the stage formed
    if backend == "dream":  # stored in store.features_dtype (float16 by default), decoded as stored
        assert samples["features"].dtype == samples["ref_features"].dtype == np.float16
        z = z.half().float()
    images = model.decode(z, [derive_seed(0, 1, int(samples["prompt_id"][0]), j, "decode") for j in range(n)])
    stored_images = np.stack([from_png(b) for b in samples["image_png"][:n]])
    assert np.array_equal(images, stored_images)  # PNG is lossless
    with torch.no_grad(), model.reference():
        if backend == "janus":
            assert torch.equal(z, torch.from_numpy(samples["tokens"][:n]))
            ref = model.sequence_logprobs(first, z).float().numpy()
            np.testing.assert_allclose(samples["ref_logprob"][:n], ref, rtol=1e-5, atol=1e-4)
        else:
            np.testing.assert_array_equal(samples["features"][:n], z.numpy().astype(np.float16))
            ref = model.features(list(prompts["text"])).float().numpy()
            np.testing.assert_allclose(samples["ref_features"], ref, atol=1e-5, rtol=2**-11)
            assert samples["ref_prompt_id"].tolist() == prompts["prompt_id"].tolist()


def test_pairs_file_has_what_training_needs(done_run):
    backend, run, _ = done_run
    pairs = S.read_shard(run.pairs_path(1), stage="pairs", config_hash=run.config_hash, verify_checksums=True)
    assert (pairs["chosen_score"] > pairs["rejected_score"]).all()
    scores = {}
    samples = {}
    for i in range(2):
        sc, sa = read(run, "scores", i), read(run, "samples", i)
        for r, (p, j) in enumerate(zip(sc["prompt_id"].tolist(), sc["sample_index"].tolist(), strict=True)):
            scores[p, j] = sc["score"][r]
        for r, (p, j) in enumerate(zip(sa["prompt_id"].tolist(), sa["sample_index"].tolist(), strict=True)):
            samples[p, j] = r, i
    for k, pid in enumerate(pairs["prompt_id"].tolist()):
        c, r = int(pairs["chosen_index"][k]), int(pairs["rejected_index"][k])
        assert pairs["chosen_score"][k] == scores[pid, c] and pairs["rejected_score"][k] == scores[pid, r]
        row, shard = samples[pid, c]
        sa = read(run, "samples", shard)
        if backend == "janus":
            assert np.array_equal(pairs["chosen_tokens"][k], sa["tokens"][row])
            assert pairs["chosen_ref_logprob"][k] == sa["ref_logprob"][row]
        else:
            assert (pairs["samples_shard"][k], pairs["chosen_row"][k]) == (shard, row)
            assert (pairs["samples_shard"][k], pairs["rejected_row"][k]) == samples[pid, r][::-1]
            assert pairs["ref_row"][k] == sa["ref_prompt_id"].tolist().index(pid)
    summary = json.loads((run.iter_dir(1) / "pairs_summary.json").read_text())
    assert summary["counts"]["pairs"] == len(pairs["prompt_id"]) and summary["counts"]["prompts"] == 6


def test_complete_task_is_skipped(done_run):
    _, run, _ = done_run
    path = run.shard_path(1, "samples", 0)
    before = path.stat().st_mtime_ns
    assert run_task(StageTask(str(run.path), 1, "samples", 0))["skipped"] is True
    assert path.stat().st_mtime_ns == before


def test_prompts_do_not_depend_on_the_number_of_shards(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("janus")
    texts = {}
    for per_shard in (2, 6):
        run = tiny_run(tmp_path / str(per_shard), ckpt, "janus", f"sharding.prompts_per_shard={per_shard}",
                       "prompts.categories={color: 1, non_spatial: 1, numeracy: 1}")
        rows = []
        for i in range(run.config.num_shards):
            run_task(StageTask(str(run.path), 1, "prompts", i))
            p = read(run, "prompts", i)
            rows += list(zip(p["prompt_id"].tolist(), p["text"], p["category"], strict=True))
        texts[per_shard] = rows
    assert texts[2] == texts[6]
    assert len({t.lower() for _, t, _ in texts[2]}) == 6


def test_pairs_refuses_missing_shards_with_a_list(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")
    for shard in range(2):
        run_task(StageTask(str(run.path), 1, "prompts", shard))
    with pytest.raises(S.ShardError) as err:
        run_task(StageTask(str(run.path), 1, "pairs"))
    msg = str(err.value)
    assert "4 shard(s) missing or bad" in msg and "samples/shard_00001.h5" in msg and "scores/shard_00000.h5" in msg


@pytest.mark.slow
def test_killed_samples_task_resumes_to_identical_shard(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints("janus")
    overrides = ("prompts.count=8", "sharding.prompts_per_shard=8", "sampling.samples_per_prompt=4",
                 "sampling.batch_size=2")
    ref = tiny_run(tmp_path / "ref", ckpt, "janus", *overrides)
    run = tiny_run(tmp_path / "killed", ckpt, "janus", *overrides)
    assert ref.config_hash == run.config_hash
    for r in (ref, run):
        run_task(StageTask(str(r.path), 1, "prompts", 0))
    run_task(StageTask(str(ref.path), 1, "samples", 0))

    progress_dir = run.stage_dir(1, "samples") / "shard_00000.h5.progress"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.samples", "--run", str(run.path), "--iteration", "1",
                             "--shard", "0"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(progress_dir.glob("part_00001.h5")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    final = run.shard_path(1, "samples", 0)
    assert not final.exists(), "the task finished before it could be interrupted"
    done_before = len(list(progress_dir.glob("part_*.h5")))
    assert 2 <= done_before < 8
    stats = run_task(StageTask(str(run.path), 1, "samples", 0))
    assert stats["computed"] == 8 - done_before
    assert shard_content(final) == shard_content(ref.shard_path(1, "samples", 0))

    def metadata(path):  # every attribute but the write time (and the checksum that covers it)
        return {k: v for k, v in S.read_shard(path, columns=()).attrs.items() if k not in ("created", "attrs_checksum")}

    assert metadata(final) == metadata(ref.shard_path(1, "samples", 0))


def test_checkpoint_flushes_pending_progress(tiny_checkpoints, tmp_path):
    from silmm.tasks import open_writer

    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "sharding.flush_every=4")
    writer = open_writer(run, 1, "questions", 0, 2)
    writer.add(0, {"prompt_id": [0], "question_count": [1], "fallback": [False], "question": ["Is it red?"]})
    assert writer.pending and not writer.parts
    task = StageTask(str(run.path), 1, "questions", 0)
    resubmission = task.checkpoint()
    assert not writer.pending and len(writer.parts) == 1
    assert resubmission.function is task
    assert S.ShardWriter(run.shard_path(1, "questions", 0), writer.meta).done == {0}


@pytest.mark.slow
def test_usr2_flushes_unflushed_progress_and_resume_is_identical(tiny_checkpoints, tmp_path):
    """What slurm/sbatch/stage.sh relies on: USR2 makes a direct-run task save its progress and exit."""
    ckpt = tiny_checkpoints("janus")
    overrides = ("prompts.count=24", "sharding.prompts_per_shard=24", "questions.batch_size=8",
                 "questions.max_new_tokens=24")
    ref = tiny_run(tmp_path / "ref", ckpt, "janus", *overrides)
    run = tiny_run(tmp_path / "sig", ckpt, "janus", *overrides, "sharding.flush_every=100")
    for r in (ref, run):
        run_task(StageTask(str(r.path), 1, "prompts", 0))
    run_task(StageTask(str(ref.path), 1, "questions", 0))
    log_file = run.logs_dir / "iter_01" / "questions_00000.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.questions", "--run", str(run.path), "--iteration", "1",
                             "--shard", "0"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # preempt once the first batch of 8 is recorded (pending: flush_every is 100) and more are running
    while time.time() < deadline and proc.poll() is None and "questions shard 0: 1/3" not in (
            log_file.read_text() if log_file.exists() else ""):
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGUSR2)
    assert proc.wait(timeout=60) == 128 + signal.SIGUSR2
    assert not run.shard_path(1, "questions", 0).exists()
    writer = S.ShardWriter(run.shard_path(1, "questions", 0), S.ShardMeta("questions", 1, 0, 1, run.config_hash))
    assert len(writer.done) in (8, 16)  # flushed by the handler, not by the flush interval (100)
    run_task(StageTask(str(run.path), 1, "questions", 0))
    assert shard_content(run.shard_path(1, "questions", 0)) == shard_content(ref.shard_path(1, "questions", 0))


def test_prompt_files_and_best_worst_images_through_the_stages(tiny_checkpoints, tmp_path):
    """prompts.source=files and sampling.store_images=best_worst: samples keep no images, scoring decodes
    the stored tokens again with the same seeds, and keeps the PNG of each prompt's best and worst."""
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "color_val.txt").write_text("A red apple\nA blue cup\n\nA red apple\n")
    (folder / "spatial_val.txt").write_text("A cat on the left of a dog\n")
    run = tiny_run(tmp_path / "r", tiny_checkpoints("janus"), "janus", "prompts.source=files",
                   f"prompts.files={folder}", "sharding.prompts_per_shard=2", "sampling.store_images=best_worst")
    run_task(StageTask(str(run.path), 1, "prompts", 0))
    first = read(run, "prompts", 0)
    assert first.meta.shard_count == 2 and first.meta.extra["file_counts"] == {"empty": 1, "duplicate": 1,
                                                                                  "kept": 3}
    for stage in STAGES:
        for shard in range(2):
            run_task(StageTask(str(run.path), 1, stage, shard))
    texts = [t for i in range(2) for t in read(run, "prompts", i)["text"]]
    status = stage_status(run, 1, "samples")  # the files, not prompts.count (6), decide the shard count
    assert status.expected == 2 and status.missing == 0 and len(status.done) == 2
    assert texts == ["A red apple", "A blue cup", "A cat on the left of a dog"]
    samples, scores = read(run, "samples", 0), read(run, "scores", 0)
    assert all(len(b) == 0 for b in samples["image_png"])
    model = load_backend(run, 1)
    n = run.config.sampling.samples_per_prompt
    for start in range(0, len(scores["score"]), n):
        rows = range(start, start + n)
        kept = [r for r in rows if len(scores["image_png"][r])]
        order = np.argsort(-scores["score"][start:start + n], kind="stable")
        assert sorted(kept) == sorted({start + int(order[0]), start + int(order[-1])})
        seeds = [derive_seed(0, 1, int(samples["prompt_id"][r]), int(samples["sample_index"][r]), "decode")
                 for r in rows]
        # the same batch as the stage decoded: conv kernels may round differently for another batch size
        again = model.decode(torch.from_numpy(samples["tokens"][start: start + n]), seeds)
        for r in kept:
            assert np.array_equal(from_png(scores["image_png"][r]), again[r - start])


@pytest.mark.parametrize("noise,store", [("per_prompt", "all"), ("per_prompt", "best_worst"), ("fixed", "all"),
                                         ("fixed", "best_worst")])
def test_decoder_noise_decodes_a_prompts_samples_from_one_noise(tiny_checkpoints, tmp_path, noise, store):
    """sampling.decoder_noise=per_prompt: every sample of a prompt is decoded from sample 0's decode seed;
    fixed: every sample of every prompt from the run's one seed. So decode the samples stage (store_images=all)
    and scoring, which decodes the stored features again when the samples keep no images (best_worst): the
    images equal that decode, not the per-sample one."""
    run = tiny_run(tmp_path, tiny_checkpoints("dream"), "dream", f"sampling.decoder_noise={noise}",
                   f"sampling.store_images={store}")
    for stage in STAGES:
        run_task(StageTask(str(run.path), 1, stage, 0))
    samples, scores = read(run, "samples", 0), read(run, "scores", 0)
    model = load_backend(run, 1)
    n = run.config.sampling.samples_per_prompt
    pngs = samples["image_png"] if store == "all" else scores["image_png"]
    pids = sorted({int(p) for p in samples["prompt_id"]})
    assert len(pids) >= 2
    for first in (0, len(samples["prompt_id"]) - n):  # the first and the last prompt of the shard
        pid = int(samples["prompt_id"][first])
        features = torch.from_numpy(samples["features"][first: first + n].astype(np.float32))
        seed = fixed_decode_seed(0) if noise == "fixed" else derive_seed(0, 1, pid, 0, "decode")
        shared = model.decode(features, [seed] * n)
        own = model.decode(features, [derive_seed(0, 1, pid, j, "decode") for j in range(n)])
        kept = [r for r in range(n) if len(pngs[first + r])]
        assert len(kept) == (n if store == "all" else 2)
        assert all(np.array_equal(from_png(pngs[first + r]), shared[r]) for r in kept)
        assert any(not np.array_equal(shared[r], own[r]) for r in kept)
    assert fixed_decode_seed(0) != fixed_decode_seed(1)  # the run seed still decides the one noise


class MeanPixelScorer:
    """A stand-in external judge for feedback.method=scorer: an image's mean pixel, a score every image has
    its own of (the toy's oracle would give a random tiny model's images all 0)."""

    name, benchmarks, version = "mean_pixel", None, "1"
    seen: list = []

    def __init__(self, ctx):
        MeanPixelScorer.seen.append(ctx.iteration)

    def score(self, prompts, images):
        from silmm.eval.records import ImageAnswers

        return [[ImageAnswers(score=float(im.mean()) / 255, questions=[], p_yes=[], p_no=[], answers=[], correct=[])
                 for im in imgs] for imgs in images]


@pytest.mark.parametrize("images", ["all", "none"])
def test_scorer_feedback_scores_each_sample_with_the_named_scorer(tiny_checkpoints, tmp_path, monkeypatch, images):
    import jobs.scores as scores_job
    from silmm.eval import scorers

    monkeypatch.setitem(scorers.SCORERS, "mean_pixel", "tests.test_stages:MeanPixelScorer")
    MeanPixelScorer.seen.clear()
    run = tiny_run(tmp_path, tiny_checkpoints("dream"), "dream", "feedback.method=scorer",
                   "feedback.scorer=mean_pixel", f"sampling.store_images={images}")
    for stage in STAGES[:3]:
        run_task(StageTask(str(run.path), 1, stage, 0))
    loads = []  # the models the scores stage loads: none when the images are stored, the decoder otherwise
    for name in ("load_judge", "load_backend"):
        real = getattr(scores_job, name)
        monkeypatch.setattr(scores_job, name, lambda *a, _real=real, _name=name: loads.append(_name) or _real(*a))
    run_task(StageTask(str(run.path), 1, "scores", 0))
    samples, scores = read(run, "samples", 0), read(run, "scores", 0)
    assert loads == ([] if images == "all" else ["load_backend"])
    if images == "all":
        want = [float(from_png(png).mean()) / 255 for png in samples["image_png"]]
    else:  # the stage's own decode of the stored features, with the samples stage's seeds
        backend = load_backend(run, 1)
        feats = torch.from_numpy(samples["features"].astype(np.float32))
        seeds = [decode_seed(run.config.run.seed, 1, int(p), int(j))
                 for p, j in zip(samples["prompt_id"], samples["sample_index"], strict=True)]
        rows_of = {}
        for row, pid in enumerate(samples["prompt_id"]):
            rows_of.setdefault(int(pid), []).append(row)
        want = [0.0] * len(seeds)
        for rows in rows_of.values():  # one prompt per decode, as the stage decodes
            for r, im in zip(rows, backend.decode(feats[rows], [seeds[r] for r in rows]), strict=True):
                want[r] = float(im.mean()) / 255
    assert list(scores["prompt_id"]) == list(samples["prompt_id"])
    assert np.array_equal(scores["score"], np.asarray(want, np.float32)) and len(set(want)) > 1
    assert not scores["p_yes"].any() and not scores["p_no"].any()  # the model answered nothing
    assert scores.meta.extra["method"] == "scorer" and MeanPixelScorer.seen == [0]  # judged iteration 1's draws


def test_decode_seed_modes():
    from silmm.seeding import decode_seed

    per_sample = {decode_seed(0, 1, pid, j) for pid in (3, 4) for j in range(3)}
    assert len(per_sample) == 6
    assert {decode_seed(0, 1, 3, j, "per_prompt") for j in range(3)} == {derive_seed(0, 1, 3, 0, "decode")}
    assert {decode_seed(0, it, pid, j, "fixed") for it in (1, 2) for pid in (3, 4) for j in range(3)} == \
        {fixed_decode_seed(0)}
    with pytest.raises(ValueError, match="sampling.decoder_noise: unknown value 'per_image'"):
        decode_seed(0, 1, 3, 0, "per_image")


@pytest.mark.parametrize("judge", ["policy", "base", "path"])
def test_judge_base_keeps_iteration_zeros_questions_and_answers(tiny_checkpoints, tmp_path, judge):
    # iteration 2 starts from a model that differs from model.path (here: another random init); "path": a
    # separate judge checkpoint (feedback.judge_path, e.g. Emu3-Chat beside Emu3-Gen), a third random init
    from silmm.models import build_tiny

    choice = f"feedback.judge={judge}"
    if judge == "path":
        choice = f"feedback.judge_path={build_tiny('janus', tmp_path / 'judge', seed=2)}"
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", choice, "run.iterations=2",
                   "sampling.store_images=none")
    build_tiny("janus", run.model_dir(1), seed=1)
    mark_model_done(run.model_dir(1))
    for stage in STAGES:
        run_task(StageTask(str(run.path), 2, stage, 0))
    read2 = {stage: S.read_shard(run.shard_path(2, stage, 0), stage=stage, config_hash=run.config_hash)
             for stage in ("prompts", "questions", "samples", "scores")}
    base, policy = load_backend(run, 1), load_backend(run, 2)
    separate = load_backend(run, 2, tmp_path / "judge") if judge == "path" else None
    expected = {"policy": policy, "base": base, "path": separate}[judge]
    # questions: the judge's greedy text (seeds unused at temperature 0)
    texts = list(read2["prompts"]["text"])
    first = stage_questions(expected, texts[0], run)
    count = int(read2["questions"]["question_count"][0])
    assert list(read2["questions"]["question"][:count]) == first
    # answers: the judge's p(yes) on images decoded by THIS iteration's model (it drew the tokens)
    n = run.config.sampling.samples_per_prompt
    samples = read2["samples"]
    images = policy.decode(torch.from_numpy(samples["tokens"][:n]),
                           [derive_seed(0, 2, int(samples["prompt_id"][0]), j, "decode") for j in range(n)])
    answers = expected.yes_no(images, [first] * n)
    stored = read2["scores"]["p_yes"][:n * count].reshape(n, count)
    np.testing.assert_allclose(stored, np.stack([a[0] for a in answers]), rtol=1e-5, atol=1e-6)
    other = {"policy": base, "base": policy, "path": policy}[judge].yes_no(images, [first] * n)
    assert not np.allclose(stored, np.stack([a[0] for a in other]), rtol=1e-5, atol=1e-6)


def stage_questions(backend, prompt: str, run) -> list[str]:
    """The questions the stage would write for ``prompt`` with ``backend`` (greedy)."""
    from silmm import questions as Q

    qcfg = run.config.questions
    examples = Q.load_examples(qcfg.icl_examples)
    text = backend.write_text([Q.question_request(prompt, examples)], [0], max_new_tokens=qcfg.max_new_tokens,
                              temperature=qcfg.temperature)[0]
    return Q.parse_questions(text, qcfg.max_questions) or Q.prompt_q(prompt)
