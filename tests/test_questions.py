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
