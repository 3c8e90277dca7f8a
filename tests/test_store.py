import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from silmm import store as S

META = S.ShardMeta("samples", iteration=1, shard_index=0, shard_count=1, config_hash="abc123")


# ------------------------------------------------------------------------------ helpers
def column_strategy(col: S.Column, n: int, inner: dict[str, int], kind: str | None = None):
    shape = (n, *(inner[a] for a in col.inner))
    kind = kind or col.kind
    if col.kind == S.STR:
        text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
        return st.lists(text, min_size=n, max_size=n)
    if col.kind == S.BYTES:
        return st.lists(st.binary(max_size=40), min_size=n, max_size=n)
    if kind == "bool":
        elems = st.booleans()
    elif kind in ("int64", "int32"):
        info = np.iinfo(kind)
        elems = st.integers(int(info.min), int(info.max))
    else:
        elems = st.floats(allow_nan=True, allow_infinity=True, width=16 if kind == "float16" else 32)
    size = int(np.prod(shape))
    return st.lists(elems, min_size=size, max_size=size).map(
        lambda xs, shape=shape, kind=kind: np.array(xs, dtype=kind).reshape(shape))


@st.composite
def tables(draw, stage: str, family: str | None = None):
    """A random valid table for a stage: row counts, inner sizes and counts consistent."""
    schema = S.SCHEMAS[stage]
    rows = {c.rows for c in schema.columns}
    n = {r: draw(st.integers(0, 5)) for r in rows}
    inner = {"T": draw(st.integers(1, 4)), "L": draw(st.integers(1, 3)), "D": draw(st.integers(1, 3))}
    cols = [c for c in schema.columns if c.family in (None, family)]
    data = {}
    for c in cols:
        if c.counts:
            # split the child rows among the parents
            parents, children = n[c.rows], n[c.counts]
            if parents == 0:
                n[c.counts] = children = 0
                data[c.name] = np.zeros(0, dtype=c.kind)
                continue
            cuts = sorted(draw(st.lists(st.integers(0, children), min_size=parents - 1, max_size=parents - 1)))
            data[c.name] = np.diff([0, *cuts, children]).astype(c.kind)
    precision = draw(st.sampled_from(["float32", "float16"]))  # store.features_dtype: one for H and H_r
    for c in cols:
        if not c.counts:
            data[c.name] = draw(column_strategy(c, n[c.rows], inner, precision if c.also else None))
    return data


def assert_same(a, b, kind):
    if kind in (S.STR, S.BYTES):
        assert [bytes(x) if kind == S.BYTES else x for x in a] == [bytes(x) if kind == S.BYTES else x for x in b]
    else:
        assert a.dtype == np.dtype(kind) and a.shape == b.shape
        assert a.tobytes() == np.asarray(b, dtype=kind).tobytes()  # bit-exact, NaN payloads included


def sample_record(pid: int, n: int = 3, T: int = 4) -> dict:
    rng = np.random.default_rng(pid)
    return {
        "prompt_id": np.full(n, pid), "sample_index": np.arange(n), "seed": rng.integers(0, 2**62, n),
        "tokens": rng.integers(0, 1000, (n, T)), "ref_logprob": rng.normal(size=n).astype(np.float32),
        "image_png": [rng.bytes(int(rng.integers(0, 30))) for _ in range(n)],
    }


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize(("stage", "family"), [("prompts", None), ("questions", None), ("scores", None),
                                               ("samples", "discrete"), ("samples", "continuous"),
                                               ("pairs", "discrete"), ("pairs", "continuous"),
                                               ("scores", "optional")])
