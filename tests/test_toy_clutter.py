"""The toy's question styles (issue #20, "Clutter"): `named` (the paper's, unchanged) and `exhaustive` (adds
"Are there exactly N objects?"). Expectations are by hand or recomputed from the scene list itself; the
named style's pretraining outputs are pinned to a digest taken before the styles existed."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from silmm import config as C
from silmm import models
from silmm.feedback import vqa_score
from silmm.questions import load_examples, parse_questions
from silmm.toy import evaluate as E
from silmm.toy import pretrain as PT
from silmm.toy import world as W
from silmm.toy.world import Obj

REPO = Path(__file__).resolve().parents[1]
TOY, SMOKE = REPO / "configs" / "toy.yaml", REPO / "configs" / "toy_smoke.yaml"
EXHAUSTIVE = REPO / "configs" / "examples" / "toy_exhaustive.yaml"
FAST = settings(max_examples=60, deadline=None)

RED_CIRCLE, BLUE_SQUARE = Obj(0, 0, "red", "circle"), Obj(3, 3, "blue", "square")


def total_answer(prompt: str, scene: list[Obj]) -> bool:
    """The oracle's answer to the total question: parse the rendered image, ask the parsed check."""
    check = W.parse_question(W.questions(prompt, "exhaustive")[-1])
    assert check == W.total_check(W.parse_prompt(prompt))
    return check.holds(W.parse(W.render(scene)))


# ------------------------------------------------------------------------------ questions by hand
@pytest.mark.parametrize("prompt, extra", [
    ("A red circle", "Is there exactly one object?"),
    ("A blue square and a red triangle", "Are there exactly two objects?"),
    ("Three green circles and two squares", "Are there exactly five objects?"),
    ("Four circles and four red squares", "Are there exactly eight objects?"),
    ("A circle on the left of a yellow square", "Are there exactly two objects?"),
])
def test_decomposition_under_each_style(prompt, extra):
    named = W.questions(prompt, "named")
    assert W.questions(prompt) == named  # named is the default
    assert W.questions(prompt, "exhaustive") == named + [extra]
    with pytest.raises(ValueError, match="question style"):
        W.questions(prompt, "chatty")


def test_named_decompositions_by_hand_are_unchanged():
    assert W.questions("Three green circles and two squares", "named") == [
        "Is there a circle?", "Are there three green circles?", "Is there a square?", "Are there two squares?"]
    assert W.questions("A circle on the left of a yellow square", "named") == [
        "Is there a circle?", "Is there a square?", "Is there a yellow square?",
        "Is the circle on the left of the yellow square?"]


@pytest.mark.parametrize("scene, yes", [
    ([RED_CIRCLE, BLUE_SQUARE], True),                                   # exactly what is named
    ([RED_CIRCLE, BLUE_SQUARE, Obj(1, 1, "green", "triangle")], False),  # an unnamed shape
    ([RED_CIRCLE, BLUE_SQUARE, Obj(1, 1, "red", "circle")], False),      # a second red circle: not named twice
    ([RED_CIRCLE], False),                                               # one missing: the total is wrong too
    ([], False),
])
def test_total_question_oracle_answers_by_hand(scene, yes):
    prompt = "A red circle and a blue square"
    assert W.questions(prompt, "exhaustive")[-1] == "Are there exactly two objects?"
    assert total_answer(prompt, scene) is yes


def test_an_unparseable_cell_counts_as_an_object():
    image = W.render([RED_CIRCLE, BLUE_SQUARE])
    image[W.CELL:2 * W.CELL, W.CELL:2 * W.CELL] = (1, 2, 3)  # an empty cell that no rendering is near
    check = W.parse_question("Are there exactly two objects?")
    assert not check.holds(W.parse(image))
    assert W.parse_question("Are there exactly three objects?").holds(W.parse(image))


# ------------------------------------------------------------------------------ parse round trip
@pytest.mark.parametrize("n", range(1, 9))
def test_total_questions_round_trip(n):
    check = W.Check("total", W.Phrase(W.ANY, None, n))
    q = check.question()
    assert q == ("is there exactly one object?" if n == 1 else f"are there exactly {W.TOTALS[n - 1]} objects?")
    assert W.parse_question(q) == check
    assert W.parse_question(" " + q.upper().replace("?", " ?")) == check


