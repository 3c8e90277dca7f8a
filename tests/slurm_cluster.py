"""Pytest plugin: a real single-node Slurm cluster for the tests that ask for it.

The session-scoped fixture ``slurm_cluster`` starts the cluster with the project's own
``slurm/start_local_slurm.sh`` (munge, MariaDB, slurmdbd, slurmctld and slurmd on
127.0.0.1, everything under ``SILMM_SLURM_BASE``, default ``/tmp/silmm_slurm_pytest``),
points ``SLURM_CONF`` at it for the whole session (submitit, sbatch and sacct read it) and,
at the end, stops it and deletes its directory with ``slurm/stop_local_slurm.sh --purge``.

It needs root and either the Slurm packages or apt-get to install them (the start script
installs what is missing). Where that is not so, the tests that use the fixture are skipped
with the reason, or fail when ``SILMM_REQUIRE_SLURM=1`` or ``CI=true`` (so that a broken set-up
cannot pass as a skip). A start that fails for any other reason always fails the tests; the
logs are then kept under the base directory.

Tests that use the fixture get the ``slurm`` marker, so ``pytest -m "not slurm"`` leaves
them out. The cluster uses port base 7817, not the scripts' default 6817, so that it can
run next to a cluster started by hand, and does not touch /etc/slurm.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO / "slurm" / "start_local_slurm.sh"
STOP_SCRIPT = REPO / "slurm" / "stop_local_slurm.sh"
PARTITION = "debug"
PORT_BASE = 7817
# binaries of the packages the start script installs; any missing one means "install"
_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged", "slurmdbd", "mariadbd")
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


@dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to know about the running cluster."""

    base: Path  # everything of the cluster lives here; logs in base / "log"
    partition: str  # the only partition, also the default one
    conf: Path  # slurm.conf; os.environ["SLURM_CONF"] points at it during the session


def _required() -> bool:
    # CI (which sets CI=true) must never pass these tests as skips
    return os.environ.get("SILMM_REQUIRE_SLURM", "") == "1" or os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    """Skip, or fail when SILMM_REQUIRE_SLURM=1."""
    if _required():
        pytest.fail(f"local Slurm cluster required (SILMM_REQUIRE_SLURM=1) but {reason}", pytrace=False)
    pytest.skip(f"local Slurm cluster not available: {reason} (set SILMM_REQUIRE_SLURM=1 to fail instead)")


def _missing_prerequisite() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "it needs root (the daemons run as root)"
    missing = [b for b in _BINARIES if shutil.which(b, path=_SBIN_PATH) is None]
    if missing and shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed and no apt-get to install them"
    return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(unreadable)"


def _script_env(base: Path) -> dict[str, str]:
    env = dict(os.environ, PATH=_SBIN_PATH)
    env.pop("SLURM_CONF", None)
    env.update(
        SLURM_LOCAL_BASE=str(base),
        SLURM_LOCAL_PARTITION=PARTITION,
        SLURM_LOCAL_PORT_BASE=str(PORT_BASE),
        SLURM_LOCAL_LINK_ETC="0",
        SLURM_LOCAL_ACCOUNTING="1",  # submitit needs sacct to see cancelled jobs
        # advertise 4 CPUs on 2 cores: a detached driver job (1 CPU) and a 2-task training job fit at once
        SLURM_LOCAL_CPUS="4",
    )
    return env


def _stop(base: Path, *, purge: bool) -> subprocess.CompletedProcess[str]:
    args = [str(STOP_SCRIPT), str(base)] + (["--purge"] if purge else [])
    return subprocess.run(
        args, env=_script_env(base), capture_output=True, text=True, timeout=300, check=False
    )


_LIMIT_KEYS = {"max_array_size": "MaxArraySize", "max_job_count": "MaxJobCount", "job_requeue": "JobRequeue"}


@contextmanager
def cluster_limits(cluster: SlurmCluster, **limits: int) -> Iterator[None]:
    """The running cluster with other limits (max_array_size, max_job_count, job_requeue) for the duration,
    then the recorded ones again: slurm.conf rewritten and slurmctld alone restarted (~4 s until the node is
    back; queued and running jobs survive in its state). `scontrol reconfigure` is not enough: it shows a new
    MaxArraySize but keeps enforcing the old one (Slurm 22.05). Starting a cluster with other limits instead:
    SLURM_LOCAL_MAX_ARRAY_SIZE etc. (start_local_slurm.sh)."""
    original = cluster.conf.read_text()
    text = original
    for key, value in limits.items():
        name = _LIMIT_KEYS[key]
        text, n = re.subn(rf"^{name}=.*$", f"{name}={int(value)}", text, flags=re.MULTILINE)
        assert n == 1, f"{cluster.conf}: no {name} line"
    _restart_slurmctld(cluster, text)
    try:
        yield
    finally:
        _restart_slurmctld(cluster, original)


def _restart_slurmctld(cluster: SlurmCluster, conf_text: str) -> None:
    env = dict(os.environ, PATH=_SBIN_PATH, SLURM_CONF=str(cluster.conf))
    pid_file = cluster.base / "run" / "slurmctld.pid"
    pid = int(pid_file.read_text().strip())
    cluster.conf.write_text(conf_text)
    subprocess.run(["scontrol", "shutdown", "slurmctld"], env=env, check=True, capture_output=True, timeout=60)
    _wait(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in _proc_state(pid), 60, "slurmctld to stop")
    subprocess.run(["slurmctld"], env=env, check=True, capture_output=True, timeout=60)

    def node_ready() -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.split()
        return bool(out) and out[0] in ("idle", "mix", "alloc")

    _wait(node_ready, 60, "the node to register again")


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


def _wait(ready, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = _missing_prerequisite()
    if reason:
        _unavailable(reason)

    base = Path(os.environ.get("SILMM_SLURM_BASE", "/tmp/silmm_slurm_pytest"))
    if base.exists():  # left over from an interrupted session: start from scratch
        _stop(base, purge=True)

    # up to 15 minutes: the first run may apt-get install the packages
    proc = subprocess.run(
        [str(START_SCRIPT), str(base)],
        env=_script_env(base),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode == 3:  # packages missing and not installable (no network, ...)
        _stop(base, purge=True)
        _unavailable(f"installing the packages failed:\n{proc.stderr[-2000:]}")
    if proc.returncode != 0:
        _stop(base, purge=False)  # keep the logs for the message below and for a look
        logs = "\n".join(
            f"--- {log}\n{_tail(log)}" for log in sorted((base / "log").glob("*")) if log.is_file()
        )
        pytest.fail(
            f"{START_SCRIPT.name} failed with exit status {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}\n{logs}",
            pytrace=False,
        )

    conf = base / "etc" / "slurm.conf"
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # inherited by sbatch, squeue, sacct and the jobs
    try:
        yield SlurmCluster(base=base, partition=PARTITION, conf=conf)
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        stopped = _stop(base, purge=True)
        if stopped.returncode != 0:
            # a teardown error shows up as an error of the last test of the session
            raise RuntimeError(f"{STOP_SCRIPT.name} failed:\n{stopped.stderr[-3000:]}")