def test_round_trip_every_stage_and_dtype(tmp_path_factory, stage, family):
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=tables(stage, family), compression=st.sampled_from(["gzip", "lzf", "none"]))
    def check(data, compression):
        path = tmp_path_factory.mktemp("rt") / "shard.h5"
        meta = S.ShardMeta(stage, 2, 3, 7, "deadbeef", {"note": "x"})
        S.write_shard(path, meta, data, S.StoreOptions(compression=compression))
        shard = S.read_shard(path, stage=stage, config_hash="deadbeef", iteration=2, verify_checksums=True)
        assert shard.meta == meta
        assert set(shard.data) == set(data)
        for name, values in data.items():
            kind = S.SCHEMAS[stage].column(name).kind
            assert_same(shard[name], values, values.dtype.name if kind in S.NUMERIC else kind)
        assert [p.name for p in path.parent.iterdir()] == ["shard.h5"]  # no temporary left behind

    check()


def test_float16_features_and_per_row_chunks(tmp_path):
    path = tmp_path / "s.h5"
    feats = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    data = {"prompt_id": [1, 1, 1], "sample_index": [0, 1, 2], "seed": [1, 2, 3], "features": feats,
            "image_png": [b"", b"", b""], "ref_prompt_id": [1], "ref_features": feats[:1]}
    S.write_shard(path, META, data)
    with h5py.File(path) as f:
        assert f["features"].chunks == (1, 4, 5) and f["features"].compression == "gzip"
        assert f["image_png"].dtype == h5py.vlen_dtype(np.uint8)
        assert h5py.check_string_dtype(f["image_png"].dtype) is None
    assert np.array_equal(S.read_shard(path)["features"], feats)


# ------------------------------------------------------------------------------ refusing bad input
def test_write_refuses_inconsistent_tables_and_writes_nothing(tmp_path):
    path = tmp_path / "q.h5"
    meta = S.ShardMeta("questions", 1, 0, 1, "h")
    good = {"prompt_id": [1, 2], "question_count": [1, 2], "fallback": [False, True], "question": ["a?", "b?", "c?"]}
    with pytest.raises(S.ShardError, match="'question_count' sums to 4 but there are 3 questions rows"):
        S.write_shard(path, meta, {**good, "question_count": [2, 2]})
    with pytest.raises(S.ShardError, match="'fallback' has 3 prompts rows"):
        S.write_shard(path, meta, {**good, "fallback": [False, True, True]})
    with pytest.raises(S.ShardError, match="missing column 'question'"):
        S.write_shard(path, meta, {k: v for k, v in good.items() if k != "question"})
    with pytest.raises(S.ShardError, match="unknown columns.*'answer'"):
        S.write_shard(path, meta, {**good, "answer": [1]})
    with pytest.raises(S.ShardError, match="'question' holds strings"):
        S.write_shard(path, meta, {**good, "question": ["a?", 3, "c?"]})
    with pytest.raises(S.ShardError, match="'question' has a string with a NUL"):
        S.write_shard(path, meta, {**good, "question": ["a?", "b\x00", "c?"]})
    with pytest.raises(S.ShardError, match="'question' has a string that is not valid UTF-8"):
        S.write_shard(path, meta, {**good, "question": ["a?", "b\ud800", "c?"]})
    with pytest.raises(S.ShardError, match="'prompt_id' is int64, got floats"):
        S.write_shard(path, meta, {**good, "prompt_id": [1.5, 2.0]})
    samples = sample_record(1)
    with pytest.raises(S.ShardError, match="discrete columns present but \\['ref_logprob'\\] missing"):
        S.write_shard(path, META, {k: v for k, v in samples.items() if k != "ref_logprob"})
    with pytest.raises(S.ShardError, match="mixes discrete-only and continuous-only"):
        S.write_shard(path, META, {**samples, "features": np.zeros((3, 1, 1))})
    with pytest.raises(S.ShardError, match="'prompt_id' is int64, got floats"):
        S.write_shard(path, meta, {**good, "prompt_id": [1.5, 2.0]})
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_truncated_mismatched_and_corrupt(tmp_path):
    path = tmp_path / "shard_00000.h5"
    S.write_shard(path, META, sample_record(5, n=40, T=64))
    with pytest.raises(S.ShardError, match="config hash abc123 differs from the run's zzz"):
        S.read_shard(path, config_hash="zzz")
    with pytest.raises(S.ShardError, match="is a 'samples' shard, expected 'scores'"):
        S.read_shard(path, stage="scores")
    with pytest.raises(S.ShardError, match="iteration 1, expected 2"):
        S.read_shard(path, iteration=2)
    # silent corruption of the data: structure still fine, checksum catches it
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(path.read_bytes())
    with h5py.File(corrupt, "r+") as f:
        f["ref_logprob"][0] = 123.0
    assert not S.is_complete(corrupt)  # completion checks verify checksums too
    assert "checksum mismatch in dataset 'ref_logprob'" in S.validate_shard(corrupt)
    # truncation (a copy cut short)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    problem = S.validate_shard(truncated)
    assert problem and str(truncated) in problem and "truncated or corrupt" in problem
    assert not S.is_complete(truncated)
    # a dataset shorter than the rows the shard records
    short = tmp_path / "short.h5"
    short.write_bytes(path.read_bytes())
    with h5py.File(short, "r+") as f:
        del f["seed"]
        f["seed"] = np.arange(3)
    assert "dataset 'seed' has 3 rows" in S.validate_shard(short)
    assert S.validate_shard(path) is None


