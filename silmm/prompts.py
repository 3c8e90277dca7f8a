"""Step 1: compositional prompts -- vocabulary, the paper's templates, in-context prompts, prompt files.

Determinism: prompt `p` of an iteration is a function of (run seed, iteration, p, vocabulary) alone, so a
shard task can compute any slice of the list without the others, and the list does not depend on the
number of shards. Template prompts are composed for the whole iteration in one pass (milliseconds) with
duplicates re-drawn; prompts the LMM writes (non-spatial, complex) are drawn per id, and duplicates among
them are resolved downstream by :func:`first_occurrences` (the lowest id keeps the text). Prompt files
(`prompts.source=files`) are read and drawn whole by every shard task, seeded by (run seed, iteration).
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silmm.config import ConfigError, PromptsConfig
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


def apportion(count: int, weights: dict[str, float]) -> dict[str, int]:
    """Exactly proportional counts per category (largest remainder; ties go in CATEGORIES order), summing
    to `count`, for the categories of positive weight, in CATEGORIES order."""
    unknown = set(weights) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"prompts.categories: unknown categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
    total = sum(weights.values())
    names = [c for c in CATEGORIES if weights.get(c, 0) > 0]
    exact = {c: count * weights[c] / total for c in names}
    n = {c: int(exact[c]) for c in names}
    for c in sorted(names, key=lambda c: (n[c] - exact[c], CATEGORIES.index(c)))[: count - sum(n.values())]:
        n[c] += 1
    return n


def assign_categories(count: int, weights: dict[str, float], seed: int) -> list[str]:
    """Exactly proportional category counts (:func:`apportion`), in a seeded shuffled order."""
    order = [c for c, n in apportion(count, weights).items() for _ in range(n)]
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
# prompts.source=files. What a researcher feeds here is often a benchmark's own files (T2I-CompBench's
# `color_val.txt`, ...), so nothing is lost or changed silently: every line is normalised, then counted as
# kept, empty, duplicate, not UTF-8 or overlong; every kept prompt remembers its file and line; and the
# files' hashes are part of the run's config hash, so a file edited under a run is caught.
class PromptFileError(ConfigError):
    """The prompt files cannot give the run what it asks for; the message names the file (and line)."""


# The byte-order mark and zero-width characters are invisible in an editor, yet make two equal-looking
# prompts differ (and reach the tokenizer): removed before anything else.
_INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff]")
_SPACE = re.compile(r"\s+")
# T2I-CompBench names: color_val.txt, 3d_spatial_val.txt, complex_val_action.txt (a split of `complex`)
_CATEGORY_IN_NAME = re.compile(r"^(?P<category>.+?)(?:_(?:val|train|test)(?:_\w+)?)?$")


@dataclass
class FilePrompts:
    """Prompts read from files, column by column (as the prompts shard stores them), with counts of what
    normalisation changed and what was dropped, by reason."""

    texts: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # the file's name within prompts.files
    lines: list[int] = field(default_factory=list)  # 1-based line in that file
    counts: Counter = field(default_factory=Counter)

    def take(self, rows: Sequence[int]) -> FilePrompts:
        return FilePrompts([self.texts[i] for i in rows], [self.categories[i] for i in rows],
                           [self.files[i] for i in rows], [self.lines[i] for i in rows], self.counts)


def prompt_files(source: str | Path) -> list[Path]:
    """The prompt files of `prompts.files`: the file itself, or every *.txt of the folder (sorted)."""
    source = Path(source)
    files = sorted(source.glob("*.txt")) if source.is_dir() else [source]
    if not files:
        raise PromptFileError(f"{source}: no .txt prompt files found")
    return files


def category_of_file(path: Path, mapping: dict[str, str] | None = None) -> str:
    """A file's category: `mapping[file name]` (prompts.file_categories) when given, else the category in
    its name, T2I-CompBench style (color_val.txt -> color, complex_val_action.txt -> complex)."""
    if mapping and path.name in mapping:
        category, how = mapping[path.name], "prompts.file_categories maps it to"
    else:
        category, how = _CATEGORY_IN_NAME.match(path.stem).group("category"), "its name gives"
    if category not in CATEGORIES:
        raise PromptFileError(f"{path}: {how} the category '{category}', not one of {', '.join(CATEGORIES)}; "
                              f"map the file to one: prompts.file_categories={{{path.name}: <category>}}")
    return category


def files_digest(source: str | Path) -> dict[str, str]:
    """sha256 (16 hex digits) of each prompt file's bytes, by file name: recorded in the run's config."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in prompt_files(source)}


