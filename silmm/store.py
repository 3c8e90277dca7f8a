"""The HDF5 shard store: the one home of every stage's schema, and of atomic writing and validation.

Schema (documented for humans in shards/README.md; tests check the two agree):
every dataset of a shard is a *row table*: its first axis counts rows of one named kind (prompts,
samples, questions, pairs, ...). Variable-length lists are flattened, with a ``*_count`` dataset on the
parent row saying how many child rows each parent owns. A shard is therefore a concatenation of
per-prompt records, which is what lets a task flush progress and resume exactly.

Contracts:
- A shard is complete iff its final file exists and validates. It is written to a temporary name in
  the same directory, flushed, fsync'ed and renamed with ``os.replace``.
- Every shard records schema version, stage, iteration, shard index and count, config hash, creation
  time, package version, a CRC32 per dataset and one over the attributes. Every read checks all of it:
  the checksums of every dataset, streamed block by block (a reader asking for a few columns still
  verifies the others without holding them), plus what the caller expects (stage, iteration, shard
  index and count, config hash, model family). Any failure is one :class:`ShardError` naming the file.
- A task resumes from a progress directory ``<shard>.progress/`` of atomically written part files;
  the final shard is the concatenation of the parts, so it holds exactly what an uninterrupted task
  writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from silmm import __version__
from silmm.lease import foreign_holder, lease_path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: attrs_checksum; every read verifies every checksum

# kinds of datasets: numpy dtypes, plus two variable-length kinds
STR = "str"  # UTF-8 variable-length string
BYTES = "bytes"  # variable-length uint8 (PNG bytes); empty when not stored
NUMERIC = {"int64", "int32", "float32", "float16", "bool"}


class ShardError(ValueError):
    """A shard is missing, incomplete, corrupt or belongs to another run; the message names the file."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # one of NUMERIC, STR, BYTES
    rows: str  # the row kind counted by the first axis
    doc: str
    inner: tuple[str, ...] = ()  # names of trailing axes (fixed within a shard), e.g. ("T",) or ("L", "D")
    counts: str | None = None  # for *_count columns: the row kind whose rows it counts
    family: str | None = None  # "discrete" / "continuous": that family only; "optional": either; None: always
    also: tuple[str, ...] = ()  # other numeric dtypes the column may hold, kept as given (half-precision H)

    @property
    def optional(self) -> bool:
        return self.family is not None


@dataclass(frozen=True)
class StageSchema:
    stage: str
    doc: str
    columns: tuple[Column, ...]
    attrs: tuple[tuple[str, str], ...] = ()  # stage-specific attributes: (name, meaning)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


def _c(name: str, kind: str, rows: str, doc: str, **kw: Any) -> Column:
    return Column(name, kind, rows, doc, **kw)


