"""Progress a person can watch: the tasks' progress records (written by real stage tasks, resumed ones
counting earlier work), their aggregation (by hand, with a fake clock), the driver's live line on a
terminal and in a log, and `silmm status`. No test depends on how fast anything runs."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from tqdm import tqdm

from silmm import config as C
from silmm import progress as P
from silmm.driver import Driver, JobBook, Tracked
from silmm.rundir import RunDir
from silmm.status import describe_status
from silmm.tasks import StageTask, log_path, open_writer, run_task
from tests import test_train
from tests.helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]
janus_pairs = test_train.janus_pairs  # the fixture: pairs sampled from the tiny Janus, with reference values
TINY_PRETRAIN = ["toy.pretrain.steps=6", "toy.pretrain.batch_size=4", "toy.pretrain.hidden=16", "toy.pretrain.layers=1",
                 "toy.pretrain.heads=2", "toy.pretrain.checkpoint_every=3", "toy.pretrain.warmup_steps=2"]


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(done: int, total: int, rate: float | None, updated: float, unit: str = "prompts") -> P.Record:
    return P.Record(task="iter_01/scores_00000", iteration=1, stage="scores", shard=0, unit=unit, done=done,
                    total=total, resumed=0, start=updated - 10, updated=updated, rate=rate, host="h", pid=1)


def record_of(run: RunDir, iteration: int, stage: str, shard: int = 0) -> Path:
    return P.record_path(log_path(run, StageTask(str(run.path), iteration, stage, shard)))


@pytest.fixture
def written(monkeypatch):
    """Every record a Recorder writes, in order (to see the first one of a resumed task)."""
    seen: list[P.Record] = []
    original = P.Recorder.write

    def spy(self, now):
        original(self, now)
        if self.path is not None:
            seen.append(P.read_record(self.path))

    monkeypatch.setattr(P.Recorder, "write", spy)
    return seen


# ----------------------------------------------------------------------------------- the arithmetic
def test_recorder_writes_at_once_then_at_most_every_2s_and_at_the_end(tmp_path):
    clock, path = FakeClock(0.0), tmp_path / "iter_01" / "scores_00003.progress.json"
    rec = P.Recorder(path, "prompts", total=10, done=2, clock=clock, every_s=2.0, window_s=10.0)
    first = P.read_record(path)
    assert (first.done, first.total, first.resumed, first.rate) == (2, 10, 2, None)  # a resumed task: not from 0
    assert (first.iteration, first.stage, first.shard, first.unit) == (1, "scores", 3, "prompts")
    clock.now = 1.0
    rec.update(3)
    assert P.read_record(path).done == 2  # within 2 s of the last write: not written
    clock.now = 2.5
    rec.update(4)
    got = P.read_record(path)
    assert (got.done, got.updated, got.rate) == (4, 2.5, pytest.approx((4 - 2) / 2.5))
    clock.now = 3.0
    rec.update(10)  # the last unit: written whatever the interval
    got = P.read_record(path)
    assert got.finished and got.rate == pytest.approx((10 - 2) / 3.0)
    assert not list(path.parent.glob(".*tmp*"))  # replaced whole, nothing left beside it


def test_rate_is_measured_over_the_recent_window(tmp_path):
    clock, path = FakeClock(0.0), tmp_path / "r.progress.json"
    rec = P.Recorder(path, "steps", total=1000, clock=clock, every_s=2.0, window_s=10.0)
    for t, done in ((5, 1), (10, 2), (15, 52), (20, 102)):  # a slow start (model loading), then 10 steps/s
        clock.now = t
        rec.update(done)
    # writes at 0, 5, 10, 15, 20: the base is the newest write at least 10 s old (t=10, done 2)
    assert P.read_record(path).rate == pytest.approx((102 - 2) / (20 - 10))


def test_aggregate_by_hand():
    now = 1000.0
    records = [record(10, 10, None, now - 50),  # finished
               record(4, 10, 0.5, now - 1),  # running
               record(2, 12, 0.25, now - 3),  # running
               None,  # not started: its total is the mean of the five known ones, round(52 / 5) = 10
               record(5, 10, 9.0, now - 700),  # running, silent for 700 s: counted, its rate is not
               record(3, 10, 1.0, now - 2)]  # unfinished record, but the output is complete on disk
    p = P.aggregate(records, [False, False, False, False, False, True], now)
    assert p.total == 10 + 10 + 12 + 10 + 10 + 10
    assert p.done == 10 + 4 + 2 + 0 + 5 + 10
    assert p.rate == pytest.approx(0.75)
    assert p.eta_s == pytest.approx((62 - 31) / 0.75)
    assert (p.estimated, p.shards, p.finished, p.running, p.stalled, p.unit) == (True, 6, 2, 3, 1, "prompts")
    assert P.describe(p) == f"31/~62 prompts, 0.75 prompts/s, eta {tqdm.format_interval(31 / 0.75)}, 1 stalled"
    assert P.aggregate([None, None], [False, True], now) is None  # nothing to show yet


# ------------------------------------------------------------------------------ real stage tasks
def test_stage_task_writes_its_record_and_a_resumed_task_counts_earlier_work(tiny_checkpoints, tmp_path,
                                                                             written, caplog):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "questions.method=prompt_q")
    run_task(StageTask(str(run.path), 1, "prompts", 0))
    writer = open_writer(run, 1, "questions", 0, 2)  # an earlier attempt recorded prompt 0, then stopped
    writer.add(0, {"prompt_id": [0], "question_count": [1], "fallback": [False], "question": ["a red circle?"]})
    writer.flush()
    with caplog.at_level(logging.INFO, logger="silmm.tasks"):
        run_task(StageTask(str(run.path), 1, "questions", 0))
    final = P.read_record(record_of(run, 1, "questions"))
    assert (final.done, final.total, final.resumed, final.unit) == (3, 3, 1, "prompts")
    assert (final.iteration, final.stage, final.shard) == (1, "questions", 0)
    assert [r.done for r in written][0] == 1  # the first record already counts the earlier attempt's prompt
    # the task's own log lines (all the debug executor's console shows): units done of total, rate, ETA
    lines = [r.getMessage() for r in caplog.records if "questions shard 0:" in r.getMessage()]
    assert lines[-1].startswith("questions shard 0: 2/2 (3/3 prompts, ") and "prompts/s, eta" in lines[-1]


def test_toy_pretraining_records_steps_under_the_run_logs_and_resumes_from_them(tmp_path, written):
    import jobs.pretrain

    cfg = C.load(REPO / "configs" / "toy_smoke.yaml", [f"run.root={tmp_path}", "run.name=r",
                                                       f"model.path={tmp_path / 'lmm'}", "logging.progress=false",
                                                       *TINY_PRETRAIN])
    run = RunDir.create_or_open(cfg)
    path = record_of(run, 0, "pretrain")
    with P.recording(log_path(run, StageTask(str(run.path), 0, "pretrain"))):  # as run_task does
        assert jobs.pretrain.run(run, 0, 0, stop_after=3) == {"stopped_at": 3}
    written.clear()
    run_task(StageTask(str(run.path), 0, "pretrain"))
    assert path.parent == run.logs_dir / "iter_00"  # not beside the model (model.path)
    assert (written[0].done, written[0].resumed) == (3, 3)  # the bar goes on from the checkpoint
    final = P.read_record(path)
    assert (final.done, final.total, final.unit, final.stage) == (6, 6, "steps", "pretrain")


def test_train_task_records_steps(tiny_checkpoints, janus_pairs, tmp_path, written):
    run = test_train.make_run(tmp_path, tiny_checkpoints("janus"), "janus", janus_pairs)  # 4 steps
    run_task(StageTask(str(run.path), 1, "train"))
    assert [(r.done, r.total, r.unit, r.stage) for r in written][::len(written) - 1] == [(0, 4, "steps", "train"),
                                                                                        (4, 4, "steps", "train")]


# ------------------------------------------------------------------------ the driver and status
def _write_records(run: RunDir, clock: FakeClock) -> list[Tracked]:
    """Three scores shards of 4 prompts: 0 done, 1 running (2 of 4 at 0.5 prompts/s), 2 pending."""
    shards = []
    for shard, (done, state) in enumerate(((4, "done"), (2, "running"), (None, "pending"))):
        if done is not None:
            rec = P.Recorder(record_of(run, 1, "scores", shard), "prompts", 4, clock=clock)
            clock.now += 4.0
            rec.update(done)
            clock.now -= 4.0
        t = Tracked(StageTask(str(run.path), 1, "scores", shard))
        t.state = state
        shards.append(t)
    return shards


def test_driver_logs_the_figures_every_30s_when_not_a_terminal(tiny_checkpoints, tmp_path, caplog):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")
    clock = FakeClock()
    tracked = _write_records(run, clock)
    driver = Driver(run, status_stream=io.StringIO())
    driver._progress_view = P.LiveStatus(driver.status_stream, clock=clock)
    t0, logged = clock.now, []
    with caplog.at_level(logging.INFO, logger="silmm.progress"):
        for t in (0, 5, 29, 31, 40, 55, 62):
            clock.now = t0 + t
            caplog.clear()
            driver._status_line(1, "scores", tracked, t0)
            logged += [(t, r.getMessage()) for r in caplog.records]
    assert [t for t, _ in logged] == [31, 62]  # not every poll
    # done: 4 + 2 of 4 + 4 + ~4 (the pending shard: the known shards' mean); rate 2 prompts / 4 s
    assert logged[0][1] == (f"iter 1 scores: 6/~12 prompts, 0.5 prompts/s, eta {tqdm.format_interval(12)}; "
                            f"tasks 1/3 done, 1 running, 1 pending; {tqdm.format_interval(31)} elapsed")
    assert driver.status_stream.getvalue() == ""


def test_driver_draws_a_live_bar_on_a_terminal(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "150")  # the line is cut at the terminal's width
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")
    clock = FakeClock()
    tracked = _write_records(run, clock)
    driver = Driver(run, status_stream=FakeTTY())
    driver._progress_view = P.LiveStatus(driver.status_stream, clock=clock)
    clock.now += 20
    driver._status_line(1, "scores", tracked, clock.now - 20)
    driver._status_line(1, "scores", tracked, clock.now - 20)
    text = driver.status_stream.getvalue()
    assert text.count("\r") == 2 and "\n" not in text  # rewritten in place
    line = text.split("\r")[-1]
    assert line.startswith("iter 1 scores:  50%|")
    assert line.endswith("| 6/~12 [00:20<00:12,  0.50 prompts/s, tasks 1/3 done, 1 running, 1 pending]\x1b[K")
    driver._end_status_line()
    assert driver.status_stream.getvalue().endswith("\n")  # the stage's last line stays


def test_status_shows_the_figures_of_a_running_stage(tiny_checkpoints, tmp_path):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")
    clock = FakeClock(P.time.time())
    rec = P.Recorder(record_of(run, 1, "questions", 1), "prompts", 3, clock=clock)
    clock.now += 4.0
    rec.update(1)
    text = describe_status(run)
    line = next(x for x in text.splitlines() if x.strip().startswith("questions"))
    assert f"1/~6 prompts, 0.25 prompts/s, eta {tqdm.format_interval(20)}" in line
    assert "prompts/s" not in text.replace(line, "")  # only the running stage


def test_record_is_none_when_missing_or_not_a_record(tmp_path):
    assert P.read_record(tmp_path / "none.progress.json") is None
    (tmp_path / "bad.progress.json").write_text(json.dumps({"done": 1}))
    assert P.read_record(tmp_path / "bad.progress.json") is None


@pytest.mark.slow
def test_local_executor_driver_draws_the_pretraining_bar_from_its_record(tmp_path, monkeypatch):
    """`make run`: the pretraining runs in a submitit subprocess whose output is not the console; the
    driver's bar comes from the task's record (its last poll sees the finished record, whatever the speed)."""
    monkeypatch.setenv("COLUMNS", "150")
    cfg = C.load(REPO / "configs" / "toy_smoke.yaml",
                 [f"run.root={tmp_path}", "run.name=r", f"model.path={tmp_path / 'lmm'}", "logging.progress=false",
                  "executor.kind=local", "executor.poll_interval_s=0.2", *TINY_PRETRAIN])
    run = RunDir.create_or_open(cfg)
    driver = Driver(run, status_stream=FakeTTY())
    driver._run_tasks(0, "pretrain", [0])
    last = driver.status_stream.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("iter 0 pretrain: 100%|") and "| 6/6 [" in last and " steps/s, tasks 1/1 done" in last


def test_slurm_executor_driver_draws_the_stage_bar_from_the_records(slurm_cluster, tiny_checkpoints, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("COLUMNS", "150")
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus", "questions.method=prompt_q", "executor.kind=slurm",
                   "executor.default.partition=debug", "executor.default.mem_gb=2", "executor.default.time_min=10",
                   "executor.poll_interval_s=1")
    for shard in (0, 1):
        run_task(StageTask(str(run.path), 1, "prompts", shard))
    driver = Driver(run, status_stream=FakeTTY())
    driver.run_stage(1, "questions")  # 2 array tasks of 3 prompts
    last = driver.status_stream.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("iter 1 questions: 100%|") and "| 6/6 [" in last and " prompts/s, tasks 2/2 done" in last
    assert {e["kind"] for e in JobBook.load(run).entries.values()} == {"slurm"}
