import os

# Nothing is downloaded in tests: every checkpoint is built on disk by the tests themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

pytest_plugins = ["tests.slurm_cluster"]  # the session fixture `slurm_cluster` (a real local Slurm)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Build each tiny checkpoint on first use, once per test session."""
    from silmm.models import build_tiny

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    built: dict[str, object] = {}

    def get(backend: str):
        if backend not in built:
            built[backend] = build_tiny(backend, root / backend, seed=0)
        return built[backend]

    return get