SCHEMAS: dict[str, StageSchema] = {
    s.stage: s
    for s in (
        StageSchema(
            "prompts",
            "Step 1: compositional prompts of one shard (ids are unique across the iteration).",
            (
                _c("prompt_id", "int64", "prompts", "stable prompt id, unique within the iteration"),
                _c("text", STR, "prompts", "the prompt"),
                _c("category", STR, "prompts", "color, shape, texture, spatial, 3d_spatial, numeracy, "
                   "non_spatial, complex (files: prompts.file_categories or the file's name)"),
                _c("source_file", STR, "prompts", "prompts.source=files: the file the prompt was read from "
                   "(its name in prompts.files)", family="optional"),
                _c("source_line", "int32", "prompts", "prompts.source=files: the prompt's 1-based line in that "
                   "file", family="optional"),
            ),
        ),
        StageSchema(
            "questions",
            "Step 3: yes/no questions per prompt, flattened.",
            (
                _c("prompt_id", "int64", "prompts", "prompt id (same order as the prompts shard)"),
                _c("question_count", "int32", "prompts", "questions of each prompt", counts="questions"),
                _c("fallback", "bool", "prompts", "True when the model's output was unusable and "
                   "Prompt-Q was used instead"),
                _c("question", STR, "questions", "question text, prompt by prompt"),
            ),
        ),
        StageSchema(
            "samples",
            "Step 2: samples per prompt as sampled (never re-encoded), reference values, images.",
            (
                _c("prompt_id", "int64", "samples", "prompt id of each sample"),
                _c("sample_index", "int32", "samples", "0..N-1 within the prompt"),
                _c("seed", "int64", "samples", "derived from (run seed, iteration, prompt id, sample index)"),
                _c("tokens", "int64", "samples", "discrete: visual token ids", inner=("T",), family="discrete"),
                _c("ref_logprob", "float32", "samples", "discrete: log pi_ref(z|x) summed over image "
                   "positions", family="discrete"),
                _c("features", "float32", "samples", "continuous: sampled feature matrix H, in "
                   "store.features_dtype (the samples stage decoded and scored these rounded values)",
                   inner=("L", "D"), family="continuous", also=("float16",)),
                _c("image_png", BYTES, "samples", "decoded image as PNG bytes (empty if not stored)"),
                _c("ref_prompt_id", "int64", "ref_prompts", "continuous: prompt id of each reference "
                   "feature row", family="continuous"),
                _c("ref_features", "float32", "ref_prompts", "continuous: the reference's deterministic "
                   "features H_r, in store.features_dtype", inner=("L", "D"), family="continuous", also=("float16",)),
            ),
        ),
        StageSchema(
            "scores",
            "Step 4: VQA self-feedback per sample; per-question probabilities flattened.",
            (
                _c("prompt_id", "int64", "samples", "prompt id"),
                _c("sample_index", "int32", "samples", "sample index within the prompt"),
                _c("score", "float32", "samples", "s(x, y): mean of p(yes) - p(no) (or the configured variant)"),
                _c("question_count", "int32", "samples", "questions answered for each sample",
                   counts="answers"),
                _c("p_yes", "float32", "answers", "p('yes' | image, question), summed over variants"),
                _c("p_no", "float32", "answers", "p('no' | image, question), summed over variants"),
                _c("image_png", BYTES, "samples", "with sampling.store_images=best_worst: PNG of each prompt's "
                   "best and worst sample (others empty)", family="optional"),
            ),
        ),
        StageSchema(
            "pairs",
            "Selected preference pairs with everything training needs (one file per iteration). Continuous: "
            "the feature matrices stay in the samples shards, indexed by shard and row; `extra.samples_shards` "
            "lists each shard referenced (path relative to the iteration directory, and the CRC32s of its "
            "feature columns at selection time: training refuses a shard that has changed since).",
            (
                _c("prompt_id", "int64", "pairs", "prompt id"),
                _c("text", STR, "pairs", "prompt text"),
                _c("category", STR, "pairs", "prompt category"),
                _c("chosen_index", "int32", "pairs", "sample index of the chosen sample"),
                _c("rejected_index", "int32", "pairs", "sample index of the rejected sample"),
                _c("chosen_score", "float32", "pairs", "score of the chosen sample"),
                _c("rejected_score", "float32", "pairs", "score of the rejected sample"),
                _c("chosen_tokens", "int64", "pairs", "discrete: chosen token ids", inner=("T",), family="discrete"),
                _c("rejected_tokens", "int64", "pairs", "discrete: rejected token ids", inner=("T",),
                   family="discrete"),
                _c("chosen_ref_logprob", "float32", "pairs", "discrete: log pi_ref of chosen", family="discrete"),
                _c("rejected_ref_logprob", "float32", "pairs", "discrete: log pi_ref of rejected",
                   family="discrete"),
                _c("samples_shard", "int32", "pairs", "continuous: the samples shard holding H_w, H_l and H_r "
                   "(iter_K/samples/shard_<samples_shard>.h5)", family="continuous"),
                _c("chosen_row", "int64", "pairs", "continuous: row of H_w in that shard's `features`",
                   family="continuous"),
                _c("rejected_row", "int64", "pairs", "continuous: row of H_l in that shard's `features`",
                   family="continuous"),
                _c("ref_row", "int64", "pairs", "continuous: row of H_r in that shard's `ref_features`",
                   family="continuous"),
            ),
        ),
        StageSchema(
            "eval",
            "Benchmark evaluation (jobs/eval.py), `eval/<benchmark>/iter_KK/shard_NNNNN.h5`: one shard of a "
            "benchmark's prompts with their ids and own questions, N images per prompt drawn by the "
            "iteration's model, and the scorer's answers per image. `extra` holds `benchmark`, `scorer`, "
            "`eval_hash` (a shard with another eval hash is redone) and the settings it covers.",
            (
                _c("prompt_index", "int64", "prompts", "position of the prompt in the benchmark as read"),
                _c("prompt_id", STR, "prompts", "the benchmark's own id (file name, item_id, TIFA id, index)"),
                _c("text", STR, "prompts", "the prompt as the benchmark gives it"),
                _c("model_text", STR, "prompts", "the text the model was given (differs only with "
                   "eval.benchmarks.<name>.overlong=truncate)"),
                _c("category", STR, "prompts", "the benchmark's category"),
                _c("subcategory", STR, "prompts", "the benchmark's sub-category (or empty)"),
                _c("source", STR, "prompts", "file the prompt comes from, relative to the benchmark root"),
                _c("line", "int32", "prompts", "1-based line in `source` (0: not line-based)"),
                _c("metadata", STR, "prompts", "the benchmark's own record, JSON text, verbatim (or empty)"),
                _c("question_count", "int32", "prompts", "the benchmark's own questions of each prompt",
                   counts="benchmark_questions"),
                _c("image_count", "int32", "prompts", "images of each prompt", counts="images"),
                _c("question_id", STR, "benchmark_questions", "the benchmark's question id"),
                _c("question_text", STR, "benchmark_questions", "the benchmark's question"),
                _c("question_answer", STR, "benchmark_questions", "its expected answer"),
                _c("question_choices", STR, "benchmark_questions", "JSON list of choices ([] = yes/no)"),
                _c("question_parents", STR, "benchmark_questions", "JSON list of the ids it depends on"),
                _c("question_category", STR, "benchmark_questions", "its category / element type (or empty)"),
                _c("question_element", STR, "benchmark_questions", "its element (or empty)"),
                _c("image_index", "int32", "images", "0..N-1 within the prompt"),
                _c("seed", "int64", "images", "sampling seed: (run seed, benchmark, benchmark id, image index), "
                   "the same for every iteration"),
                _c("decode_seed", "int64", "images", "seed of the decoder's noise (diffusion decoders)"),
                _c("image_png", BYTES, "images", "the image as PNG bytes"),
                _c("score", "float32", "images", "the scorer's own per-image score"),
                _c("score_extra", STR, "images", "JSON: scorer-specific per-image values (oracle: partial, strict)"),
                _c("answer_count", "int32", "images", "questions the scorer asked about each image",
                   counts="answers"),
                _c("question", STR, "answers", "question asked (the benchmark's, or the scorer's own)"),
                _c("p_yes", "float32", "answers", "p('yes' | image, question) (NaN: not a yes/no question)"),
                _c("p_no", "float32", "answers", "p('no' | image, question) (NaN: not a yes/no question)"),
                _c("answer", STR, "answers", "'yes'/'no' or the chosen choice"),
                _c("correct", "float32", "answers", "1.0 when the answer is the expected one, else 0.0"),
            ),
        ),
    )
}

