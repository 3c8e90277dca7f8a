"""The plain sbatch path: `silmm init` (run directory + the commands of one iteration), `silmm shards`,
slurm/sbatch/*.sh (CPU-safe defaults, out-of-range array index), the command line in any order, and
absolute paths in the frozen config. The last tests run the printed chain on the local Slurm cluster."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from silmm import cli
from silmm import config as C
from silmm.driver import Driver
from silmm.rundir import RunDir
from tests.helpers import tiny_run
from tests.test_store import content as shard_content

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "slurm" / "sbatch"


def _env(**extra: str) -> dict[str, str]:
    """This environment (SLURM_CONF of the session's cluster included) with silmm's Python first on PATH, as
    a user's shell with silmm's environment active: the scripts run `python`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), **extra}


# ----------------------------------------------------------------------------------- command line
def test_overrides_and_profile_in_any_order():
    args = cli.parse_args(["run", "cfg.yaml", "a=1", "--profile", "p.yaml", "b=2", "--detach", "c=3"])
    assert (args.config, args.overrides, args.profile, args.detach) == ("cfg.yaml", ["a=1", "b=2", "c=3"],
                                                                        ["p.yaml"], True)
    args = cli.parse_args(["init", "--profile", "p.yaml", "cfg.yaml", "--profile", "q.yaml", "x.y=2"])
    assert (args.overrides, args.profile) == (["x.y=2"], ["p.yaml", "q.yaml"])
    with pytest.raises(SystemExit):  # not an override: still an error
        cli.parse_args(["run", "cfg.yaml", "a=1", "--profile", "p.yaml", "stray"])
    with pytest.raises(SystemExit):  # a command without overrides takes none
        cli.parse_args(["status", "RUN", "a=1"])


# ----------------------------------------------------------------------------------- absolute paths
def test_paths_absolute_in_the_frozen_config(tmp_path, monkeypatch, tiny_checkpoints):
    ckpt = tiny_checkpoints("janus")
    (tmp_path / "ckpt").symlink_to(ckpt)
    (tmp_path / "bench").mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["run.root=runs", "run.name=run", "model.path=ckpt", "eval.benchmarks.t2i_compbench.path=bench",
            f"questions.icl_examples={ROOT / 'configs' / 'examples' / 'toy_questions.yaml'}"]
    cfg = C.load(None, args)
    assert cfg.model.path == str(tmp_path / "ckpt") and cfg.run.root == str(tmp_path / "runs")
    assert cfg.eval.benchmarks["t2i_compbench"].path == str(tmp_path / "bench")
    run = RunDir.create_or_open(cfg)
    frozen = yaml.safe_load((run.path / "config.yaml").read_text())
    assert frozen["model"]["path"] == str(tmp_path / "ckpt") and frozen["run"]["root"] == str(tmp_path / "runs")
    # the same command from the same directory: the same run; jobs starting elsewhere read the same paths
    assert C.config_hash(C.load(None, args)) == run.config_hash
    monkeypatch.chdir(ROOT)
    assert RunDir.open(tmp_path / "runs" / "run").config.model.path == str(tmp_path / "ckpt")
    with pytest.raises(C.ConfigError, match="model.path"):  # from elsewhere, `ckpt` is another checkpoint
        RunDir.prepare(C.load(None, [f"run.root={tmp_path / 'runs'}", "run.name=run", f"model.path={ckpt}"]))


def test_run_created_with_relative_paths_keeps_its_hash(tmp_path, monkeypatch, tiny_checkpoints):
    """A run created before paths were made absolute recorded them relative: re-run from the directory it was
    created in, it opens as the same run (same hash, its config.yaml unchanged)."""
    (tmp_path / "ckpt").symlink_to(tiny_checkpoints("janus"))
    monkeypatch.chdir(tmp_path)
    old = C.load(None, ["run.root=runs", "run.name=run", "model.path=ckpt"])
    old.model.path, old.run.root = "ckpt", "runs"  # as an older silmm froze it
    run = RunDir.create_or_open(old)
    before = (run.path / "config.yaml").read_text()
    again = RunDir.create_or_open(C.load(None, ["run.root=runs", "run.name=run", "model.path=ckpt", "executor.retries=5"]))
    assert again.config_hash == run.config_hash and again.config.model.path == "ckpt"
    assert "retries: 5" in (run.path / "config.yaml").read_text() and "path: ckpt\n" in before


# ----------------------------------------------------------------------------------- init, shards, scripts
def _init(tmp_path: Path, ckpt: Path, capsys, *overrides: str) -> tuple[Path, str]:
    capsys.readouterr()
    code = cli.main(["init", str(ROOT / "configs" / "tiny_discrete.yaml"), f"run.root={tmp_path}", "run.name=run",
                     "--profile", str(ROOT / "slurm" / "profiles" / "local_slurm.yaml"), f"model.path={ckpt}", *overrides])
    out = capsys.readouterr()
    assert code == 0, out.err
    return tmp_path / "run", out.out


