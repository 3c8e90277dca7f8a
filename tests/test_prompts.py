import hashlib
import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silmm import cli
from silmm import config as C
from silmm import prompts as P
from silmm.driver import Driver
from silmm.rundir import RunDir
from silmm.store import read_shard
from silmm.tasks import StageTask, run_task
from tests.helpers import tiny_run

VOCAB = P.Vocabulary.builtin()


@pytest.mark.parametrize(("noun", "plural"), [("cat", "cats"), ("box", "boxes"), ("strawberry", "strawberries"),
                                              ("mouse", "mice"), ("knife", "knives"), ("bus", "buses"),
                                              ("toy", "toys"), ("teddy bear", "teddy bears"), ("sheep", "sheep")])
def test_pluralize(noun, plural):
    assert P.pluralize(noun) == plural


@pytest.mark.parametrize(("phrase", "art"), [("apple", "an"), ("orange cat", "an"), ("red apple", "a"),
                                             ("umbrella", "an"), ("unicorn", "a"), ("hour", "an"),
                                             ("one-eyed cat", "a"), ("elephant", "an")])
def test_article(phrase, art):
    assert P.article(phrase) == art


def test_counted_uses_singular_for_one():
    assert P.counted("one", "fox") == "one fox" and P.counted("three", "fox") == "three foxes"


WELL_FORMED = re.compile(r"^[A-Z][a-z\-' ]+$")


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), category=st.sampled_from(P.CATEGORIES))
def test_templates_are_well_formed_for_every_category(seed, category):
    text = P.compose(category, VOCAB, random.Random(seed))
    assert WELL_FORMED.match(text), text
    words = text.lower().split()
    # article agreement everywhere in the sentence
    for art, nxt in zip(words, words[1:], strict=False):
        if art in ("a", "an"):
            assert art == P.article(nxt), text
    if category == "numeracy":
        assert words[0] in VOCAB.lists["quantities"]
    if category in ("spatial", "3d_spatial"):
        rels = VOCAB.lists["spatial relations" if category == "spatial" else "3d spatial relations"]
        assert any(f" {r} " in text for r in rels), text
    if category == "color":
        assert any(c in words for c in VOCAB.lists["colors"]), text


def test_category_mix_is_exact_and_order_seeded():
    cats = P.assign_categories(1000, {"color": 3, "spatial": 1, "complex": 1}, seed=5)
    assert (cats.count("color"), cats.count("spatial"), cats.count("complex")) == (600, 200, 200)
    assert cats == P.assign_categories(1000, {"color": 3, "spatial": 1, "complex": 1}, seed=5)
    assert cats != P.assign_categories(1000, {"color": 3, "spatial": 1, "complex": 1}, seed=6)
    with pytest.raises(ValueError, match="unknown categories \\['colour'\\]"):
        P.assign_categories(10, {"colour": 1}, 0)


def test_template_prompts_unique_and_independent_of_slicing():
    cats = P.assign_categories(600, {c: 1 for c in P.TEMPLATE_CATEGORIES}, seed=0)
    full = P.template_prompts(cats, VOCAB, run_seed=0, iteration=1)
    assert len(full) == 600 and len({t.lower() for t in full.values()}) == 600
    assert full == P.template_prompts(cats, VOCAB, run_seed=0, iteration=1)
    assert full != P.template_prompts(cats, VOCAB, run_seed=0, iteration=2)


def test_vocabulary_from_model_with_garbage_fallback():
    answers = {
        "animals": "cat, dog, wolf, 12345, ###, a very very very long phrase of words here",
        "colors": "1. crimson\n2. teal\n3. Gold.\n- navy",
        "fruits": "!!@@##",
    }

    def write(requests):
        out = []
        for r in requests:
            name = re.search(r"List common (.+?) that", r).group(1)
            out.append(answers.get(name, ""))
        return out

    vocab = P.build_vocabulary(write)
    assert vocab.lists["animals"] == ["cat", "dog", "wolf"] and vocab.sources["animals"] == "model"
    assert vocab.lists["colors"] == ["crimson", "teal", "gold", "navy"]
    assert vocab.lists["fruits"] == P.BUILTIN_VOCABULARY["fruits"] and vocab.sources["fruits"] == "builtin"
    assert P.Vocabulary.from_json(vocab.to_json()) == vocab


