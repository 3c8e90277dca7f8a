"""Small file-system helpers shared by the run directory, the store and the jobs."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary name in the same directory, fsync, rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def sha256_file(path: str | Path, block: int = 8 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, int | str]]:
    """Every file under ``folder`` (relative path -> bytes and sha256), for a later :func:`manifest_problem`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude}


def manifest_problem(folder: str | Path, manifest: dict[str, dict[str, int | str]]) -> str | None:
    """None when every file of the manifest is there with its size and hash, else the first problem,
    naming the file. Sizes are compared first: a truncated copy costs no hashing."""
    folder = Path(folder)
    for name, want in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != want.get("bytes"):
            return f"{path}: {path.stat().st_size} bytes, {want.get('bytes')} were written (truncated or replaced)"
    for name, want in manifest.items():
        if sha256_file(folder / name) != want.get("sha256"):
            return f"{folder / name}: content differs from what was written (sha256 mismatch)"
    return None