def test_init_creates_the_run_and_prints_the_iteration(tmp_path, tiny_checkpoints, capsys):
    run_path, script = _init(tmp_path, tiny_checkpoints("janus"), capsys, "prompts.count=6", "sharding.prompts_per_shard=2",
                             "executor.max_array_size=2", "executor.stages.scores.cpus_per_task=2")
    run = RunDir.open(run_path)
    assert not (run_path / "driver.lock").exists() and not (run_path / "jobs.json").exists()  # no driver ran
    lines = [ln for ln in script.splitlines() if "sbatch" in ln and not ln.startswith("#")]
    # 3 shards in arrays of at most 2 (indices from 0, the offset reaches shard 2), throttle %2 shared
    prompts = [ln for ln in lines if "-prompts-1 " in ln]
    assert len(prompts) == 2 and "--array=0-1%1" in prompts[0] and "--array=0-0%1" in prompts[1]
    assert "SILMM_SHARD_OFFSET=2" in prompts[1] and "OFFSET" not in prompts[0]
    assert "--dependency=afterok:$prompts_0:$prompts_1" in next(ln for ln in lines if "-questions-1 " in ln)
    scores = next(ln for ln in lines if "-scores-1 " in ln)
    assert "--cpus-per-task=2" in scores and "--partition=debug" in scores and "--mem=2048M" in scores
    assert '--output="$RUN/logs/slurm/%x-%A_%a.out"' in scores and "--job-name=silmm-run-scores-1" in scores
    train = lines[-1]
    assert "--dependency=afterok:$pairs" in train and "slurm/sbatch/train.sh" in train and "gpus" not in train
    assert f"RUN={run.path}" in script
    # init again: the run is validated, not recreated; a result-changing key is refused
    assert _init(tmp_path, tiny_checkpoints("janus"), capsys, "prompts.count=6", "sharding.prompts_per_shard=2")[1]
    assert cli.main(["init", str(ROOT / "configs" / "tiny_discrete.yaml"), f"run.root={tmp_path}", "run.name=run",
                     f"model.path={tiny_checkpoints('janus')}", "prompts.count=8"]) == 2
    assert "prompts.count: 6 (run) -> 8 (given)" in capsys.readouterr().err


def test_scripts_have_cpu_safe_defaults():
    for script in SCRIPTS.glob("*.sh"):
        text = script.read_text()
        assert "gpus" not in "".join(ln for ln in text.splitlines() if ln.startswith("#SBATCH")), script
        assert "#SBATCH --mem=4G" in text and "#SBATCH --cpus-per-task=1" in text, script
        assert "#SBATCH --open-mode=append" in text, script
    assert "#SBATCH --requeue" in (SCRIPTS / "stage.sh").read_text()


def test_out_of_range_array_index_exits_zero(tmp_path, tiny_checkpoints):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")  # 6 prompts, 3 per shard: 2 shards
    assert cli.main(["shards", str(run.path), "1", "questions"]) == 0
    env = _env(SLURM_ARRAY_TASK_ID="0", SILMM_SHARD_OFFSET="2")  # shard 2 of 2
    proc = subprocess.run(["bash", str(SCRIPTS / "stage.sh"), str(run.path), "1", "prompts"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "shard 2 of prompts (iteration 1) is out of range: the stage has 2 shard(s)" in proc.stdout
    assert not run.shard_path(1, "prompts", 2).exists()


def test_shards_command(tmp_path, tiny_checkpoints, capsys):
    run = tiny_run(tmp_path, tiny_checkpoints("janus"), "janus")
    assert cli.main(["shards", str(run.path), "1", "scores"]) == 0 and capsys.readouterr().out == "2\n"
    assert cli.main(["shards", str(run.path), "1", "train"]) == 0 and capsys.readouterr().out == "1\n"


# ----------------------------------------------------------------------------------- local Slurm
def _wait_gone(job_ids: list[str], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True).stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"jobs {job_ids} still queued after {timeout} s")


def test_printed_sbatch_chain_gives_the_drivers_shards(slurm_cluster, tiny_checkpoints, tmp_path, capsys):
    """`silmm init`'s commands, run as printed on the local cluster (up to pairs; train left out: the same job
    code as the driver's), give byte-identical shards to the driver's (local executor), with job names and
    logs as promised."""
    ckpt = tiny_checkpoints("janus")
    common = ["prompts.count=4", "sharding.prompts_per_shard=2", "sampling.samples_per_prompt=3",
              "sampling.batch_size=3", "questions.max_new_tokens=12", "questions.max_questions=3"]
    run_path, script = _init(tmp_path / "sb", ckpt, capsys, *common)
    script = script.split("\ntrain=")[0] + '\necho "$pairs"\n'  # up to pairs
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _wait_gone([proc.stdout.split()[-1]], 300)
    # the driver on the local executor: two tasks share the 2 cores as the Slurm tasks' one CPU each (threads)
    ref = RunDir.create_or_open(C.load(ROOT / "configs" / "tiny_discrete.yaml", [
        f"run.root={tmp_path / 'drv'}", "run.name=run", f"model.path={ckpt}", *common, "executor.kind=local",
        "executor.local_parallelism=2"], [ROOT / "slurm" / "profiles" / "local_slurm.yaml"]))
    run = RunDir.open(run_path)
    assert ref.config_hash == run.config_hash
    for stage in ("prompts", "questions", "samples", "scores", "pairs"):
        Driver(ref).run_stage(1, stage)
    for stage in ("prompts", "questions", "samples", "scores"):
        for i in range(2):
            assert shard_content(run.shard_path(1, stage, i)) == shard_content(ref.shard_path(1, stage, i)), stage
    assert shard_content(run.pairs_path(1)) == shard_content(ref.pairs_path(1))
    logs = sorted(p.name.rsplit("-", 1)[0] for p in (run_path / "logs" / "slurm").glob("*.out"))
    assert logs == ["silmm-run-pairs-1"] + [f"silmm-run-{s}-1" for s in ("prompts", "questions", "samples", "scores")
                                            for _ in range(2)]
    shutil.rmtree(tmp_path, ignore_errors=True)