def check_files_unchanged(source: str | Path, recorded: dict[str, str]) -> None:
    """Refuse prompt files that differ from the hashes recorded when the run was created."""
    now = files_digest(source)
    if now == recorded:
        return
    changes = {"edited": sorted(k for k in set(now) & set(recorded) if now[k] != recorded[k]),
               "added": sorted(set(now) - set(recorded)), "removed": sorted(set(recorded) - set(now))}
    what = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in changes.items() if names)
    raise PromptFileError(f"{source}: the prompt files changed since the run was created ({what}), so its "
                          f"prompts would no longer be the ones its config hash stands for; restore the files, "
                          f"or start another run (run.name) with them")


def normalise_text(text: str) -> tuple[str, list[str]]:
    """A line as it is compared and stored: byte-order mark and zero-width characters removed, other
    control characters removed, Unicode NFC, whitespace runs collapsed to one space, ends stripped.
    Also returns what changed it (stripping the ends alone is not counted)."""
    changes = []
    visible = _INVISIBLE.sub("", text)
    if visible != text:
        changes.append("invisible_removed")
    printable = "".join(ch for ch in visible if ch.isspace() or unicodedata.category(ch) != "Cc")
    if printable != visible:
        changes.append("control_removed")
    composed = unicodedata.normalize("NFC", printable)
    if composed != printable:
        changes.append("nfc_changed")
    collapsed = _SPACE.sub(" ", composed).strip()
    if collapsed != composed.strip():
        changes.append("whitespace_collapsed")
    return collapsed, changes


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Prompt length in the model's own tokens (what prompts.max_tokens limits)."""
    return lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])


def read_prompt_files(source: str | Path, max_tokens: int | None, overlong: str,
                      count_tokens: Callable[[str], int] | None = None,
                      file_categories: dict[str, str] | None = None) -> FilePrompts:
    """One prompt per line from a .txt file, or every *.txt of a folder, each with its category
    (:func:`category_of_file`), file and line. Lines are normalised (:func:`normalise_text`) before
    duplicates are dropped (case-insensitive, the first kept); empty lines, lines that are not UTF-8 and
    prompts over `max_tokens` (truncated or rejected, per `overlong`) are counted and logged, never silently
    kept or lost. `max_tokens=None` skips the length check (the config-time scan has no tokenizer).
    Raises PromptFileError for an unknown category, a UTF-16 file, or a truncation that leaves nothing."""
    source = Path(source)
    files = prompt_files(source)
    mapping = dict(file_categories or {})
    strays = sorted(set(mapping) - {f.name for f in files})
    if strays:
        raise PromptFileError(f"{source}: prompts.file_categories names {strays}, which are not among its prompt "
                              f"files ({', '.join(f.name for f in files)})")
    count_tokens = count_tokens or (lambda s: len(s.split()))
    out = FilePrompts()
    counts = out.counts
    seen: set[str] = set()
    for f in files:
        category = category_of_file(f, mapping)
        data = f.read_bytes()
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise PromptFileError(f"{f}: UTF-16 text (byte-order mark {data[:2].hex()}); save it as UTF-8")
        for lineno, raw in enumerate(data.splitlines(), 1):  # \n, \r\n, \r: the lines an editor shows
            try:
                decoded = raw.decode("utf-8")
            except UnicodeDecodeError:
                counts["not_utf8"] += 1
                log.warning("%s:%d: not UTF-8, skipped", f, lineno)
                continue
            line, changes = normalise_text(decoded)
            counts.update(changes)
            if not line:
                counts["empty"] += 1
                continue
            if max_tokens is not None and count_tokens(line) > max_tokens:
                if overlong == "reject":
                    counts["overlong_rejected"] += 1
                    log.warning("%s:%d: over %d tokens, rejected", f, lineno, max_tokens)
                    continue
                cut = truncate_to_tokens(line, max_tokens, count_tokens)
                if not cut:
                    raise PromptFileError(
                        f"{f}:{lineno}: prompts.overlong=truncate would leave nothing of this prompt (its first "
                        f"word alone is over prompts.max_tokens={max_tokens} tokens): {line[:60]!r}; shorten "
                        f"or remove the line, or set prompts.overlong=reject")
                line = cut
                counts["overlong_truncated"] += 1
            key = line.lower()
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            out.texts.append(line)
            out.categories.append(category)
            out.files.append(f.name)
            out.lines.append(lineno)
    counts["kept"] = len(out.texts)
    log.info("prompt files %s: %s", source, dict(counts))
    return out


