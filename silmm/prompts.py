"""Step 1: compositional prompts -- vocabulary, the paper's templates, in-context prompts, prompt files.

Determinism: prompt `p` of an iteration is a function of (run seed, iteration, p, vocabulary) alone, so a
shard task can compute any slice of the list without the others, and the list does not depend on the
number of shards. Template prompts are composed for the whole iteration in one pass (milliseconds) with
duplicates re-drawn; prompts the LMM writes (non-spatial, complex) are drawn per id, and duplicates among
them are resolved downstream by :func:`first_occurrences` (the lowest id keeps the text).
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from silmm.seeding import derive_seed

log = logging.getLogger(__name__)

CATEGORIES = ("color", "shape", "texture", "spatial", "3d_spatial", "numeracy", "non_spatial", "complex")
TEMPLATE_CATEGORIES = ("color", "shape", "texture", "spatial", "3d_spatial", "numeracy")
ICL_CATEGORIES = ("non_spatial", "complex")

# Built-in vocabulary: the fallback when the LMM's list is unusable, and the in-context examples that
# show it what to list. The object groups follow the paper's categories.
BUILTIN_VOCABULARY: dict[str, list[str]] = {
    "animals": ["cat", "dog", "horse", "rabbit", "bird", "sheep", "mouse", "elephant", "fox", "owl"],
    "plants": ["tree", "flower", "cactus", "rose", "sunflower", "fern"],
    "fruits": ["apple", "banana", "orange", "strawberry", "lemon", "pear", "cherry"],
    "household items": ["chair", "table", "lamp", "cup", "vase", "clock", "pillow", "bowl", "book", "candle"],
    "clothing": ["hat", "shirt", "scarf", "shoe", "jacket", "dress", "glove"],
    "vehicles": ["car", "bicycle", "bus", "boat", "train", "airplane", "truck"],
    "food": ["cake", "pizza", "sandwich", "cookie", "egg", "bread"],
    "musical instruments": ["guitar", "piano", "violin", "drum", "trumpet", "flute"],
    "electronic devices": ["phone", "laptop", "camera", "television", "keyboard", "radio"],
    "colors": ["red", "blue", "green", "yellow", "black", "white", "purple", "pink", "brown", "orange"],
    "shapes": ["round", "square", "triangular", "oval", "rectangular", "cubic", "circular", "star-shaped"],
    "textures": ["wooden", "metallic", "glass", "fluffy", "leather", "plastic", "rubber", "fabric", "stone"],
    "spatial relations": ["on the left of", "on the right of", "on top of", "below", "above", "next to",
                          "near"],
    "3d spatial relations": ["in front of", "behind", "hidden by"],
    "quantities": ["one", "two", "three", "four", "five", "six"],
    "actions": ["holding", "looking at", "chasing", "sitting on", "riding", "playing with", "carrying"],
}
OBJECT_GROUPS = ("animals", "plants", "fruits", "household items", "clothing", "vehicles", "food",
                 "musical instruments", "electronic devices")

# In-context examples for the prompts the LMM writes (users may replace them: prompts.icl_examples).
BUILTIN_ICL: dict[str, list[str]] = {
    "non_spatial": ["A man is holding a red umbrella", "A dog is chasing a ball in the park",
                    "A woman is playing the violin", "A cat is looking at a fish tank"],
    "complex": ["A small wooden table with two blue cups on top of it",
                "A black cat sitting on the left of a round green pillow",
                "Three yellow flowers in a glass vase next to a metallic clock",
                "A girl in a red hat riding a brown horse behind a white fence"],
}

_IRREGULAR_PLURALS = {"mouse": "mice", "sheep": "sheep", "person": "people", "child": "children",
                      "knife": "knives", "leaf": "leaves", "fish": "fish", "deer": "deer",
                      "tomato": "tomatoes", "potato": "potatoes", "man": "men", "woman": "women",
                      "goose": "geese", "foot": "feet", "tooth": "teeth", "cactus": "cacti"}
_AN_EXCEPTIONS = ("uni", "use", "one", "euro", "ukulele")  # vowel letter, consonant sound
_AN_SILENT_H = ("hour", "honest", "honor", "heir")
_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
            "nine": 9, "ten": 10}


def pluralize(noun: str) -> str:
    """English plural of the last word of a noun phrase."""
    head, _, last = noun.rpartition(" ")
    low = last.lower()
    if low in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[low]
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    elif low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        plural = last[:-1] + "ies"
    elif low.endswith("fe"):
        plural = last[:-2] + "ves"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows (by sound, for the common exceptions)."""
    low = phrase.lower()
    if low.startswith(_AN_SILENT_H):
        return "an"
    if low[:1] in "aeiou" and not low.startswith(_AN_EXCEPTIONS):
        return "an"
    return "a"