COMMON_ATTRS = (
    ("schema_version", f"shard schema version (this document: {SCHEMA_VERSION})"),
    ("stage", "prompts | questions | samples | scores | pairs | eval"),
    ("iteration", "SILMM iteration, from 1 (eval: the model iteration K ends with; 0 = the base model)"),
    ("shard_index", "index of this shard in the stage (0 for pairs)"),
    ("shard_count", "number of shards of the stage"),
    ("config_hash", "hash of the run's result-affecting config; readers refuse a different one"),
    ("created", "UTC creation time, ISO 8601"),
    ("silmm_version", "package version that wrote the shard"),
    ("row_counts", "JSON: rows of each row kind"),
    ("checksums", "JSON: CRC32 of each dataset's data, checked by `silmm verify`"),
    ("extra", "JSON: stage-specific metadata (e.g. summary counts)"),
    ("attrs_checksum", "CRC32 of the other attributes (canonical JSON): a changed attribute is caught too"),
)


@dataclass
class ShardMeta:
    stage: str
    iteration: int
    shard_index: int
    shard_count: int
    config_hash: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Shard:
    path: Path
    meta: ShardMeta
    data: dict[str, np.ndarray]
    attrs: dict[str, Any]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def rows(self, kind: str) -> int:
        return int(json.loads(self.attrs["row_counts"]).get(kind, 0))


# ------------------------------------------------------------------------------------ conversion
def _as_array(col: Column, values: Any, where: str) -> np.ndarray:
    """Normalise user values to the column's in-memory form (object arrays for variable length)."""
    if col.kind == STR:
        items = list(values)
        for v in items:
            if not isinstance(v, str):
                raise ShardError(f"{where}: column '{col.name}' holds strings, got {type(v).__name__}")
            if "\x00" in v:  # HDF5 variable-length strings end at NUL
                raise ShardError(f"{where}: column '{col.name}' has a string with a NUL character: {v!r}")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ShardError(f"{where}: column '{col.name}' has a string that is not valid UTF-8: {v!r}") from None
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr
    if col.kind == BYTES:
        items = [np.frombuffer(bytes(v), dtype=np.uint8) if not isinstance(v, np.ndarray) else v.astype(np.uint8)
                 for v in values]
        arr = np.empty(len(items), dtype=object)
        for i, v in enumerate(items):  # assigned one by one: numpy would otherwise stack equal lengths
            arr[i] = v
        return arr
    arr = np.asarray(values)
    if arr.size and arr.dtype.kind not in "biuf":
        raise ShardError(f"{where}: column '{col.name}' is numeric ({col.kind}), got dtype {arr.dtype}")
    if arr.size and col.kind != "bool" and arr.dtype.kind == "f" and np.dtype(col.kind).kind in "iu":
        raise ShardError(f"{where}: column '{col.name}' is {col.kind}, got floats")
    if arr.dtype.name in col.also:
        return arr  # the writer chose this precision (jobs/samples.py checks the range first)
    return arr.astype(col.kind, copy=False)


def _h5_dtype(col: Column, arr: np.ndarray) -> Any:
    if col.kind == STR:
        return h5py.string_dtype("utf-8")
    if col.kind == BYTES:
        return h5py.vlen_dtype(np.uint8)
    return arr.dtype  # col.kind, or one of col.also (_as_array)


def _crc(arr: np.ndarray, kind: str, crc: int = 0) -> int:
    """CRC32 of a column's content, chainable: the CRC of consecutive row blocks equals the whole's."""
    if kind == STR:
        for s in arr:
            b = s.encode() if isinstance(s, str) else bytes(s)
            crc = zlib.crc32(len(b).to_bytes(8, "little"), crc)
            crc = zlib.crc32(b, crc)
        return crc
    if kind == BYTES:
        for v in arr:
            b = np.asarray(v, dtype=np.uint8).tobytes()
            crc = zlib.crc32(len(b).to_bytes(8, "little"), crc)
            crc = zlib.crc32(b, crc)
        return crc
    return zlib.crc32(np.ascontiguousarray(arr).reshape(-1).view(np.uint8), crc)  # the bytes, not a copy


