"""Step 3: decompositional self-questioning, and the paper's two baselines (Prompt-Q, Phrase-Q).

The LMM sees a few (prompt -> numbered yes/no questions) examples and writes questions for a new prompt.
Model output is untrusted text: :func:`parse_questions` keeps only well-formed yes/no questions, and a
prompt whose output yields none falls back to Prompt-Q (the caller records the fallback).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

BUILTIN_EXAMPLES: list[tuple[str, list[str]]] = [
    ("A red apple and a blue cup",
     ["Is there an apple?", "Is the apple red?", "Is there a cup?", "Is the cup blue?"]),
    ("Three dogs on the left of a wooden bench",
     ["Are there dogs?", "Are there three dogs?", "Is there a bench?", "Is the bench wooden?",
      "Are the dogs on the left of the bench?"]),
    ("A girl is holding a yellow umbrella",
     ["Is there a girl?", "Is there an umbrella?", "Is the umbrella yellow?", "Is the girl holding the umbrella?"]),
]

_AUXILIARIES = ("is", "are", "does", "do", "can", "has", "have", "was", "were", "will", "could", "should")
_NUMBERING = re.compile(r"^\s*(?:[-*•]|\(?\d+[.):]|q\d*[.:]|question\s*\d*[.:])\s*", re.IGNORECASE)


def load_examples(path: str | None) -> list[tuple[str, list[str]]]:
    """In-context examples: the built-in ones, or a YAML list of {prompt: ..., questions: [...]}."""
    if path is None:
        return BUILTIN_EXAMPLES
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(data, list) or not all(isinstance(d, dict) and "prompt" in d and "questions" in d for d in data):
        raise ValueError(f"{path}: questions.icl_examples must be a list of {{prompt: ..., questions: [...]}}")
    return [(d["prompt"], list(d["questions"])) for d in data]


def question_request(prompt: str, examples: Sequence[tuple[str, Sequence[str]]] = BUILTIN_EXAMPLES) -> str:
    """In-context request: split the description into atomic concepts/relations, one question each."""
    parts = ["Split each image description into its objects, attributes, counts and relations, and write "
             "one yes/no question for each.\n"]
    for text, qs in examples:
        parts.append(f"Description: {text}\nQuestions:\n" + "\n".join(f"{i}. {q}" for i, q in enumerate(qs, 1)))
    parts.append(f"Description: {prompt}\nQuestions:\n1.")
    return "\n\n".join(parts)


def parse_questions(output: str, max_questions: int, max_chars: int = 200) -> list[str]:
    """Well-formed yes/no questions from model output, in order, de-duplicated; [] when none.

    The request ends with "1." so the answer usually starts mid-line; we split on newlines and on
    later numbering, keep lines that start with an auxiliary verb and end with '?'."""
    pieces = re.split(r"\n|(?<=\?)\s+(?=\d+[.)])", output)
    out: list[str] = []
    for piece in pieces:
        q = _NUMBERING.sub("", piece).strip()
        if "?" not in q:
            continue
        q = q[: q.index("?") + 1]
        words = q.split()
        if len(words) < 2 or len(q) > max_chars or words[0].lower() not in _AUXILIARIES:
            continue
        if any(ch in q for ch in "\x00\ufffd") or sum(ch.isalpha() for ch in q) < len(q) / 2:
            continue
        q = q[0].upper() + q[1:]
        if q.lower() not in (x.lower() for x in out):
            out.append(q)
        if len(out) == max_questions:
            break
    return out


def prompt_q(prompt: str) -> list[str]:
    """The paper's Prompt-Q baseline: the prompt itself as a single question."""
    return [prompt.strip().rstrip(".!") + "?"]


# Rule-based noun-phrase chunker for Phrase-Q when spaCy's model is not installed: split the prompt at
# relation words, verbs in -ing and conjunctions; what remains are (determiner + modifiers + noun) chunks.
_BREAKS = (r"\band\b|\bwith\b|\bnext to\b|\bon the (?:left|right) of\b|\bon top of\b|\bin front of\b|"
           r"\bbehind\b|\bbelow\b|\babove\b|\bunder\b|\bnear\b|\bhidden by\b|\bon\b|\bin\b|\bat\b|\bof\b|"
           r"\bis\b|\bare\b|\b\w+ing\b|,")


def noun_phrases(prompt: str) -> list[str]:
    try:  # a real parser when the user has installed spaCy and an English model
        import spacy

        nlp = spacy.load("en_core_web_sm")
        return [chunk.text for chunk in nlp(prompt).noun_chunks]
    except (ImportError, OSError):
        pass
    chunks = [c.strip(" .") for c in re.split(_BREAKS, prompt, flags=re.IGNORECASE)]
    return [c for c in chunks if c and re.search(r"[A-Za-z]{2,}", c) and c.lower() not in ("the", "a", "an")]


def phrase_q(prompt: str) -> list[str]:
    """The paper's Phrase-Q baseline: one question per noun phrase ('a red apple?')."""
    phrases = noun_phrases(prompt)
    return [p + "?" for p in phrases] or prompt_q(prompt)
