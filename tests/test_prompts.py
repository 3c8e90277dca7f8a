import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silmm import prompts as P

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
    assert P.read_prompt_files(single, 77, "reject").categories == ["file", "file"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no .txt prompt files"):
        P.read_prompt_files(tmp_path / "empty", 77, "reject")


def test_truncate_with_a_real_token_counter():
    chars = lambda s: len(s)  # noqa: E731  (a stand-in tokenizer: one token per character)
    assert P.truncate_to_tokens("aa bb cc dd", 5, chars) == "aa bb"


def test_first_occurrences():
    assert P.first_occurrences(["A cat", "a dog", "a CAT ", "A dog", "x"]) == [True, True, False, False, True]