def _drawable(found: FilePrompts, weights: dict[str, float], source: str | Path) -> dict[str, float]:
    """The weights of the categories the files have and prompts.categories weighs; none: PromptFileError."""
    present = set(found.categories)
    active = {c: weights[c] for c in CATEGORIES if weights.get(c, 0) > 0 and c in present}
    if not found.texts:
        dropped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(found.counts.items())
                            if k != "kept" and n)
        names = ", ".join(f.name for f in prompt_files(source))
        raise PromptFileError(f"{source}: the prompt files ({names}) yield no prompt ({dropped or 'no lines'})")
    if not active:
        have = ", ".join(sorted({f"{name}: {c}" for name, c in zip(found.files, found.categories, strict=True)}))
        raise PromptFileError(f"{source}: prompts.categories gives no weight to the categories of its prompt "
                              f"files ({have}), so no prompt would be drawn")
    return active


def draw_file_prompts(found: FilePrompts, count: int, weights: dict[str, float], run_seed: int, iteration: int,
                      source: str | Path = "prompts.files") -> tuple[list[int], dict[str, dict[str, int]]]:
    """Rows of `found` for one iteration: `count` prompts split across the categories as `weights` say (the
    same :func:`apportion` as the generated prompts), drawn at random within a category (seeded by the run
    seed and iteration), returned in file order, with a table category -> share, available, taken. A
    category with fewer prompts than its share gives all it has, and says so; categories the files lack,
    or that have no weight, are left out, and that is said too."""
    active = _drawable(found, weights, source)
    rows_of: dict[str, list[int]] = {}
    for row, c in enumerate(found.categories):
        rows_of.setdefault(c, []).append(row)
    files_of = {c: ", ".join(sorted({found.files[r] for r in rows})) for c, rows in rows_of.items()}
    for c in sorted(set(rows_of) - set(active)):
        log.warning("%s: the %d prompts of category %s (%s) are not used: prompts.categories gives it no weight",
                    source, len(rows_of[c]), c, files_of[c])
    lacking = [c for c in CATEGORIES if weights.get(c, 0) > 0 and c not in rows_of]
    if lacking:
        log.warning("%s: no prompt file has the categories %s; prompts.count is split among %s only", source,
                    ", ".join(lacking), ", ".join(active))
    chosen: list[int] = []
    table: dict[str, dict[str, int]] = {}
    for c, share in apportion(count, active).items():
        rows = rows_of[c]
        if len(rows) <= share:
            taken = rows
            if len(rows) < share:
                log.warning("%s: prompts.count=%d asks for %d %s prompts; %s has %d: all taken", source, count,
                            share, c, files_of[c], len(rows))
        else:
            taken = random.Random(derive_seed(run_seed, iteration, -1, 0, f"file-prompts:{c}")).sample(rows, share)
        table[c] = {"share": share, "available": len(rows), "taken": len(taken)}
        chosen.extend(taken)
    log.info("%s: %d prompts drawn for iteration %d: %s", source, len(chosen), iteration,
             ", ".join(f"{c} {t['taken']}/{t['share']}" for c, t in table.items()))
    return sorted(chosen), table


def select_file_prompts(p: PromptsConfig, run_seed: int, iteration: int, count_tokens: Callable[[str], int],
                        ) -> tuple[FilePrompts, dict[str, Any]]:
    """One iteration's prompts from `prompts.files`, and the shard's `extra` (counts): the files checked
    against the hashes the run recorded, read, and drawn. The prompts stage and the driver (before it
    submits the stage) both call it, so a bad file stops the run before any job is submitted."""
    check_files_unchanged(p.files, p.files_sha256)
    found = read_prompt_files(p.files, p.max_tokens, p.overlong.value, count_tokens, p.file_categories)
    rows, table = draw_file_prompts(found, p.count, p.categories, run_seed, iteration, p.files)
    return found.take(rows), {"file_counts": dict(found.counts), "category_counts": table}


def check_prompt_source(p: PromptsConfig) -> None:
    """The config-time check, before the tokenizer is at hand: every file's category is known and the
    files hold a prompt that prompts.categories would draw (lengths are checked by the prompts stage)."""
    found = read_prompt_files(p.files, None, p.overlong.value, file_categories=p.file_categories)
    _drawable(found, p.categories, p.files)


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