def with_article(phrase: str, capital: bool = False) -> str:
    art = article(phrase)
    return f"{art.capitalize() if capital else art} {phrase}"


def counted(quantity: str, noun: str) -> str:
    return f"{quantity} {noun if _NUMBERS.get(quantity) == 1 else pluralize(noun)}"


# ------------------------------------------------------------------------------------ vocabulary
@dataclass
class Vocabulary:
    lists: dict[str, list[str]]
    sources: dict[str, str] = field(default_factory=dict)  # list name -> "model" | "builtin"

    @property
    def objects(self) -> list[str]:
        return [o for g in OBJECT_GROUPS for o in self.lists.get(g, [])]

    def to_json(self) -> dict:
        return {"lists": self.lists, "sources": self.sources}

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        return cls({k: list(v) for k, v in data["lists"].items()}, dict(data.get("sources", {})))

    @classmethod
    def builtin(cls) -> Vocabulary:
        return cls({k: list(v) for k, v in BUILTIN_VOCABULARY.items()}, dict.fromkeys(BUILTIN_VOCABULARY, "builtin"))


def vocabulary_request(list_name: str) -> str:
    """The instruction that asks the LMM for one vocabulary list (with an in-context example)."""
    example = ", ".join(BUILTIN_VOCABULARY[list_name][:4])
    return (f"List common {list_name} that can be drawn in a picture, as a comma-separated list of "
            f"short lowercase phrases.\nExample: {example}\nList:")


_ITEM = re.compile(r"^[a-z][a-z' \-]{0,30}[a-z]$")


def parse_list(text: str, max_items: int = 30) -> list[str]:
    """Items of a comma/newline-separated list, cleaned; anything that is not a short phrase is dropped."""
    out: list[str] = []
    for raw in re.split(r"[,\n;]", text):
        item = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", raw).strip().strip(".\"'").lower()
        item = re.sub(r"\s+", " ", item)
        if _ITEM.match(item) and len(item.split()) <= 4 and item not in out:
            out.append(item)
        if len(out) >= max_items:
            break
    return out


def build_vocabulary(write: Callable[[list[str]], list[str]], min_items: int = 3) -> Vocabulary:
    """Ask the model for every list (one batched call); keep a list with at least `min_items` usable
    items, else fall back to the built-in list. Relations and quantities stay built-in: templates need
    exact grammar for them."""
    names = [n for n in BUILTIN_VOCABULARY if n not in ("spatial relations", "3d spatial relations", "quantities")]
    answers = write([vocabulary_request(n) for n in names])
    vocab = Vocabulary.builtin()
    for name, answer in zip(names, answers, strict=True):
        items = parse_list(answer)
        if len(items) >= min_items:
            vocab.lists[name], vocab.sources[name] = items, "model"
    used = sum(s == "model" for s in vocab.sources.values())
    log.info("vocabulary: %d of %d lists written by the model, the rest built-in", used, len(names))
    return vocab