# ------------------------------------------------------------------------------ resumable writing
def content(path: Path) -> dict[str, bytes]:
    """Each dataset's content as bytes (variable-length rows length-prefixed)."""
    out = {}
    shard = S.read_shard(path)
    for name, arr in shard.data.items():
        if arr.dtype == object:
            out[name] = b"".join(len(bytes(x if not isinstance(x, str) else x.encode())).to_bytes(8, "little")
                                 + (x.encode() if isinstance(x, str) else bytes(x)) for x in arr)
        else:
            out[name] = arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()
    return out


def test_resume_from_progress_equals_uninterrupted(tmp_path):
    ids = list(range(100, 111))
    ref = S.ShardWriter(tmp_path / "ref" / "shard_00000.h5", META, flush_every=3)
    for pid in ids:
        ref.add(pid, sample_record(pid))
    ref.finish()

    path = tmp_path / "run" / "shard_00000.h5"
    first = S.ShardWriter(path, META, flush_every=3)
    for pid in ids[:8]:
        first.add(pid, sample_record(pid))  # 6 flushed in two parts, 2 pending and lost
    del first
    assert not path.exists()
    second = S.ShardWriter(path, META, flush_every=3)
    assert second.done == set(ids[:6]) and second.keys_written == ids[:6]
    for pid in ids:
        if pid not in second.done:
            second.add(pid, sample_record(pid))
    second.finish()
    assert content(path) == content(tmp_path / "ref" / "shard_00000.h5")
    assert not (tmp_path / "run" / "shard_00000.h5.progress").exists()


def test_progress_of_another_config_is_refused(tmp_path):
    path = tmp_path / "shard_00000.h5"
    w = S.ShardWriter(path, META, flush_every=1)
    w.add(1, sample_record(1))
    w.add(2, sample_record(2))
    other = S.ShardMeta("samples", 1, 0, 1, "other-hash")
    fresh = S.ShardWriter(path, other)  # never resumed from: moved aside, its prompts redone
    assert fresh.done == set()
    kept = sorted(p.name for p in w.progress_dir.iterdir())
    assert len(kept) == 2 and all(".bad-" in n for n in kept)
    # a bad part in the middle: the parts before it are kept (a prefix of the task's order), the rest redone
    w = S.ShardWriter(tmp_path / "b" / "shard_00000.h5", META, flush_every=1)
    for pid in range(3):
        w.add(pid, sample_record(pid))
    with h5py.File(w.parts[1], "r+") as f:
        f["seed"][0] += 1
    resumed = S.ShardWriter(w.path, META)
    assert resumed.keys_written == [0] and [p.name for p in resumed.parts] == ["part_00000.h5"]


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tests.test_store import META, sample_record
    from silmm import store as S
    out = sys.argv[1]
    for round_ in range(1000):
        w = S.ShardWriter(f"{{out}}/shard_{{round_ % 3:05d}}.h5", META, flush_every=2)
        for pid in range(12):
            if pid not in w.done:
                w.add(pid, sample_record(pid, n=4, T=256))
        w.finish()
        import os; os.remove(f"{{out}}/shard_{{round_ % 3:05d}}.h5")