def _check_families(schema: StageSchema, names: set[str], where: str, family: str | None = None) -> None:
    """A model family's columns come together, never mixed with the other family's; with `family`
    ("discrete" / "continuous"), a stage that has family columns holds that family's (on write and read)."""
    families = {c.family for c in schema.columns if c.name in names} & {"discrete", "continuous"}
    if len(families) > 1:
        raise ShardError(f"{where}: mixes discrete-only and continuous-only columns")
    for fam in families:
        absent = [c.name for c in schema.columns if c.family == fam and c.name not in names]
        if absent:
            raise ShardError(f"{where}: {fam} columns present but {absent} missing")
    if family is not None and any(c.family == family for c in schema.columns) and family not in families:
        raise ShardError(f"{where}: holds no {family} columns, but this run's model is {family} (a shard of "
                         f"another run or backend?)")


def check_columns(stage: str, data: Mapping[str, Any], where: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Validate a stage's columns (names, kinds, row agreement, counts); return arrays and row counts."""
    schema = SCHEMAS.get(stage)
    if schema is None:
        raise ShardError(f"{where}: unknown stage '{stage}' (stages: {sorted(SCHEMAS)})")
    unknown = set(data) - {c.name for c in schema.columns}
    if unknown:
        raise ShardError(f"{where}: unknown columns for stage '{stage}': {sorted(unknown)}")
    arrays: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    inner: dict[str, int] = {}
    for col in schema.columns:
        if col.name not in data:
            if not col.optional:
                raise ShardError(f"{where}: missing column '{col.name}' of stage '{stage}'")
            continue
        arr = _as_array(col, data[col.name], where)
        if arr.ndim != 1 + len(col.inner):
            raise ShardError(f"{where}: column '{col.name}' must have {1 + len(col.inner)} axes "
                             f"({col.rows}{''.join(', ' + a for a in col.inner)}), got shape {arr.shape}")
        n = arr.shape[0]
        if rows.setdefault(col.rows, n) != n:
            raise ShardError(f"{where}: column '{col.name}' has {n} {col.rows} rows, other columns have "
                             f"{rows[col.rows]}")
        for axis, size in zip(col.inner, arr.shape[1:], strict=True):
            if inner.setdefault(axis, size) != size:
                raise ShardError(f"{where}: column '{col.name}' axis {axis}={size}, other columns have {inner[axis]}")
        arrays[col.name] = arr
    _check_families(schema, set(arrays), where)
    for col in schema.columns:
        if col.counts and col.name in arrays:
            counts = arrays[col.name]
            if (counts < 0).any():
                raise ShardError(f"{where}: column '{col.name}' has negative counts")
            child = rows.get(col.counts, 0)
            if int(counts.sum()) != child:
                raise ShardError(f"{where}: column '{col.name}' sums to {int(counts.sum())} but there are "
                                 f"{child} {col.counts} rows")
    return arrays, rows


# --------------------------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoreOptions:
    compression: str = "gzip"  # gzip | lzf | none
    compression_level: int = 1
    file_locking: bool = True

    @classmethod
    def from_config(cls, store_cfg: Any) -> StoreOptions:
        return cls(store_cfg.compression.value, store_cfg.compression_level, store_cfg.file_locking)


def _open(path: Path, mode: str, options: StoreOptions) -> h5py.File:
    # Some NFS/Lustre mounts refuse HDF5's file locks; HDF5_USE_FILE_LOCKING=FALSE also works.
    return h5py.File(path, mode, locking=options.file_locking)


def _row_chunks(col: Column, inner: tuple[int, ...], options: StoreOptions) -> dict[str, Any]:
    """One chunk per row of a matrix column (a reader can fetch any sample's features alone), compressed."""
    kwargs: dict[str, Any] = {"chunks": (1, *inner)}
    if options.compression == "gzip":
        kwargs.update(compression="gzip", compression_opts=options.compression_level, shuffle=True)
    elif options.compression == "lzf":
        kwargs.update(compression="lzf", shuffle=True)
    return kwargs


def _write_attrs(f: h5py.File, meta: ShardMeta, rows: Mapping[str, int], checksums: Mapping[str, int]) -> None:
    a = f.attrs
    a["schema_version"] = SCHEMA_VERSION
    a["stage"] = meta.stage
    a["iteration"] = meta.iteration
    a["shard_index"] = meta.shard_index
    a["shard_count"] = meta.shard_count
    a["config_hash"] = meta.config_hash
    a["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    a["silmm_version"] = __version__
    a["row_counts"] = json.dumps(dict(rows), sort_keys=True)
    a["checksums"] = json.dumps(dict(checksums), sort_keys=True)
    a["extra"] = json.dumps(meta.extra, sort_keys=True)
    a["attrs_checksum"] = _attrs_crc(dict(a))
    f.flush()


def _commit(tmp: Path, path: Path) -> None:
    """fsync the finished temporary file, rename it to its final name, fsync the directory."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_shard(path: str | Path, meta: ShardMeta, data: Mapping[str, Any],
                options: StoreOptions = StoreOptions()) -> Path:
    """Validate and write one shard atomically. Nothing exists at `path` until it is complete."""
    path = Path(path)
    arrays, rows = check_columns(meta.stage, data, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    schema = SCHEMAS[meta.stage]
    checksums: dict[str, int] = {}
    try:
        with _open(tmp, "w", options) as f:
            for col in schema.columns:
                if col.name not in arrays:
                    continue
                arr = arrays[col.name]
                kwargs = _row_chunks(col, arr.shape[1:], options) if col.inner and arr.shape[0] > 0 else {}
                if arr.shape[0]:
                    # data= at creation: assigning equal-length vlen rows later fails to broadcast
                    f.create_dataset(col.name, data=arr, dtype=_h5_dtype(col, arr), **kwargs)
                else:
                    f.create_dataset(col.name, shape=arr.shape, dtype=_h5_dtype(col, arr), **kwargs)
                checksums[col.name] = _crc(arr, col.kind)
            _write_attrs(f, meta, rows, checksums)
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class StreamWriter:
    """Write one shard block by block, holding one block: for outputs too large for memory (pairs.h5 of a
    continuous run holds every selected feature matrix). Each :meth:`append` is a mini table of the stage
    (as a ShardWriter record); datasets grow as blocks arrive and checksums are updated as they are written,
    so the shard equals :func:`write_shard` of the concatenated blocks. Nothing exists at ``path`` until
    :meth:`finish`; an exception removes the temporary file::

        with StreamWriter(path, meta, options) as w:
            for block in blocks:
                w.append(block)
        # finished on a clean exit
    """

    def __init__(self, path: str | Path, meta: ShardMeta, options: StoreOptions = StoreOptions()):
        self.path, self.meta, self.options = Path(path), meta, options
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.schema = SCHEMAS[meta.stage]
        self.rows: dict[str, int] = {}
        self.checksums: dict[str, int] = {}
        self.file = _open(self.tmp, "w", options)

    def append(self, block: Mapping[str, Any]) -> None:
        arrays, rows = check_columns(self.meta.stage, block, str(self.path))
        if self.checksums and set(arrays) != set(self.checksums):
            raise ShardError(f"{self.path}: a block with columns {sorted(arrays)}, earlier blocks had "
                             f"{sorted(self.checksums)}")
        for col in self.schema.columns:
            if col.name not in arrays:
                continue
            arr = arrays[col.name]
            if col.name not in self.file:
                chunks = _row_chunks(col, arr.shape[1:], self.options) if col.inner else {"chunks": (4096,)}
                self.file.create_dataset(col.name, shape=(0, *arr.shape[1:]), maxshape=(None, *arr.shape[1:]),
                                         dtype=_h5_dtype(col, arr), **chunks)
            dset = self.file[col.name]
            if dset.shape[1:] != arr.shape[1:]:
                raise ShardError(f"{self.path}: column '{col.name}' has rows of shape {arr.shape[1:]}, earlier "
                                 f"blocks {dset.shape[1:]}")
            if col.also and dset.dtype != arr.dtype:
                raise ShardError(f"{self.path}: column '{col.name}' has a block of {arr.dtype}, earlier blocks "
                                 f"{dset.dtype}")
            start = dset.shape[0]
            dset.resize(start + arr.shape[0], axis=0)
            if col.kind == BYTES:  # one by one: equal-length byte rows would not broadcast
                for i, v in enumerate(arr):
                    dset[start + i] = v
            elif arr.shape[0]:
                dset[start:] = arr
            self.checksums[col.name] = _crc(arr, col.kind, self.checksums.get(col.name, 0))
        for kind, n in rows.items():
            self.rows[kind] = self.rows.get(kind, 0) + n

    def finish(self) -> Path:
        _write_attrs(self.file, self.meta, self.rows, self.checksums)
        self.file.close()
        _commit(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


# --------------------------------------------------------------------------------------- reading
_BLOCK_BYTES = 16 << 20  # a column not asked for is checksummed in blocks of about this size
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, OverflowError, UnicodeError)


def _plain(value: Any) -> Any:
    """An attribute as written (h5py hands numbers back as numpy scalars, old strings as bytes)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _attrs_crc(attrs: Mapping[str, Any]) -> int:
    canonical = {k: _plain(v) for k, v in attrs.items() if k != "attrs_checksum"}
    return zlib.crc32(json.dumps(canonical, sort_keys=True, default=str).encode())


def _read_column(dset: h5py.Dataset, col: Column, rows: slice = slice(None)) -> np.ndarray:
    if col.kind == STR:
        return dset.asstr()[rows] if dset.shape[0] else np.empty(0, dtype=object)
    if col.kind == BYTES:
        block = dset[rows] if dset.shape[0] else []
        out = np.empty(len(block), dtype=object)
        for i, v in enumerate(block):  # one by one: numpy would stack equal lengths into a 2-D array
            out[i] = v
        return out
    return dset[rows]


def _streamed_crc(dset: h5py.Dataset, col: Column) -> int:
    """The column's CRC32 read block by block: memory stays at one block whatever the column's size."""
    n = dset.shape[0]
    if col.kind == STR:
        step = 1 << 16
    elif col.kind == BYTES:
        step = 256  # PNGs: tens of kB each
    else:
        step = max(1, _BLOCK_BYTES // max(1, dset.dtype.itemsize * int(np.prod(dset.shape[1:], dtype=np.int64))))
    crc = 0
    for start in range(0, n, step):
        crc = _crc(_read_column(dset, col, slice(start, min(start + step, n))), col.kind, crc)
    return crc


def _json_attr(path: Path, attrs: Mapping[str, Any], key: str) -> dict[str, Any]:
    try:
        value = json.loads(attrs[key])
    except (TypeError, ValueError):
        raise ShardError(f"{path}: attribute '{key}' is not valid JSON (corrupt)") from None
    if not isinstance(value, dict):
        raise ShardError(f"{path}: attribute '{key}' is not a JSON object (corrupt)")
    return value


def read_shard(path: str | Path, stage: str | None = None, config_hash: str | None = None,
               iteration: int | None = None, verify_checksums: bool = True,
               options: StoreOptions = StoreOptions(), columns: Iterable[str] | None = None,
               shard_index: int | None = None, shard_count: int | None = None,
               family: str | None = None) -> Shard:
    """Open, validate and load a shard; raise ShardError naming the file and the problem.

    Everything the shard records is checked against itself (attribute and dataset checksums, row counts,
    column groups) and against what the caller expects (each argument given). ``columns`` limits what is
    loaded, not what is verified: the other datasets are checksummed block by block and dropped.
    ``verify_checksums=False`` is for `silmm inspect`, which describes damaged files too."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard does not exist (task not finished?)")
    expect = {"stage": stage, "config_hash": config_hash, "iteration": iteration, "shard_index": shard_index,
              "shard_count": shard_count, "family": family}
    try:
        return _read(path, expect, verify_checksums, options, columns)
    except ShardError:
        raise
    except _READ_ERRORS as exc:  # whatever HDF5, a filter or a decoder raises on a damaged file
        raise ShardError(f"{path}: cannot be read, the file is damaged ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None


def _read(path: Path, expect: dict[str, Any], verify: bool, options: StoreOptions,
          columns: Iterable[str] | None) -> Shard:
    try:
        f = _open(path, "r", options)
    except OSError as exc:
        raise ShardError(f"{path}: not a readable HDF5 file (truncated or corrupt): {exc}") from None
    with f:
        a = {k: _plain(v) for k, v in f.attrs.items()}
        for key, _ in COMMON_ATTRS:
            if key not in a:
                raise ShardError(f"{path}: missing attribute '{key}' (not a complete silmm shard of schema "
                                 f"version {SCHEMA_VERSION})")
        if a["schema_version"] != SCHEMA_VERSION:
            raise ShardError(f"{path}: schema version {a['schema_version']}, this silmm reads {SCHEMA_VERSION}")
        if verify and a["attrs_checksum"] != _attrs_crc(a):
            raise ShardError(f"{path}: attributes changed since the shard was written (attribute checksum "
                             "mismatch)")
        meta = ShardMeta(str(a["stage"]), int(a["iteration"]), int(a["shard_index"]), int(a["shard_count"]),
                         str(a["config_hash"]), _json_attr(path, a, "extra"))
        _check_expected(path, meta, expect)
        row_counts = _json_attr(path, a, "row_counts")
        sums = _json_attr(path, a, "checksums")
        schema = SCHEMAS.get(meta.stage)
        if schema is None:
            raise ShardError(f"{path}: unknown stage '{meta.stage}'")
        names = set(f)
        for name in sorted(names):
            if name not in {c.name for c in schema.columns}:
                raise ShardError(f"{path}: unexpected dataset '{name}' for stage '{meta.stage}'")
        _check_families(schema, names, str(path), expect["family"])
        _check_shapes(path, schema, {name: f[name].shape for name in names}, row_counts)
        for col in schema.columns:
            if col.name in names and col.kind in NUMERIC and f[col.name].dtype.name not in (col.kind, *col.also):
                raise ShardError(f"{path}: dataset '{col.name}' is {f[col.name].dtype}, expected "
                                 f"{' or '.join((col.kind, *col.also))}")
        if verify:
            lost = sorted(set(sums) - names)
            if lost:
                raise ShardError(f"{path}: dataset(s) {lost} were written but are gone")
        wanted = set(columns) if columns is not None else names
        data: dict[str, np.ndarray] = {}
        for col in schema.columns:
            if col.name not in names:
                continue
            dset = f[col.name]
            if col.name in wanted or col.counts:  # *_count columns are small and always checked
                data[col.name] = _read_column(dset, col)
                crc = _crc(data[col.name], col.kind) if verify else None
            else:
                crc = _streamed_crc(dset, col) if verify else None
            if verify and sums.get(col.name) != crc:
                raise ShardError(f"{path}: checksum mismatch in dataset '{col.name}' (data corrupted)")
    for col in schema.columns:
        if col.counts and col.name in data:
            counts = data[col.name]
            if (counts < 0).any() or int(counts.sum()) != row_counts.get(col.counts, 0):
                raise ShardError(f"{path}: column '{col.name}' does not match the {row_counts.get(col.counts, 0)} "
                                 f"{col.counts} rows")
    data = {k: v for k, v in data.items() if k in wanted}
    return Shard(path, meta, data, a)


def _check_expected(path: Path, meta: ShardMeta, expect: dict[str, Any]) -> None:
    if expect["stage"] is not None and meta.stage != expect["stage"]:
        raise ShardError(f"{path}: is a '{meta.stage}' shard, expected '{expect['stage']}'")
    if expect["config_hash"] is not None and meta.config_hash != expect["config_hash"]:
        raise ShardError(f"{path}: config hash {meta.config_hash} differs from the run's {expect['config_hash']} "
                         "(shard from another run or config)")
    if expect["iteration"] is not None and meta.iteration != expect["iteration"]:
        raise ShardError(f"{path}: iteration {meta.iteration}, expected {expect['iteration']}")
    if expect["shard_index"] is not None and meta.shard_index != expect["shard_index"]:
        raise ShardError(f"{path}: holds shard {meta.shard_index}, expected shard {expect['shard_index']} "
                         "(a shard copied over another?)")
    if expect["shard_count"] is not None and meta.shard_count != expect["shard_count"]:
        raise ShardError(f"{path}: is one of {meta.shard_count} shards, the run has {expect['shard_count']}")
    if not 0 <= meta.shard_index < max(meta.shard_count, 1):
        raise ShardError(f"{path}: shard index {meta.shard_index} outside 0..{meta.shard_count - 1}")


def _check_shapes(path: Path, schema: StageSchema, shapes: dict[str, tuple[int, ...]],
                  row_counts: dict[str, Any]) -> None:
    for col in schema.columns:
        if col.name not in shapes:
            if not col.optional:
                raise ShardError(f"{path}: missing dataset '{col.name}'")
            continue
        shape = shapes[col.name]
        if len(shape) != 1 + len(col.inner):
            raise ShardError(f"{path}: dataset '{col.name}' has shape {shape}, expected {1 + len(col.inner)} axes")
        if row_counts.get(col.rows) != shape[0]:
            raise ShardError(f"{path}: dataset '{col.name}' has {shape[0]} rows, the shard records "
                             f"{row_counts.get(col.rows)} {col.rows} rows (incomplete)")


def indexed_samples(pairs: Shard, options: StoreOptions = StoreOptions()) -> tuple[dict[int, Path], list[str]]:
    """Continuous pairs index rows of the samples shards (jobs/pairs.py): each shard ``pairs.meta.extra``
    records (index -> path) and what is wrong with them -- gone, not the run's samples shard of that index,
    or holding other feature or id columns than at pair selection (CRC32s recorded then, compared with those
    the shard's attributes store now: no data is re-read). Each problem names the file."""
    records = pairs.meta.extra.get("samples_shards")
    if not isinstance(records, list) or not records:
        return {}, [f"{pairs.path}: continuous pairs without `extra.samples_shards` (written by an older silmm?)"]
    found: dict[int, Path] = {}
    problems = []
    for rec in records:
        path = pairs.path.parent / rec["path"]
        try:
            shard = read_shard(path, "samples", pairs.meta.config_hash, pairs.meta.iteration, verify_checksums=False,
                               options=options, columns=(), shard_index=rec["shard"], family="continuous")
        except ShardError as exc:
            problems.append(str(exc))
            continue
        stored = json.loads(shard.attrs["checksums"])
        changed = sorted(k for k, crc in rec["checksums"].items() if stored.get(k) != crc)
        if changed:
            problems.append(f"{path}: {changed} differ from what {pairs.path.name} recorded at pair selection "
                            "(shard regenerated or replaced)")
        found[int(rec["shard"])] = path
    return found, problems


def validate_shard(path: str | Path, **kwargs: Any) -> str | None:
    """None when the shard is good, else the problem (a message naming the file). Loads nothing: every
    dataset is checksummed block by block."""
    try:
        read_shard(path, columns=(), **kwargs)
    except ShardError as exc:
        return str(exc)
    return None


def is_complete(path: str | Path, **kwargs: Any) -> bool:
    """A task's completion test: the final file exists and validates, checksums included."""
    return Path(path).is_file() and validate_shard(path, **kwargs) is None


def quarantine(path: str | Path) -> Path:
    """Move a bad output aside (kept for inspection, never read again): ``<name>.bad-<UTC time>``."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.bad-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.bad-{stamp}-{n}")
    os.replace(path, target)
    return target


# ------------------------------------------------------------------------------ resumable writing
def concat_records(stage: str, records: list[Mapping[str, Any]], where: str) -> dict[str, np.ndarray]:
    """Concatenate per-prompt records (each a mini table of the stage) row-wise."""
    schema = SCHEMAS[stage]
    if not records:
        return {c.name: _empty(c) for c in schema.columns if not c.optional}
    names = set(records[0])
    out: dict[str, np.ndarray] = {}
    for col in schema.columns:
        if col.name not in names:
            continue
        parts = [_as_array(col, r[col.name], where) for r in records]
        if col.kind in (STR, BYTES):
            arr = np.empty(sum(len(p) for p in parts), dtype=object)
            i = 0
            for p in parts:
                for v in p:
                    arr[i] = v
                    i += 1
            out[col.name] = arr
        else:
            out[col.name] = np.concatenate(parts, axis=0)
    return out


def _empty(col: Column) -> np.ndarray:
    if col.kind in (STR, BYTES):
        return np.empty(0, dtype=object)
    return np.zeros((0,) + (0,) * len(col.inner), dtype=col.kind)


class ShardWriter:
    """Write one shard prompt by prompt, resumably.

    Usage in a stage task::

        writer = ShardWriter(final_path, meta, flush_every=4)
        for pid in prompt_ids:
            if pid in writer.done: continue
            writer.add(pid, record)        # record: the stage's columns for this prompt's rows
        writer.finish()

    Every `flush_every` records go to ``<shard>.progress/part_NNNNN.h5`` (written atomically), so a
    task killed at any moment loses at most the unflushed records, and the final shard is the same
    concatenation of parts an uninterrupted task writes.
    """

    def __init__(self, path: str | Path, meta: ShardMeta, flush_every: int = 4,
                 options: StoreOptions = StoreOptions()):
        self.path = Path(path)
        self.meta = meta
        self.flush_every = flush_every
        self.options = options
        self.progress_dir = self.path.with_name(self.path.name + ".progress")
        self.pending: list[tuple[int, Mapping[str, Any]]] = []
        self.flushing = False  # a preemption handler must not start a flush inside a flush
        self.parts: list[Path] = []
        self.done: set[int] = set()
        self._order: list[int] = []
        self._load_progress()

    def _check_lease(self) -> None:
        """A writer deletes temporary and progress files only when it holds the shard's lease (a stage task)
        or nobody leases the shard (a writer used on its own): never another writer's files."""
        holder = foreign_holder(self.path)
        if holder is not None:
            raise ShardError(f"{self.path}: being written by {holder.describe()} ({holder.task}); its lease is "
                             f"{lease_path(self.path)}")

    def _load_progress(self) -> None:
        self._check_lease()
        if not self.progress_dir.is_dir():
            return
        for tmp in self.progress_dir.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)  # a part whose write was interrupted
        parts = sorted(self.progress_dir.glob("part_*.h5"))
        for i, part in enumerate(parts):
            try:
                shard = read_shard(part, stage=self.meta.stage, config_hash=self.meta.config_hash,
                                   iteration=self.meta.iteration, shard_index=self.meta.shard_index,
                                   shard_count=self.meta.shard_count, options=self.options, columns=())
            except ShardError as exc:
                # parts are a prefix of the task's order: keep those before the bad one, redo the rest
                for later in parts[i:]:
                    moved = quarantine(later)
                    log.warning("progress part %s is bad (%s): moved aside to %s, its prompts will be redone",
                                later, exc, moved.name)
                break
            keys = shard.meta.extra.get("keys", [])
            self.parts.append(part)
            self.done.update(keys)
            self._order.extend(keys)

    def add(self, key: int, record: Mapping[str, Any]) -> None:
        if key in self.done:
            raise ShardError(f"{self.path}: record {key} was already written")
        self.pending.append((key, record))
        self.done.add(key)
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.flushing = True
        try:
            self._write_part()
        finally:
            self.flushing = False

    def _write_part(self) -> None:
        keys = [k for k, _ in self.pending]
        data = concat_records(self.meta.stage, [r for _, r in self.pending], str(self.path))
        part = self.progress_dir / f"part_{len(self.parts):05d}.h5"
        meta = ShardMeta(self.meta.stage, self.meta.iteration, self.meta.shard_index, self.meta.shard_count,
                         self.meta.config_hash, {"keys": keys})
        write_shard(part, meta, data, self.options)
        self.parts.append(part)
        self._order.extend(keys)
        self.pending = []

    def finish(self) -> Path:
        """Write the final shard from all parts (and pending records), one part in memory at a time, then
        drop the progress."""
        self.flush()
        if not self.parts:  # a shard without records: its columns, empty
            self._check_lease()
            write_shard(self.path, self.meta, concat_records(self.meta.stage, [], str(self.path)), self.options)
            return self.path
        out = StreamWriter(self.path, self.meta, self.options)
        try:
            for part in self.parts:
                out.append(read_shard(part, stage=self.meta.stage, config_hash=self.meta.config_hash,
                                      options=self.options).data)
            self._check_lease()  # a takeover may have happened meanwhile: then the progress is not ours to drop
            out.finish()
        except BaseException:
            out.abort()
            raise
        shutil.rmtree(self.progress_dir, ignore_errors=True)
        return self.path

    @property
    def keys_written(self) -> list[int]:
        return list(self._order)


# --------------------------------------------------------------------------------- documentation
def schema_markdown() -> str:
    """The schema as Markdown; shards/README.md embeds it (a test keeps the two identical)."""
    out = [f"Schema version: {SCHEMA_VERSION}", "", "### Attributes of every shard", "",
           "| attribute | meaning |", "|---|---|"]
    out += [f"| `{name}` | {doc} |" for name, doc in COMMON_ATTRS]
    for schema in SCHEMAS.values():
        out += ["", f"### {schema.stage}", "", schema.doc, "",
                "| dataset | dtype | shape | meaning |", "|---|---|---|---|"]
        for c in schema.columns:
            dtype = {STR: "UTF-8 string (vlen)", BYTES: "uint8 (vlen)"}.get(c.kind, " or ".join((*c.also, c.kind)))
            shape = "[" + ", ".join((c.rows, *c.inner)) + "]"
            notes = []
            if c.counts:
                notes.append(f"counts the `{c.counts}` rows of each `{c.rows}` row")
            if c.family:
                notes.append({"discrete": "discrete backends only", "continuous": "continuous backends only",
                              "optional": "optional"}[c.family])
            extra = f" ({'; '.join(notes)})" if notes else ""
            out.append(f"| `{c.name}` | {dtype} | {shape} | {c.doc}{extra} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(schema_markdown(), end="")
