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


# ------------------------------------------------------------------------------- noun phrases
# Without spaCy: a closed-class chunker. A prompt is split into sentences (".", "!", "?", ";" followed by a
# space or the end, and newlines; "3.5" is not a boundary); a leading "Is there / Are there / There is /
# There are" and a trailing "?" are removed, so a prompt that is already a question gives its noun phrases.
# Inside a sentence, chunks end at punctuation and at closed-class words (prepositions and relation words,
# conjunctions, pronouns, auxiliaries, relative words, a list of frequent verbs). Open-class words are never
# dropped for their suffix: a word in -ing ends a chunk only when it acts as a verb (after an auxiliary or a comma, or
# before a determiner / number / possessive, or before a preposition when it does not follow a determiner
# and is not a common -ing noun such as "building" or "painting"); a word in -ed likewise only before a
# preposition ("covered in", "made of"); a word between a noun phrase and a determiner is a verb
# ("buildings reflect the sky"); every other word stays in its chunk. A lone adjective after a copula
# ("the sky is blue") is a predicate, not a noun phrase.
_DETERMINERS = frozenset("a an the this that these those some any each every another his her their its my our "
                         "your no several many few both all".split())
_NUMBERS = frozenset("one two three four five six seven eight nine ten eleven twelve a-pair pair dozen".split())
_BREAK_WORDS = frozenset(
    "and or but nor with without of on in at by for to from into onto over under below above beneath underneath "
    "behind beside besides near between among amid across along around against through inside outside within "
    "toward towards upon via like as than while during after before where which who whom whose that when whereas "
    "next front top left right atop off up down "
    "is are was were be been being am has have had does do did can could will would should may might must "
    "it its they them he him she her we us you i itself themselves each other one another there "
    "also then very too not just only even still "
    "stands stand standing sits sit lies lie hangs hang holds hold wears wear rides ride eats eat looks look "
    "walks walk runs run plays play reads read carries carry flies fly swims swim sleeps sleep rests rest "
    "faces face leans lean floats float grows grow covers cover fills fill shows show features feature "
    "contains contain depicts depict displays display surrounds surround glows glow waits wait splashes splash "
    "reflects reflect shines shine rises rise stretches stretch dances dance jumps jump sings sing smiles smile "
    "crosses cross chases chase watches watch drinks drink cuts cut uses use has".split())
# words that may begin a chunk although they are break words elsewhere ("her hat", "its handle")
_POSSESSIVES = frozenset("his her their its my our your".split())
_ING_NOUNS = frozenset(
    "building buildings painting paintings ceiling ceilings clothing drawing drawings ring rings king kings string "
    "strings thing things wing wings spring springs swing swings morning evening sibling siblings pudding earring "
    "earrings wedding icing frosting railing railings lighting bedding stuffing awning awnings dumpling dumplings "
    "sling sting wedding weddings offering landing stocking stockings topping toppings crossing opening "
    "sibling carving carvings filling seating shopping housing setting sailing".split())
_ADJ_LEXICON = frozenset(
    "red blue green yellow black white brown pink purple orange gray grey golden silver beige cyan violet "
    "round square oval rectangular triangular circular big small large tiny tall short long wide narrow huge "
    "wooden metallic plastic glass leather fluffy soft hard smooth rough shiny bright dark old new young "
    "happy sad empty full open closed hot cold wet dry clean dirty".split())
_ADJ_SUFFIXES = ("y", "ful", "ous", "ive", "ic", "ish", "less", "able", "ible", "al", "ed", "en")
_COPULAS = frozenset("is are was were be been being am looks look seems seem appears appear".split())
_EXISTENTIAL = re.compile(r"^\s*(?:(?:is|are)\s+there|there\s+(?:is|are|'s))\b\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<!\d)[.!?;]+(?=\s|$)|\n+")
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+|\.\d+)*|[^\sA-Za-z0-9]")


def _sentences(text: str) -> list[str]:
    out = []
    for sent in _SENTENCE_END.split(text):
        sent = _EXISTENTIAL.sub("", sent.strip().rstrip("?")).strip()
        if sent:
            out.append(sent)
    return out


def _is_number(word: str) -> bool:
    return word.isdigit() or word in _NUMBERS


def _looks_adjective(word: str) -> bool:
    return word in _ADJ_LEXICON or (len(word) > 4 and word.endswith(_ADJ_SUFFIXES))