""")


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_valid_looking_bad_shard(tmp_path):
    ref = tmp_path / "ref" / "shard_00000.h5"
    w = S.ShardWriter(ref, META, flush_every=2)
    for pid in range(12):
        w.add(pid, sample_record(pid, n=4, T=256))
    w.finish()
    expected = content(ref)

    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(Path(__file__).resolve().parents[1])))
    rng = random.Random(0)
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(script), str(out)])
        time.sleep(0.8 + rng.random() * 1.5)  # past the import, somewhere inside the write loop
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        for final in out.glob("shard_*.h5"):
            assert S.validate_shard(final) is None, final
            assert content(final) == expected
        for part in out.glob("*.progress/part_*.h5"):
            assert S.validate_shard(part) is None, part
    # every interrupted shard resumes to the uninterrupted content
    for i in range(3):
        path = out / f"shard_{i:05d}.h5"
        w = S.ShardWriter(path, META, flush_every=2)
        for pid in range(12):
            if pid not in w.done:
                w.add(pid, sample_record(pid, n=4, T=256))
        w.finish()
        assert content(path) == expected
    assert kills == 12


def test_schema_is_documented_in_shards_readme():
    readme = (Path(__file__).resolve().parents[1] / "shards" / "README.md").read_text()
    assert S.schema_markdown() in readme, "regenerate the schema section: python -m silmm.store"
    for stage, schema in S.SCHEMAS.items():
        assert f"### {stage}" in readme and all(f"`{c.name}`" in readme for c in schema.columns)


def test_stream_writer_equals_write_shard_of_the_concatenated_blocks(tmp_path):
    blocks = [sample_record(pid, n=3, T=16) for pid in range(5)]
    whole = S.write_shard(tmp_path / "whole" / "shard_00000.h5", META, S.concat_records("samples", blocks, "test"))
    with S.StreamWriter(tmp_path / "stream" / "shard_00000.h5", META) as w:
        for b in blocks:
            w.append(b)
    assert content(w.path) == content(whole)
    streamed, written = S.read_shard(w.path).attrs, S.read_shard(whole).attrs
    assert streamed["checksums"] == written["checksums"] and streamed["row_counts"] == written["row_counts"]
    # an exception leaves nothing behind, under the final name or a temporary one
    out = tmp_path / "failed" / "shard_00000.h5"
    with pytest.raises(S.ShardError, match="earlier blocks"), S.StreamWriter(out, META) as w:
        w.append(blocks[0])
        w.append(sample_record(9, n=3, T=8))  # rows of another shape
    assert list(out.parent.iterdir()) == []


def test_finish_holds_one_part_at_a_time(tmp_path):
    """The final shard is streamed from the parts: finishing 32 parts takes about one part's memory, not
    the whole shard's (which the concatenation used to hold twice)."""
    import tracemalloc

    w = S.ShardWriter(tmp_path / "shard_00000.h5", META, flush_every=1)
    for pid in range(32):
        w.add(pid, sample_record(pid, n=4, T=4096))  # 128 KiB of tokens per part
    part_bytes = 4 * 4096 * 8
    tracemalloc.start()
    path = w.finish()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * part_bytes < 32 * part_bytes, peak
    assert S.read_shard(path)["tokens"].shape == (128, 4096) and not w.progress_dir.exists()
