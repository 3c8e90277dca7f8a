"""Helpers the benchmark modules share: reading files with file-and-line errors, JSON arrays with the line of
each entry, checking a scorer's answers against a prompt's questions, and writing an export atomically."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from silmm.eval.records import BenchmarkError, BenchmarkPrompt, ImageAnswers

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 255  # longest file name on common file systems (ext4, xfs, NTFS)


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it lies below it (how errors and records name a benchmark file)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def first_existing(root: Path, candidates: Sequence[str], what: str) -> Path:
    """The first of ``candidates`` (paths relative to ``root``) that exists; BenchmarkError naming them all if none."""
    if not root.exists():
        raise BenchmarkError(f"{root}: benchmark path does not exist ({what})")
    for cand in candidates:
        if (root / cand).exists():
            return root / cand
    raise BenchmarkError(f"{root}: no {what} found; looked for " + ", ".join(candidates))


def read_text(path: Path, root: Path) -> str:
    """A UTF-8 text file (a leading byte-order mark dropped); BenchmarkError naming the file when it is missing
    or not UTF-8."""
    if not path.is_file():
        raise BenchmarkError(f"{rel(path, root)}: file not found under {root}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BenchmarkError(f"{rel(path, root)}:{line}: not UTF-8 ({e.reason})") from None
    return text.removeprefix("\ufeff")


def text_lines(path: Path, root: Path) -> list[tuple[int, str]]:
    """(1-based line, text) for every line split on "\\n" (a trailing "\\r" dropped). A line that Python's
    ``str.splitlines`` (which the official generators use) would split further is an error, so both count the
    same lines."""
    text = read_text(path, root)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline ends the last line; it starts no new one
    out = []
    for i, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if len(line.splitlines()) > 1:
            raise BenchmarkError(f"{rel(path, root)}:{i}: contains a line separator other than newline "
                                 "(the official scripts would split this line differently)")
        out.append((i, line))
    return out


def json_array_with_lines(path: Path, root: Path) -> list[tuple[int, object]]:
    """A JSON file holding one array: (1-based line where each entry starts, entry)."""
    text = read_text(path, root)
    name = rel(path, root)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{name}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise BenchmarkError(f"{name}:1: expected a JSON array of records, found {type(data).__name__}")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted_to = 1, 0
    out = []
    for _ in data:  # walk the (already valid) text once more to learn where each entry starts
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        entry, pos = decoder.raw_decode(text, pos)
        out.append((line, entry))
    return out


def check_answers(prompt: BenchmarkPrompt, answers: Mapping[str, Sequence[ImageAnswers]],
                  need_questions: bool) -> Sequence[ImageAnswers]:
    """The answers for ``prompt``, checked: at least one image, and (when the benchmark's own questions are
    scored) one answer per question in the benchmark's order."""
    images = answers.get(prompt.id)
    if not images:
        raise BenchmarkError(f"{prompt.benchmark} {prompt.id}: no answers for this prompt")
    if need_questions and prompt.questions:
        want = len(prompt.questions)
        for j, img in enumerate(images):
            if len(img.correct) != want or len(img.questions) != want:
                raise BenchmarkError(
                    f"{prompt.benchmark} {prompt.id}: image {j} has {len(img.correct)} answers for "
                    f"{want} benchmark questions (a scorer must answer the benchmark's questions in order)")
    return images


def mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, np.float64))) if len(values) else math.nan


def check_images(prompt: BenchmarkPrompt, images: np.ndarray, want: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] images of one prompt; BenchmarkError naming the prompt otherwise."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or arr.shape[0] == 0:
        raise BenchmarkError(f"{prompt.benchmark} {prompt.id}: images must be uint8 [N, H, W, 3], "
                             f"got {arr.dtype} {tuple(arr.shape)}")
    if want is not None and arr.shape[0] != want:
        raise BenchmarkError(f"{prompt.benchmark} {prompt.id}: {arr.shape[0]} images, expected {want}")
    return arr


def save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path, format="PNG", compress_level=1)


def check_name(name: str, prompt: BenchmarkPrompt) -> str:
    if "/" in name or "\0" in name or name in ("", ".", ".."):
        raise BenchmarkError(f"{prompt.benchmark} {prompt.id}: cannot be a file name: {name!r}")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise BenchmarkError(f"{prompt.benchmark} {prompt.id}: file name longer than {MAX_NAME_BYTES} bytes: "
                             f"{name[:60]!r}...")
    return name


@contextmanager
def fresh_export(out_dir: Path) -> Iterator[Path]:
    """Build an export in a temporary sibling folder, then put it in place of ``out_dir``: a stale file from an
    earlier export would be scored by the official scripts (they list whole folders), and a crash leaves the
    previous export or none, never half of one."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)


def say(notes: list[str], message: str) -> None:
    """Record (and log) something read() skipped or noticed, so nothing is dropped silently."""
    notes.append(message)
    log.warning(message)