@pytest.mark.parametrize(("out", "expected"), [
    ("A cat is chasing a mouse.\nA dog...", "A cat is chasing a mouse"),
    ("  - \"the man holds an umbrella\"", "The man holds an umbrella"),
    ("cat", None), ("<unk> <unk> <unk> <unk>", None), ("", None), ("12 34 56 78 ab", None),
])
def test_parse_icl_prompt(out, expected):
    assert P.parse_icl_prompt(out) == expected


def test_prompt_files_with_bad_lines(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    (d / "color_val.txt").write_bytes(b"A red apple\n\n  \nA red apple\na RED apple\nA blue \xff\xfe cup\n"
                                      b"A green car\n")
    (d / "spatial_val.txt").write_bytes(b"A cat on the left of a dog\n" + b"word " * 100 + b"\n")
    fp = P.read_prompt_files(d, max_tokens=20, overlong="truncate")
    assert fp.texts == ["A red apple", "A green car", "A cat on the left of a dog", " ".join(["word"] * 20)]
    assert fp.categories == ["color", "color", "spatial", "spatial"]
    assert fp.counts == {"empty": 2, "duplicate": 2, "not_utf8": 1, "overlong_truncated": 1, "kept": 4}
    rejected = P.read_prompt_files(d, max_tokens=20, overlong="reject")
    assert rejected.counts["overlong_rejected"] == 1 and len(rejected.texts) == 3
    single = tmp_path / "p.txt"
    single.write_text("one prompt\nanother prompt\n")
    assert P.read_prompt_files(single, 77, "reject", file_categories={"p.txt": "complex"}).categories == [
        "complex", "complex"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(P.PromptFileError, match="empty: no .txt prompt files"):
        P.read_prompt_files(tmp_path / "empty", 77, "reject")
    utf16 = tmp_path / "color.txt"
    utf16.write_text("A red apple\n", encoding="utf-16")
    with pytest.raises(P.PromptFileError, match="color.txt: UTF-16 text"):
        P.read_prompt_files(utf16, 77, "reject")


def test_truncate_with_a_real_token_counter():
    chars = lambda s: len(s)  # noqa: E731  (a stand-in tokenizer: one token per character)
    assert P.truncate_to_tokens("aa bb cc dd", 5, chars) == "aa bb"


def test_first_occurrences():
    assert P.first_occurrences(["A cat", "a dog", "a CAT ", "A dog", "x"]) == [True, True, False, False, True]


# ------------------------------------------------------------------- prompt files (prompts.source=files)
def bench(root, sizes: dict[str, int], name="bench"):
    """A T2I-CompBench-style folder: `<category>_val.txt` with `n` distinct prompts each."""
    d = root / name
    d.mkdir()
    for category, n in sizes.items():
        (d / f"{category}_val.txt").write_text("".join(f"A {category} prompt number {i}\n" for i in range(n)))
    return d


def files_config(tmp_path, files, *overrides):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    return C.load(None, [f"run.root={tmp_path / 'runs'}", f"model.path={ckpt}", "prompts.source=files",
                         f"prompts.files={files}", *overrides])


def test_normalise_text():
    assert P.normalise_text("\ufeffA  red\u200b cafe\u0301\x07\t ") == ("A red café", [
        "invisible_removed", "control_removed", "nfc_changed", "whitespace_collapsed"])
    assert P.normalise_text("  A red apple \r") == ("A red apple", [])  # stripping the ends is not a change
    for invisible in "\u200b\u200c\u200d\u2060\ufeff":
        assert P.normalise_text(f"A{invisible} cat")[0] == "A cat"


def test_text_is_normalised_before_deduplication(tmp_path, caplog):
    f = tmp_path / "color_val.txt"
    f.write_bytes("\n".join([
        "\ufeffA red caf\u00e9",  # 1: byte-order mark
        "A red cafe\u0301",  # 2: decomposed: NFC makes it line 1
        "A\u200b red\u2060 caf\u00e9\u200d",  # 3: zero-width characters
        "A\tred  caf\u00e9\x07",  # 4: a control character, a tab, two spaces
        "A\u00a0blue\u200c cup\x00",  # 5: no-break space, zero-width non-joiner, NUL
        "\u200b\ufeff \t",  # 6: nothing visible
        "A blue cup",  # 7
    ]).encode() + b"\n")
    with caplog.at_level("INFO", logger="silmm.prompts"):
        fp = P.read_prompt_files(f, None, "reject")
    assert fp.texts == ["A red caf\u00e9", "A blue cup"] and fp.lines == [1, 5]
    assert fp.counts == {"invisible_removed": 4, "nfc_changed": 1, "control_removed": 2, "whitespace_collapsed": 2,
                         "empty": 1, "duplicate": 4, "kept": 2}
    assert "'duplicate': 4" in caplog.text and "'nfc_changed': 1" in caplog.text


def test_a_truncation_that_leaves_nothing_is_refused(tmp_path):
    f = tmp_path / "complex_val.txt"
    f.write_text("A red apple on a table\nSupercalifragilistic is a word\n")
    with pytest.raises(P.PromptFileError, match=re.escape(f"{f}:2: prompts.overlong=truncate would leave nothing")):
        P.read_prompt_files(f, 10, "truncate", len)  # one token per character
    fine = P.read_prompt_files(f, 25, "truncate", len)  # every first word fits: both are cut, neither refused
    assert fine.texts == ["A red apple on a table", "Supercalifragilistic is a"]


@pytest.mark.parametrize(("name", "category"), [
    ("color_val.txt", "color"), ("3d_spatial_val.txt", "3d_spatial"), ("non_spatial_val.txt", "non_spatial"),
    ("complex_val_action.txt", "complex"), ("complex_val_spatial.txt", "complex"), ("numeracy.txt", "numeracy"),
    ("shape_train.txt", "shape"), ("spatial_test.txt", "spatial")])
def test_category_from_a_t2i_compbench_file_name(name, category):
    from pathlib import Path

    assert P.category_of_file(Path(name)) == category


def test_categories_from_the_mapping_and_unknown_ones_name_the_file(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "color_val.txt").write_text("A red apple\n")
    (d / "people.txt").write_text("A man holding a cup\n")
    with pytest.raises(P.PromptFileError, match=re.escape(f"{d / 'people.txt'}: its name gives the category "
                                                          "'people'") + ".*prompts.file_categories=\\{people.txt"):
        P.read_prompt_files(d, None, "reject")
    mapping = {"people.txt": "non_spatial", "color_val.txt": "shape"}
    fp = P.read_prompt_files(d, None, "reject", file_categories=mapping)
    assert fp.categories == ["shape", "non_spatial"] and fp.files == ["color_val.txt", "people.txt"]
    with pytest.raises(P.PromptFileError, match="people.txt: prompts.file_categories maps it to the category 'vib"):
        P.read_prompt_files(d, None, "reject", file_categories={"people.txt": "vibes"})
    with pytest.raises(P.PromptFileError, match="names \\['peple.txt'\\], which are not among its prompt files"):
        P.read_prompt_files(d, None, "reject", file_categories={"peple.txt": "complex"})
    # the same through the config: an unknown category stops at load time, naming the key and the file
    with pytest.raises(C.ConfigError, match="key 'prompts.files': .*people.txt: its name gives"):
        files_config(tmp_path, d)
    cfg = files_config(tmp_path, d, "prompts.file_categories={people.txt: non_spatial}")
    assert cfg.prompts.file_categories == {"people.txt": "non_spatial"}
    with pytest.raises(C.ConfigError, match="key 'prompts.file_categories': .*prompts.source=files only"):
        C.load(None, [f"model.path={tmp_path / 'ckpt'}", "prompts.file_categories={people.txt: complex}"])
    with pytest.raises(C.ConfigError, match="key 'prompts.categories': unknown categories \\['colour'\\]"):
        files_config(tmp_path, d, "prompts.file_categories={people.txt: non_spatial}", "prompts.categories.colour=1")


def test_count_draws_across_categories_as_the_weights_say(tmp_path):
    found = P.read_prompt_files(bench(tmp_path, {"color": 20, "shape": 20, "spatial": 20}), None, "reject")
    weights = {"color": 2.0, "shape": 1.0, "spatial": 1.0}
    rows, table = P.draw_file_prompts(found, 8, weights, run_seed=0, iteration=1)
    assert Counter(found.categories[r] for r in rows) == P.apportion(8, weights) == {
        "color": 4, "shape": 2, "spatial": 2}
    assert table == {"color": {"share": 4, "available": 20, "taken": 4},
                     "shape": {"share": 2, "available": 20, "taken": 2},
                     "spatial": {"share": 2, "available": 20, "taken": 2}}
    assert rows == sorted(set(rows))  # file order, no repeats
    assert [r for r in rows if r < 20] != [0, 1, 2, 3]  # drawn, not the first ones of the file
    assert (rows, table) == P.draw_file_prompts(found, 8, weights, run_seed=0, iteration=1)  # seeded
    assert P.draw_file_prompts(found, 8, weights, run_seed=0, iteration=2)[0] != rows  # a new draw per iteration
    assert P.draw_file_prompts(found, 8, weights, run_seed=1, iteration=1)[0] != rows  # and per run seed
    everything, _ = P.draw_file_prompts(found, 1000, weights, run_seed=0, iteration=1)
    assert everything == list(range(60))


def test_a_category_short_of_its_share_gives_all_it_has_and_says_so(tmp_path, caplog):
    found = P.read_prompt_files(bench(tmp_path, {"color": 20, "spatial": 3, "texture": 5}), None, "reject")
    weights = {"color": 1.0, "spatial": 1.0, "shape": 1.0, "texture": 0.0}  # shape: no file; texture: no weight
    with caplog.at_level("WARNING", logger="silmm.prompts"):
        rows, table = P.draw_file_prompts(found, 12, weights, run_seed=0, iteration=1)
    assert table == {"color": {"share": 6, "available": 20, "taken": 6},
                     "spatial": {"share": 6, "available": 3, "taken": 3}}
    assert Counter(found.categories[r] for r in rows) == {"color": 6, "spatial": 3}
    assert "prompts.count=12 asks for 6 spatial prompts; spatial_val.txt has 3: all taken" in caplog.text
    assert "no prompt file has the categories shape" in caplog.text
    assert "the 5 prompts of category texture (texture_val.txt) are not used" in caplog.text


def test_a_prompt_source_without_prompts_stops_at_config_time(tmp_path):
    f = tmp_path / "color_val.txt"
    f.write_bytes(b"\xef\xbb\xbf\n  \n\xe2\x80\x8b\n\t\n")  # a byte-order mark, blanks, a zero-width space
    with pytest.raises(C.ConfigError, match=re.escape(f"key 'prompts.files': {f}: the prompt files (color_val.txt) "
                                                      "yield no prompt (4 empty, 2 invisible removed)")):
        files_config(tmp_path, f)
    # `silmm run` stops with exit status 2 before the run directory exists or anything is submitted
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"run:\n  root: {tmp_path / 'runs'}\nmodel:\n  path: {tmp_path / 'ckpt'}\n"
                        f"prompts:\n  source: files\n  files: {f}\n")
    assert cli.main(["run", str(cfg_file)]) == 2
    assert not (tmp_path / "runs").exists()
    f.write_text("A red apple\n")  # a prompt, but of a category prompts.categories gives no weight
    with pytest.raises(C.ConfigError, match="prompts.categories gives no weight to the categories of its prompt "
                                            "files \\(color_val.txt: color\\)"):
        files_config(tmp_path, f, "prompts.categories.color=0")


def test_the_prompt_files_hash_is_part_of_the_run_identity(tmp_path):
    d = bench(tmp_path, {"color": 3, "spatial": 3})
    cfg = files_config(tmp_path, d)
    assert cfg.prompts.files_sha256 == {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16]
                                        for f in sorted(d.glob("*.txt"))}
    run = RunDir.create_or_open(cfg)
    assert RunDir.create_or_open(files_config(tmp_path, d)).config_hash == run.config_hash  # unchanged: reopens
    words = lambda s: len(s.split())  # noqa: E731
    P.select_file_prompts(run.config.prompts, 0, 1, words)  # the stage's own check passes

    with (d / "color_val.txt").open("a") as fh:
        fh.write("A yellow prompt added under the run\n")
    assert C.config_hash(files_config(tmp_path, d)) != run.config_hash
    with pytest.raises(C.ConfigError, match="prompts.files_sha256.color_val.txt: .*\\n\\(prompts.files_sha256: the "
                                            "prompt files were edited since the run was created\\)"):
        RunDir.create_or_open(files_config(tmp_path, d))  # `silmm run` again: refused
    running = RunDir.open(run.path).config.prompts  # a driver or task of the run, with its frozen config
    with pytest.raises(P.PromptFileError, match="changed since the run was created \\(edited: color_val.txt\\)"):
        P.select_file_prompts(running, 0, 1, words)
    (d / "shape_val.txt").write_text("A round cup\n")
    (d / "spatial_val.txt").unlink()
    with pytest.raises(P.PromptFileError, match="\\(edited: color_val.txt; added: shape_val.txt; removed: "
                                                "spatial_val.txt\\)"):
        P.select_file_prompts(running, 0, 1, words)