def _chunk_sentence(sentence: str) -> list[str]:
    tokens = _TOKEN.findall(sentence)
    low = [t.lower() for t in tokens]
    chunks: list[tuple[list[str], bool]] = []  # (words, follows a copula)
    cur: list[str] = []
    after_copula = False

    def close(next_after_copula: bool):
        nonlocal cur, after_copula
        if cur:
            chunks.append((cur, after_copula))
        cur = []
        after_copula = next_after_copula

    for k, (tok, w) in enumerate(zip(tokens, low, strict=True)):
        prev = low[k - 1] if k else ""
        nxt = low[k + 1] if k + 1 < len(low) else ""
        if not tok[0].isalnum():  # punctuation
            close(False)
            continue
        if w in _POSSESSIVES and not cur and nxt and nxt[0].isalnum() and nxt not in _BREAK_WORDS:
            cur.append(tok)  # "her hat": a determiner, not a pronoun
            continue
        if w in _BREAK_WORDS:
            close(w in _COPULAS or (after_copula and not cur))
            continue
        verb_like = False
        if w.endswith("ing") and len(w) > 5 and w not in _ING_NOUNS:
            verb_like = (prev in _COPULAS or nxt in _DETERMINERS or _is_number(nxt) or prev == ","
                         or (nxt in _BREAK_WORDS and nxt not in _COPULAS and prev not in _DETERMINERS))
        elif w.endswith("ed") and len(w) > 5 and w not in _ADJ_LEXICON:
            verb_like = nxt in _BREAK_WORDS and nxt not in _COPULAS and prev not in _DETERMINERS
        elif cur and any(c.lower() not in _DETERMINERS for c in cur) and w not in _ADJ_LEXICON:
            # "buildings reflect the sky": a word between a noun phrase and a determiner is a verb
            verb_like = nxt in _DETERMINERS or (_is_number(nxt) and not _is_number(w))
        if verb_like:
            close(False)
            continue
        cur.append(tok)
    close(False)
    out = []
    for words, predicate in chunks:
        content = [w for w in words if w.lower() not in _DETERMINERS]
        if not content or not any(len(w) > 1 and any(c.isalpha() for c in w) for w in content):
            continue
        if predicate and len(words) == 1 and _looks_adjective(words[0].lower()):
            continue  # "the sky is blue": "blue" is a predicate
        out.append(" ".join(words))
    return out


def _informativeness(phrase: str) -> int:
    """Attributes and counts are what a question about a phrase checks: modifiers + 2 for a number."""
    words = [w.lower() for w in phrase.split()]
    modifiers = sum(1 for w in words[:-1] if w not in _DETERMINERS)
    return modifiers + 2 * any(_is_number(w) for w in words)


def select_phrases(phrases: Sequence[str], max_phrases: int) -> list[str]:
    """At most ``max_phrases``: the most informative (ties: the earlier), kept in prompt order."""
    if len(phrases) <= max_phrases:
        return list(phrases)
    ranked = sorted(range(len(phrases)), key=lambda i: (-_informativeness(phrases[i]), i))[:max_phrases]
    return [phrases[i] for i in sorted(ranked)]


def _spacy_chunks(prompt: str) -> list[str] | None:
    try:  # a real parser when the user has installed spaCy and its English pipeline
        import spacy

        nlp = spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        return None
    return [chunk.text for chunk in nlp(prompt).noun_chunks]


def noun_phrases(prompt: str, max_phrases: int | None = None, prefer: str = "informative") -> list[str]:
    """The prompt's noun phrases in prompt order, de-duplicated (case-insensitive): spaCy's noun chunks
    (en_core_web_sm, as T2I-CompBench) when installed, else the rule-based chunker above.

    ``max_phrases``: keep at most that many; ``prefer="informative"`` keeps those with the most attributes and
    counts (:func:`select_phrases`), ``prefer="first"`` the first ones (T2I-CompBench's np_num=8 rule)."""
    if prefer not in ("informative", "first"):
        raise ValueError(f"prefer must be 'informative' or 'first', not {prefer!r}")
    chunks = _spacy_chunks(prompt)
    if chunks is None:
        chunks = [c for sent in _sentences(prompt) for c in _chunk_sentence(sent)]
    seen: set[str] = set()
    phrases = []
    for c in chunks:
        if c.lower() not in seen:
            seen.add(c.lower())
            phrases.append(c)
    if max_phrases is None:
        return phrases
    return phrases[:max_phrases] if prefer == "first" else select_phrases(phrases, max_phrases)


def phrase_q(prompt: str, max_phrases: int | None = None) -> list[str]:
    """The paper's Phrase-Q baseline: one question per noun phrase ('a red apple?'), at most ``max_phrases``
    chosen by :func:`select_phrases`; the prompt itself (Prompt-Q) when it has none."""
    phrases = noun_phrases(prompt, max_phrases)
    return [p + "?" for p in phrases] or prompt_q(prompt)
