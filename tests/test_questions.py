import pytest
from hypothesis import given
from hypothesis import strategies as st

from silmm import questions as Q


def test_request_ends_ready_for_the_first_question_and_shows_examples():
    req = Q.question_request("A blue car")
    assert req.endswith("Description: A blue car\nQuestions:\n1.")
    assert "Is the apple red?" in req


@pytest.mark.parametrize(("output", "expected"), [
    (" Is there a car?\n2. Is the car blue?\n3. Is the car blue?", ["Is there a car?", "Is the car blue?"]),
    (" is there a car? 2. are the wheels black?", ["Is there a car?", "Are the wheels black?"]),
    ("There is a car.\nWhat color is it?\nCar?\n- Does the car have wheels? yes", ["Does the car have wheels?"]),
    ("<unk><unk>\x00 ?? ## !!", []),
    ("", []),
    ("Q1: Is there a dog?\nQuestion 2: Is the dog brown?\n(3) Is it running?", ["Is there a dog?", "Is the dog brown?",
                                                                            "Is it running?"]),
    ("Is " + "very " * 80 + "long?", []),
])
def test_parse_questions_against_adversarial_outputs(output, expected):
    assert Q.parse_questions(output, max_questions=8) == expected


def test_parse_questions_caps_the_count():
    out = "\n".join(f"Is there object {i}?" for i in range(20))
    assert len(Q.parse_questions(out, max_questions=5)) == 5


@given(st.text(max_size=300))
def test_parse_questions_never_returns_malformed(output):
    for q in Q.parse_questions(output, max_questions=8):
        assert q.endswith("?") and q.split()[0].lower() in Q._AUXILIARIES and "\x00" not in q


def test_prompt_q_and_phrase_q():
    assert Q.prompt_q("A red apple and a blue cup.") == ["A red apple and a blue cup?"]
    assert Q.phrase_q("A red apple and a blue cup") == ["A red apple?", "a blue cup?"]
    assert Q.phrase_q("Three dogs on the left of a wooden bench") == ["Three dogs?", "a wooden bench?"]
    assert Q.phrase_q("A girl is holding a yellow umbrella") == ["A girl?", "a yellow umbrella?"]
    assert Q.phrase_q("## 42") == ["## 42?"]  # nothing chunkable: the prompt itself


# ----------------------------------------------------------------------------------- noun phrases
_NO_SPACY = Q._spacy_chunks("a cat") is None


@pytest.mark.parametrize(("prompt", "expected"), [  # T2I-CompBench-style attribute prompts
    ("a green bench and a red car", ["a green bench", "a red car"]),
    ("A fluffy towel and a metallic spoon", ["A fluffy towel", "a metallic spoon"]),
    ("a round bagel and a rectangular phone", ["a round bagel", "a rectangular phone"]),
    ("two cats sleeping on a sofa", ["two cats", "a sofa"]),
    ("a man wearing a blue shirt is riding a brown horse", ["a man", "a blue shirt", "a brown horse"]),
    ("a wooden ceiling and a leather string", ["a wooden ceiling", "a leather string"]),  # -ing nouns stay
    ("a painting of a king hanging in an old building", ["a painting", "a king", "an old building"]),
    ("a tree covered in snow behind a red shed", ["a tree", "snow", "a red shed"]),
    ("Is there a red apple on the table?", ["a red apple", "the table"]),
    ("Are there three dogs?", ["three dogs"]),
    ("There is a cup of 3.5 liters.", ["a cup", "3.5 liters"]),
    ("The sky is blue. The grass is green!", ["The sky", "The grass"]),
])
@pytest.mark.skipif(not _NO_SPACY, reason="spaCy installed: its noun chunks are used, not the fallback")
def test_noun_phrase_fallback_on_short_prompts(prompt, expected):
    assert Q.noun_phrases(prompt) == expected


DPG_STYLE = (
    "A bustling city street at dusk. Neon signs glow above crowded sidewalks, and a red double-decker bus waits at "
    "the corner. In the foreground, a woman in a yellow raincoat holds a black umbrella while two children splash "
    "in puddles. Tall glass buildings reflect the orange sky; a small brown dog sits beside a wooden bench near "
    "her feet.")


@pytest.mark.skipif(not _NO_SPACY, reason="spaCy installed: its noun chunks are used, not the fallback")
def test_noun_phrase_fallback_on_a_dense_paragraph():
    phrases = Q.noun_phrases(DPG_STYLE)
    assert phrases == ["A bustling city street", "dusk", "Neon signs", "crowded sidewalks", "a red double-decker bus",
                       "the corner", "the foreground", "a woman", "a yellow raincoat", "a black umbrella",
                       "two children", "puddles", "Tall glass buildings", "the orange sky", "a small brown dog",
                       "a wooden bench", "her feet"]
    # no chunk crosses a sentence boundary, none keeps a verb or punctuation
    assert not any(ch in p for p in phrases for ch in ".;,?")
    # at most N: the most attributed / counted phrases, in prompt order (not the first N)
    top = Q.noun_phrases(DPG_STYLE, max_phrases=5)
    assert top == ["A bustling city street", "a red double-decker bus", "two children", "Tall glass buildings",
                   "a small brown dog"]
    assert Q.noun_phrases(DPG_STYLE, max_phrases=3, prefer="first") == phrases[:3]


def test_select_phrases_prefers_attributes_and_counts_and_keeps_order():
    phrases = ["the park", "three dogs", "a big red ball", "grass", "a cat"]
    assert Q.select_phrases(phrases, 2) == ["three dogs", "a big red ball"]
    assert Q.select_phrases(phrases, 3) == ["the park", "three dogs", "a big red ball"]  # ties: the earlier
    assert Q.select_phrases(phrases, 10) == phrases
    with pytest.raises(ValueError, match="prefer"):
        Q.noun_phrases("a cat", 2, prefer="last")


@pytest.mark.skipif(not _NO_SPACY, reason="spaCy installed: its noun chunks are used, not the fallback")
def test_phrase_q_does_not_mangle_questions_and_caps_the_count():
    assert Q.phrase_q("Is there a red apple?") == ["a red apple?"]
    assert Q.phrase_q("a red apple and a blue cup?") == ["a red apple?", "a blue cup?"]
    assert len(Q.phrase_q(DPG_STYLE, max_phrases=8)) == 8
    assert all(q.endswith("?") and not q.endswith("??") for q in Q.phrase_q(DPG_STYLE))


@pytest.mark.skipif(_NO_SPACY, reason="spaCy or its en_core_web_sm pipeline is not installed here")
def test_noun_phrases_use_spacy_noun_chunks_when_installed():
    import spacy

    doc = spacy.load("en_core_web_sm")("a green bench and a red car")
    assert Q.noun_phrases("a green bench and a red car") == [c.text for c in doc.noun_chunks]