# ------------------------------------------------------------------------------------- templates
def compose(category: str, vocab: Vocabulary, rng: random.Random) -> str:
    """One template prompt of a category (the paper's five templates)."""
    lists = vocab.lists
    objects = vocab.objects

    def two_nouns() -> tuple[str, str]:
        a, b = rng.sample(objects, 2)
        return a, b

    if category in ("color", "shape", "texture"):
        adjectives = lists[{"color": "colors", "shape": "shapes", "texture": "textures"}[category]]
        if rng.random() < 0.5:  # A {adj} {noun}
            return with_article(f"{rng.choice(adjectives)} {rng.choice(objects)}", capital=True)
        (n1, n2), a1, a2 = two_nouns(), rng.choice(adjectives), rng.choice(adjectives)
        return f"{with_article(f'{a1} {n1}', capital=True)} and {with_article(f'{a2} {n2}')}"
    if category in ("spatial", "3d_spatial"):  # A {noun1} {spatial} a {noun2}
        relations = lists["spatial relations" if category == "spatial" else "3d spatial relations"]
        n1, n2 = two_nouns()
        return f"{with_article(n1, capital=True)} {rng.choice(relations)} {with_article(n2)}"
    if category == "numeracy":  # {quantity} {noun(s)} [and {quantity} {noun(s)}]
        q = lists["quantities"]
        if rng.random() < 0.5:
            text = counted(rng.choice(q), rng.choice(objects))
        else:
            n1, n2 = two_nouns()
            text = f"{counted(rng.choice(q), n1)} and {counted(rng.choice(q), n2)}"
        return text[0].upper() + text[1:]
    if category == "non_spatial":  # fallback when the LMM's prompt is unusable
        n1, n2 = two_nouns()
        return f"{with_article(n1, capital=True)} {rng.choice(lists['actions'])} {with_article(n2)}"
    if category == "complex":
        n1, n2 = two_nouns()
        color, texture = rng.choice(lists["colors"]), rng.choice(lists["textures"])
        relation = rng.choice(lists["spatial relations"])
        return f"{with_article(f'{color} {n1}', capital=True)} {relation} {with_article(f'{texture} {n2}')}"
    raise ValueError(f"unknown prompt category '{category}' (categories: {', '.join(CATEGORIES)})")


def assign_categories(count: int, weights: dict[str, float], seed: int) -> list[str]:
    """Exactly proportional category counts (largest remainder), in a seeded shuffled order."""
    unknown = set(weights) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"prompts.categories: unknown categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
    total = sum(weights.values())
    names = [c for c in CATEGORIES if weights.get(c, 0) > 0]
    exact = {c: count * weights[c] / total for c in names}
    n = {c: int(exact[c]) for c in names}
    for c in sorted(names, key=lambda c: (n[c] - exact[c], CATEGORIES.index(c)))[: count - sum(n.values())]:
        n[c] += 1
    order = [c for c in names for _ in range(n[c])]
    random.Random(seed).shuffle(order)
    return order


def template_prompts(categories: Sequence[str], vocab: Vocabulary | None, run_seed: int, iteration: int,
                     max_tries: int = 20, compose_fn: Callable[[str, random.Random], str] | None = None,
                     ) -> dict[int, str]:
    """Texts of every template-category prompt of the iteration, unique, keyed by prompt id.
    ``compose_fn(category, rng)`` replaces the vocabulary templates (the toy world's grammar)."""
    compose_fn = compose_fn or (lambda cat, rng: compose(cat, vocab, rng))
    out: dict[int, str] = {}
    seen: set[str] = set()
    for pid, cat in enumerate(categories):
        if cat not in TEMPLATE_CATEGORIES:
            continue
        for attempt in range(max_tries):
            rng = random.Random(derive_seed(run_seed, iteration, pid, attempt, "prompt"))
            text = compose_fn(cat, rng)
            if text.lower() not in seen:
                break
        seen.add(text.lower())  # after max_tries a duplicate is kept; first_occurrences drops it
        out[pid] = text
    return out