@FAST
@given(seed=st.integers(0, 2**32 - 1), category=st.sampled_from(W.CATEGORIES))
def test_exhaustive_questions_parse_back_to_their_checks(seed, category):
    spec = W.random_spec(category, random.Random(seed))
    checks = W.self_checks(spec, "exhaustive")
    assert checks[:-1] == W.checks(spec) and checks[-1].kind == "total"
    assert [W.parse_question(q) for q in W.questions(spec.text(), "exhaustive")] == checks
    # what the questions stage keeps of a model that writes the decomposition in the request's format
    written = "\n".join(f"{i}. {q}" for i, q in enumerate(W.questions(spec.text(), "exhaustive"), 1))[3:]
    assert parse_questions(written, 8) == W.questions(spec.text(), "exhaustive")


@pytest.mark.parametrize("junk", ["Are there exactly nine objects?", "Are there exactly zero objects?",
                                  "Are there five circles?", "Is there exactly a circle?", "Are there objects?"])
def test_parse_question_rejects_junk(junk):
    with pytest.raises(W.PromptError):
        W.parse_question(junk)


# -------------------------------------------------------------------- polarity: "yes" is good
@FAST
@given(seed=st.integers(0, 2**32 - 1), category=st.sampled_from(W.CATEGORIES), extra=st.integers(0, 3))
def test_a_perfect_answerer_scores_exhaustive_questions_as_strict(seed, category, extra):
    """Answers p(yes) = 1 exactly when the check holds: the generic score (mean p(yes) - p(no)) is 1 iff the
    image meets the prompt and holds nothing else (counted from the scene list, not by the world's
    parser), and the named style cannot tell a cluttered image from a clean one."""
    rng = random.Random(seed)
    spec = W.random_spec(category, rng)
    clean = W.scene_for(spec, rng)
    taken = {(o.row, o.col) for o in clean}
    free = [(r, c) for r in range(W.GRID) for c in range(W.GRID) if (r, c) not in taken]
    cluttered = clean + [Obj(r, c, rng.choice(list(W.COLOURS)), rng.choice(W.SHAPES)) for r, c in free[:extra]]

    def score(style, scene):
        holds = np.array([c.holds(W.parse(W.render(scene))) for c in W.self_checks(spec, style)], float)
        return vqa_score(holds, 1 - holds)

    strict = W.score(spec, W.render(cluttered)).overall == 1 and len(cluttered) == sum(p.count for p in spec.phrases)
    assert (score("exhaustive", cluttered) == 1.0) is strict
    assert score("exhaustive", clean) == 1.0
    if extra and W.score(spec, W.render(cluttered)).overall == 1:
        assert score("named", cluttered) == score("named", clean) == 1.0
        assert score("exhaustive", cluttered) < score("exhaustive", clean)


# ----------------------------------------------------------------- config, hash, cache key
def test_default_style_keeps_config_hashes():
    for path in (TOY, SMOKE):
        cfg = C.load(path)
        assert cfg.toy.question_style is C.ToyQuestionStyle.named
        assert "toy.question_style" not in C.result_keys(cfg)  # as before the key existed
        assert C.config_hash(C.load(path, ["toy.question_style=named"])) == C.config_hash(cfg)
        assert C.config_hash(C.load(path, ["toy.question_style=exhaustive"])) != C.config_hash(cfg)
    with pytest.raises(C.ConfigError, match="question_style"):
        C.load(SMOKE, ["toy.question_style=chatty"])


def test_exhaustive_config_is_toy_yaml_plus_the_style():
    toy, ex = C.load(TOY), C.load(EXHAUSTIVE)
    assert ex.toy.question_style is C.ToyQuestionStyle.exhaustive
    assert set(C.differing_keys(toy, ex)) == {"run.name", "model.path", "toy.question_style", "questions.icl_examples"}
    # its in-context examples are the style's own decompositions
    for prompt, qs in load_examples(ex.questions.icl_examples):
        assert qs == W.questions(prompt, "exhaustive")


def test_cache_key_differs_by_style_and_a_named_model_is_refused(tmp_path):
    examples = load_examples(C.load(SMOKE).questions.icl_examples)
    named = PT.cache_key(C.load(SMOKE).toy, examples)
    exhaustive = PT.cache_key(C.load(SMOKE, ["toy.question_style=exhaustive"]).toy, examples)
    assert "question_style" not in named  # models cached before the style existed stay valid
    assert exhaustive == {**named, "question_style": "exhaustive"}

    model = tmp_path / "lmm"
    model.mkdir()
    (model / models.PRETRAIN_RECORD).write_text(json.dumps({"key": named}))
    models.check_pretrained(C.load(SMOKE, [f"model.path={model}"]))  # the same settings: reused
    with pytest.raises(C.ConfigError, match="question_style differ"):
        models.check_pretrained(C.load(SMOKE, [f"model.path={model}", "toy.question_style=exhaustive"]))