def test_prompt_rows_record_their_file_and_line(tiny_checkpoints, tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    (d / "color_val.txt").write_bytes(b"\xef\xbb\xbfA red apple\n\nA blue  cup\nA red apple\n")
    (d / "spatial_val.txt").write_text("A cat on the left of a dog\n\n\nA cup below a lamp\n")
    run = tiny_run(tmp_path / "r", tiny_checkpoints("janus"), "janus", "prompts.source=files", f"prompts.files={d}",
                   "sharding.prompts_per_shard=3")  # prompts.count=6: 3 per category, fewer available
    for shard in range(2):
        run_task(StageTask(str(run.path), 1, "prompts", shard))
    shards = [read_shard(run.shard_path(1, "prompts", i), "prompts", run.config_hash, 1) for i in range(2)]
    rows = [(t, c, f, int(n)) for s in shards
            for t, c, f, n in zip(s["text"], s["category"], s["source_file"], s["source_line"], strict=True)]
    assert rows == [("A red apple", "color", "color_val.txt", 1), ("A blue cup", "color", "color_val.txt", 3),
                    ("A cat on the left of a dog", "spatial", "spatial_val.txt", 1),
                    ("A cup below a lamp", "spatial", "spatial_val.txt", 4)]
    for text, _, name, line in rows:  # each row leads back to its line
        assert P.normalise_text((d / name).read_text(encoding="utf-8").splitlines()[line - 1])[0] == text
    assert shards[0].meta.shard_count == 2 and shards[0].meta.extra["category_counts"] == {
        "color": {"share": 3, "available": 2, "taken": 2}, "spatial": {"share": 3, "available": 2, "taken": 2}}
    assert shards[0].meta.extra["file_counts"] == {"invisible_removed": 1, "whitespace_collapsed": 1, "empty": 3,
                                                   "duplicate": 1, "kept": 4}
    # a file edited under the run: the prompts stage refuses it
    (d / "spatial_val.txt").write_text("A cat on the right of a dog\n")
    run.shard_path(1, "prompts", 1).unlink()
    with pytest.raises(P.PromptFileError, match="edited: spatial_val.txt"):
        run_task(StageTask(str(run.path), 1, "prompts", 1))


def test_files_that_give_no_prompt_within_max_tokens_stop_the_driver_before_any_job(tiny_checkpoints, tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    (d / "color_val.txt").write_text("A red apple\nA blue cup\n")  # 3 tokens each in the tiny tokenizer
    run = tiny_run(tmp_path / "r", tiny_checkpoints("janus"), "janus", "prompts.source=files", f"prompts.files={d}",
                   "prompts.max_tokens=2", "prompts.overlong=reject", "executor.kind=debug")  # config time: fine
    with pytest.raises(P.PromptFileError, match=re.escape(f"{d}: the prompt files (color_val.txt) yield no prompt "
                                                          "(2 overlong rejected)")):
        Driver(run).run_stage(1, "prompts")
    assert not (run.path / "jobs.json").exists() and not run.stage_dir(1, "prompts").exists()