def icl_request(category: str, examples: Sequence[str], rng: random.Random, shots: int = 3) -> str:
    shown = rng.sample(list(examples), min(shots, len(examples)))
    lines = "\n".join(f"- {e}" for e in shown)
    kind = "an action or interaction between objects" if category == "non_spatial" else \
        "several objects with attributes, counts and spatial relations"
    return (f"Write one new image description showing {kind}, in the style of these examples.\n{lines}\n- ")


def parse_icl_prompt(text: str, max_words: int = 40) -> str | None:
    """The first line of the model's answer, if it reads like a prompt; else None."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip().strip("\"'").rstrip(".")
    words = line.split()
    if not 3 <= len(words) <= max_words:
        return None
    letters = sum(ch.isalpha() or ch.isspace() for ch in line)
    if letters < 0.9 * len(line) or not any(w.lower() in ("a", "an", "the", "two", "three") for w in words):
        return None
    return line[0].upper() + line[1:]


# ---------------------------------------------------------------------------------- prompt files
@dataclass
class FilePrompts:
    texts: list[str]
    categories: list[str]
    counts: Counter  # what was dropped or changed, by reason


_FILE_SUFFIXES = ("_val", "_train", "_test")


def category_of_file(path: Path) -> str:
    stem = path.stem
    for suffix in _FILE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem


def read_prompt_files(source: str | Path, max_tokens: int, overlong: str,
                      count_tokens: Callable[[str], int] | None = None) -> FilePrompts:
    """One prompt per line from a .txt file, or every *.txt of a folder (category = file name, as in
    T2I-CompBench: color_val.txt -> color). Empty lines, duplicates (first kept), lines that are not
    UTF-8, and prompts over `max_tokens` (truncated or rejected) are counted, never silently kept."""
    source = Path(source)
    files = sorted(source.glob("*.txt")) if source.is_dir() else [source]
    if not files:
        raise ValueError(f"{source}: no .txt prompt files found")
    count_tokens = count_tokens or (lambda s: len(s.split()))
    texts: list[str] = []
    cats: list[str] = []
    seen: set[str] = set()
    counts: Counter = Counter()
    for f in files:
        category = category_of_file(f) if source.is_dir() else "file"
        for lineno, raw in enumerate(f.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                counts["not_utf8"] += 1
                log.warning("%s:%d: not UTF-8, skipped", f, lineno)
                continue
            line = line.replace("\x00", "")
            if not line:
                counts["empty"] += 1
                continue
            if count_tokens(line) > max_tokens:
                if overlong == "reject":
                    counts["overlong_rejected"] += 1
                    log.warning("%s:%d: over %d tokens, rejected", f, lineno, max_tokens)
                    continue
                line = truncate_to_tokens(line, max_tokens, count_tokens)
                counts["overlong_truncated"] += 1
            key = line.lower()
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            texts.append(line)
            cats.append(category)
    counts["kept"] = len(texts)
    log.info("prompt files %s: %s", source, dict(counts))
    return FilePrompts(texts, cats, counts)


def truncate_to_tokens(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The longest word prefix within the limit (word boundaries keep prompts readable)."""
    words = text.split()
    lo, hi = 0, len(words)
    while lo < hi:  # binary search: count_tokens may be a real tokenizer
        mid = (lo + hi + 1) // 2
        if count_tokens(" ".join(words[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def first_occurrences(texts: Sequence[str]) -> list[bool]:
    """True for each text not seen (case-insensitively) at a lower index: the lowest id keeps it."""
    seen: set[str] = set()
    keep = []
    for t in texts:
        k = t.strip().lower()
        keep.append(k not in seen)
        seen.add(k)
    return keep


# ------------------------------------------------------------------------------------- sharding
def shard_range(count: int, per_shard: int, shard: int) -> range:
    """Prompt ids of one shard: contiguous blocks, the last one shorter."""
    if not 0 <= shard * per_shard < max(count, 1):
        raise ValueError(f"shard {shard} is out of range for {count} prompts at {per_shard} per shard")
    return range(shard * per_shard, min((shard + 1) * per_shard, count))


def shard_count(count: int, per_shard: int) -> int:
    return -(-count // per_shard)