# ------------------------------------------------------------------------------- pretraining
def _corpus(style: str, examples: str = "configs/examples/toy_questions.yaml") -> PT.Corpus:
    cfg = C.load(SMOKE, [f"toy.question_style={style}", f"questions.icl_examples={REPO / examples}"])
    ex = load_examples(cfg.questions.icl_examples)
    return PT.Corpus(PT.build_tokenizer(ex, style), cfg.toy, ex)


def test_named_pretraining_outputs_are_unchanged():
    """Tokenizer, one batch of each kind and 200 decompositions, digested by the code before the question
    styles existed (commit c2000a8): the cached named model and its runs stay what they were."""
    corpus = _corpus("named")
    h = hashlib.sha256(json.dumps(sorted(corpus.tok.get_vocab().items())).encode())
    for kind in PT.KINDS:
        for t in corpus.batch(kind, 6, 3, 5):
            h.update(t.numpy().tobytes())
    rng = random.Random(7)
    h.update(json.dumps([W.questions(W.random_spec(rng.choice(W.CATEGORIES), rng).text())
                         for _ in range(200)]).encode())
    assert h.hexdigest()[:16] == "1d6e0b12f7d4b3c5"


def test_exhaustive_pretraining_teaches_writing_the_total_question():
    corpus = _corpus("exhaustive", "configs/examples/toy_questions_exhaustive.yaml")
    ids, _, labels = corpus.batch("questions", 8, 0, 0)
    for row, lab in zip(ids, labels, strict=True):
        prompt = corpus.tok.decode(row[lab == -100]).rsplit("description :", 1)[1].split("questions :")[0]
        spec = W.parse_prompt(prompt.strip())
        written = corpus.tok.decode(row[lab != -100], skip_special_tokens=True)
        expected = " ".join(q.lower().replace("?", " ?") for q in W.questions(spec.text(), "exhaustive"))
        assert " ".join(w for w in written.split() if not w.rstrip(".").isdigit() and w != ".") == expected
        assert corpus.tok.unk_token_id not in row.tolist()


def test_exhaustive_pretraining_teaches_answering_the_total_question():
    """Every answer label in the yes/no batches equals the oracle's answer about the image encoded in the
    same row (decoded back from its codes); the total question is asked, with both answers."""
    corpus = _corpus("exhaustive", "configs/examples/toy_questions_exhaustive.yaml")
    code_of = {tid: code for code, tid in enumerate(corpus.image_ids)}
    suffix = len(corpus.words(corpus.answer_suffix))
    seen: dict[bool, int] = {True: 0, False: 0}
    for step in range(4):
        ids, mask, labels = corpus.batch("answer", 24, 0, step)
        for row, m, lab in zip(ids, mask, labels, strict=True):
            row, lab = row[m.bool()].tolist(), lab[m.bool()].tolist()
            eoi = row.index(corpus.eoi)
            image = corpus.codec.decode(torch.tensor([[code_of[t] for t in row[2:eoi]]]))[0]
            objects = W.parse(image)
            start = eoi + 1
            for i in range(eoi + 1, len(row)):
                if lab[i] == -100:
                    continue
                check = W.parse_question(corpus.tok.decode(row[start:i - suffix]))
                assert corpus.tok.decode([row[i]]) == ("yes" if check.holds(objects) else "no")
                if check.kind == "total":
                    seen[check.holds(objects)] += 1
                start = i + 1
    assert min(seen.values()) >= 5, seen


def test_evaluation_counts_the_styles_decomposition_as_exact():
    """questions_exact compares the written questions with the run's style's decomposition."""
    prompts = ["A red circle", "Three green circles"]

    class Writer:  # writes the exhaustive decomposition, draws one fitting scene, answers nothing in particular
        def generate(self, texts, seeds):
            return texts

        def decode(self, texts, seeds):
            return [W.render(W.scene_for(W.parse_prompt(t), random.Random(s))) for t, s in zip(texts, seeds, strict=True)]

        def write_text(self, requests, seeds, **kw):
            return ["\n".join(f"{i}. {q}" for i, q in enumerate(W.questions(r.rsplit("Description: ", 1)[1].split("\n")[0],
                                                                            "exhaustive"), 1))[3:] for r in requests]

        def yes_no(self, images, questions):
            return [(np.full(len(q), 0.5), np.full(len(q), 0.5)) for q in questions]

    examples = load_examples(str(EXHAUSTIVE.parent / "toy_questions_exhaustive.yaml"))
    for style, exact in (("exhaustive", True), ("named", False)):
        results, _ = E.evaluate_prompts(Writer(), prompts, 2, 0, 4, examples, style=style)
        assert [r.questions_exact for r in results] == [exact, exact]
        assert results[0].questions == W.questions(prompts[0], "exhaustive")
