"""The toy world: coloured shapes on a 4x4 grid, rendered exactly, parsed back exactly, scored exactly.

An image is a grid of cells; a cell is empty or holds one object (colour, shape). Rendering paints each
shape's pixel mask in its colour, so :func:`parse` recovers every object by exact comparison: the
oracle never guesses. Prompts follow the paper's Attribute and Layout templates over this vocabulary
(colour binding, counting, spatial), and every prompt parses into a :class:`Spec` whose checks are the
T2I-CompBench++ sub-scores (colour, shape, counting, spatial). The same checks, phrased as yes/no
questions, are what the toy LMM learns to ask and answer.

Question styles (config ``toy.question_style``): ``named`` asks only what the oracle checks, that the named
objects exist (the paper's kind of decomposition: "Is there a red circle?"), so a cluttered image passes;
``exhaustive`` adds one question on the total, "Are there exactly two objects?", which fails on any object
the prompt does not name. Every toy question is phrased so that "yes" means the image meets the prompt:
the generic score (silmm/feedback.py, mean p(yes) - p(no)) needs no sign per question. A question like "Is
there anything else?" would need the opposite sign, and the prompt beside the image to be answerable at
all (the answerer sees only the image and the question).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

import numpy as np

GRID = 4  # cells per side
CELL = 8  # pixels per cell side
SIZE = GRID * CELL
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three", "four")
RELATIONS = ("on the left of", "on the right of", "above", "below")
OPPOSITE = {"on the left of": "on the right of", "on the right of": "on the left of", "above": "below",
            "below": "above"}
CATEGORIES = ("color", "numeracy", "spatial")
VOCAB_TEXT = [" ".join(COLOURS), " ".join(SHAPES) + " " + " ".join(s + "s" for s in SHAPES), " ".join(NUMBERS),
              " ".join(RELATIONS), "a an and is are there the ?"]  # every word a toy prompt or question uses
KINDS = ("color", "shape", "count", "spatial")  # oracle sub-scores
STYLES = ("named", "exhaustive")  # toy.question_style: what the toy LMM's self-questions ask
TOTALS = NUMBERS + ("five", "six", "seven", "eight")  # question counts: a prompt names up to 4 + 4 objects
ANY = "object"  # the shape of a phrase every object matches (unparseable cells too): "two objects"
# words the style's questions use beyond VOCAB_TEXT (the named style's tokenizer must stay as it was)
STYLE_WORDS = {"named": "", "exhaustive": "exactly object objects " + " ".join(TOTALS[len(NUMBERS):])}
LAYOUTS = ("random", "canonical")  # where scene_for puts objects
UNKNOWN = "unknown"  # a cell that is neither empty nor an exact rendered object


# ------------------------------------------------------------------------------------------ rendering
def _masks() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:CELL, 0:CELL] + 0.5
    c = CELL / 2
    circle = (yy - c) ** 2 + (xx - c) ** 2 <= (CELL / 2 - 1) ** 2
    square = np.zeros((CELL, CELL), bool)
    square[1:-1, 1:-1] = True
    # apex at the top centre, base on the second-last row
    triangle = (yy >= 1) & (yy <= CELL - 1) & (np.abs(xx - c) <= (yy - 1) / 2 + 0.5)
    return {"circle": circle, "square": square, "triangle": triangle}


MASKS = _masks()


@dataclass(frozen=True, order=True)
class Obj:
    row: int
    col: int
    colour: str
    shape: str


def render_cell(colour: str | None, shape: str | None) -> np.ndarray:
    cell = np.empty((CELL, CELL, 3), np.uint8)
    cell[:] = BACKGROUND
    if colour is not None:
        cell[MASKS[shape]] = COLOURS[colour]
    return cell


def render(scene: list[Obj] | tuple[Obj, ...]) -> np.ndarray:
    """uint8 [SIZE, SIZE, 3]; raises ValueError on two objects in one cell or an unknown name."""
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = BACKGROUND
    taken: set[tuple[int, int]] = set()
    for o in scene:
        if o.colour not in COLOURS or o.shape not in SHAPES or not (0 <= o.row < GRID and 0 <= o.col < GRID):
            raise ValueError(f"not a toy-world object: {o}")
        if (o.row, o.col) in taken:
            raise ValueError(f"two objects in cell ({o.row}, {o.col})")
        taken.add((o.row, o.col))
        image[o.row * CELL:(o.row + 1) * CELL, o.col * CELL:(o.col + 1) * CELL] = render_cell(o.colour, o.shape)
    return image


_CELL_NAMES: list[tuple[str | None, str | None]] = [(None, None)] + [(c, s) for c in COLOURS for s in SHAPES]
_CELL_PIXELS = np.stack([render_cell(c, s) for c, s in _CELL_NAMES]).reshape(len(_CELL_NAMES), -1).astype(np.int16)
# A cell is read as the rendering nearest to it when its mean absolute difference (0-255 scale) is at most this:
# exact renderings (the discrete toy's images) have 0; a decoder's images (the continuous toy's) are close but
# inexact; a blend of two renderings, or noise, is farther and reads as UNKNOWN.
PARSE_TOLERANCE = 24.0


def parse(image: np.ndarray) -> list[Obj]:
    """Every non-empty cell as an object: the nearest rendering within PARSE_TOLERANCE, else UNKNOWN."""
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"toy images are {SIZE}x{SIZE}x3, got {image.shape}")
    cells = np.ascontiguousarray(image, dtype=np.uint8).reshape(GRID, CELL, GRID, CELL, 3).transpose(0, 2, 1, 3, 4)
    cells = cells.reshape(GRID * GRID, -1).astype(np.int16)
    distance = np.abs(cells[:, None, :] - _CELL_PIXELS[None]).mean(-1)  # [cells, renderings]
    nearest = distance.argmin(-1)
    out = []
    for k in range(GRID * GRID):
        d, n = distance[k, nearest[k]], nearest[k]
        if d <= PARSE_TOLERANCE and n == 0:
            continue
        colour, shape = _CELL_NAMES[n] if d <= PARSE_TOLERANCE else (UNKNOWN, UNKNOWN)
        out.append(Obj(k // GRID, k % GRID, colour, shape))
    return out


def codebook() -> np.ndarray:
    """The toy VQ codebook: code 0 is an empty cell, then every (colour, shape) cell. [K, CELL, CELL, 3]."""
    return np.stack([render_cell(None, None)] + [render_cell(c, s) for c in COLOURS for s in SHAPES])


def codec():
    """The toy world's image tokenizer: one code per cell, so an image is GRID*GRID tokens."""
    from silmm.backends.fusion import PatchCodec

    return PatchCodec(codebook(), GRID)


# -------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Phrase:
    shape: str
    colour: str | None = None
    count: int = 1

    def matches(self, o: Obj) -> bool:
        return self.shape == ANY or (o.shape == self.shape and (self.colour is None or o.colour == self.colour))

    def noun(self, plural: bool = False) -> str:
        words = ([self.colour] if self.colour else []) + [self.shape + ("s" if plural else "")]
        return " ".join(words)

    def with_article(self) -> str:
        noun = self.noun()
        return ("an " if noun[0] in "aeiou" else "a ") + noun


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for. color: each phrase exists; numeracy: each phrase's exact count;
    spatial: phrases[0] stands in `relation` to phrases[1]."""

    category: str
    phrases: tuple[Phrase, ...]
    relation: str | None = None

    def text(self) -> str:
        if self.category == "color":
            body = " and ".join(p.with_article() for p in self.phrases)
        elif self.category == "numeracy":
            body = " and ".join(f"{NUMBERS[p.count - 1]} {p.noun(p.count > 1)}" for p in self.phrases)
        else:
            a, b = self.phrases
            body = f"{a.with_article()} {self.relation} {b.with_article()}"
        return body[0].upper() + body[1:]


_NOUN = r"(?:(?P<c{i}>{colours}) )?(?P<s{i}>{shapes})(?P<pl{i}>s?)".replace(
    "{colours}", "|".join(COLOURS)).replace("{shapes}", "|".join(SHAPES))
_ART = r"an? "
_NUM = "|".join(NUMBERS)
_REL = "|".join(RELATIONS)
_PATTERNS = {
    "spatial": re.compile(f"{_ART}{_NOUN.format(i=0)} (?P<rel>{_REL}) {_ART}{_NOUN.format(i=1)}"),
    "color": re.compile(f"{_ART}{_NOUN.format(i=0)}(?: and {_ART}{_NOUN.format(i=1)})?"),
    "numeracy": re.compile(f"(?P<n0>{_NUM}) {_NOUN.format(i=0)}(?: and (?P<n1>{_NUM}) {_NOUN.format(i=1)})?"),
}


class PromptError(ValueError):
    """A prompt outside the toy grammar; the message quotes it."""


def parse_prompt(prompt: str) -> Spec:
    """The spec of a toy prompt (case and a final full stop ignored); PromptError otherwise."""
    text = " ".join(prompt.strip().rstrip(".").lower().split())
    for category, pattern in _PATTERNS.items():
        m = pattern.fullmatch(text)
        if not m:
            continue
        phrases = []
        for i in range(2):
            if m.group(f"s{i}") is None:
                continue
            count = NUMBERS.index(m.group(f"n{i}")) + 1 if category == "numeracy" else 1
            if (count > 1) != bool(m.group(f"pl{i}")):
                raise PromptError(f"prompt {prompt!r}: number and plural disagree")
            phrases.append(Phrase(m.group(f"s{i}"), m.group(f"c{i}"), count))
        spec = Spec(category, tuple(phrases), m.groupdict().get("rel"))
        if spec.text().lower() != text:  # e.g. "a orange circle"
            raise PromptError(f"prompt {prompt!r}: not in the toy grammar (expected {spec.text()!r})")
        return spec
    raise PromptError(f"prompt {prompt!r}: not in the toy grammar (colours {list(COLOURS)}, shapes "
                      f"{list(SHAPES)}, counts one-four, relations {list(RELATIONS)})")


def _random_phrase(rng: random.Random, colour_p: float, count: int = 1) -> Phrase:
    colour = rng.choice(list(COLOURS)) if rng.random() < colour_p else None
    return Phrase(rng.choice(SHAPES), colour, count)


def _distinct(a: Phrase, b: Phrase) -> bool:
    """Two phrases no object can both match (so existence and counts stay independent)."""
    return a.shape != b.shape or (a.colour is not None and b.colour is not None and a.colour != b.colour)


def random_spec(category: str, rng: random.Random) -> Spec:
    """A random prompt of a category: Attribute template (colour binding, counting) or Layout (spatial)."""
    while True:
        if category == "color":
            phrases = [_random_phrase(rng, 1.0) for _ in range(1 if rng.random() < 0.25 else 2)]
            spec = Spec("color", tuple(phrases))
        elif category == "numeracy":
            phrases = [_random_phrase(rng, 0.5, rng.randint(1, 4)) for _ in range(1 if rng.random() < 0.4 else 2)]
            spec = Spec("numeracy", tuple(phrases))
        elif category == "spatial":
            spec = Spec("spatial", (_random_phrase(rng, 0.7), _random_phrase(rng, 0.7)), rng.choice(RELATIONS))
        else:
            raise ValueError(f"unknown toy prompt category {category!r} (categories: {', '.join(CATEGORIES)})")
        if len(spec.phrases) == 1 or _distinct(*spec.phrases):
            return spec


def is_held_out(prompt: str, fraction: float) -> bool:
    """A fixed split of the prompt space by hash of the canonical text: held-out prompts are never used
    for pretraining or SILMM iterations, only for evaluation."""
    key = parse_prompt(prompt).text().lower().encode()
    return int.from_bytes(hashlib.sha256(b"silmm-toy|" + key).digest()[:8], "little") / 2**64 < fraction


def compose(category: str, rng: random.Random, held_out_fraction: float) -> str:
    """A training prompt of a category (held-out combinations are re-drawn)."""
    while True:
        text = random_spec(category, rng).text()
        if not is_held_out(text, held_out_fraction):
            return text


def eval_prompts(count: int, held_out_fraction: float, seed: int = 1234) -> list[str]:
    """`count` distinct held-out prompts, equally many per category (fixed by `seed`, not the run seed,
    so that every run is evaluated on the same prompts)."""
    rng = random.Random(seed)
    out: list[str] = []
    per = [count // len(CATEGORIES) + (i < count % len(CATEGORIES)) for i in range(len(CATEGORIES))]
    for category, n in zip(CATEGORIES, per, strict=True):
        found: list[str] = []
        for _ in range(200_000):
            if len(found) == n:
                break
            text = random_spec(category, rng).text()
            if is_held_out(text, held_out_fraction) and text not in found:
                found.append(text)
        else:
            raise ValueError(f"only {len(found)} held-out {category} prompts at fraction {held_out_fraction}")
        out += found
    return out


# ------------------------------------------------------------------------------------- checks, oracle
def relation_holds(a: Obj, b: Obj, relation: str) -> bool:
    """Grid relations as T2I-CompBench's spatial score reads boxes: a is left of b when it is further
    left and the horizontal offset dominates the vertical one (likewise for the others)."""
    dx, dy = b.col - a.col, b.row - a.row  # b relative to a
    if relation == "on the left of":
        return dx > 0 and abs(dx) >= abs(dy)
    if relation == "on the right of":
        return dx < 0 and abs(dx) >= abs(dy)
    if relation == "above":
        return dy > 0 and abs(dy) >= abs(dx)
    if relation == "below":
        return dy < 0 and abs(dy) >= abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


@dataclass(frozen=True)
class Check:
    """One atomic requirement of a prompt: an oracle sub-score item and a yes/no question."""

    kind: str  # color | shape | count | spatial (the oracle's), total (the exhaustive style's)
    phrase: Phrase
    other: Phrase | None = None
    relation: str | None = None

    def holds(self, objects: list[Obj]) -> bool:
        if self.kind in ("count", "total"):
            return sum(self.phrase.matches(o) for o in objects) == self.phrase.count
        if self.kind in ("color", "shape"):
            return any(self.phrase.matches(o) for o in objects)
        return any(relation_holds(a, b, self.relation) for a in objects if self.phrase.matches(a)
                   for b in objects if self.other.matches(b) and b != a)

    def question(self) -> str:
        p = self.phrase
        if self.kind in ("count", "total"):
            verb = "are there" if p.count > 1 else "is there"
            exactly = "exactly " if self.kind == "total" else ""  # "two objects" alone reads as "at least"
            return f"{verb} {exactly}{TOTALS[p.count - 1]} {p.noun(p.count > 1)}?"
        if self.kind in ("color", "shape"):
            return f"is there {p.with_article()}?"
        return f"is the {p.noun()} {self.relation} the {self.other.noun()}?"


def checks(spec: Spec) -> list[Check]:
    """The atomic checks of a prompt, in the order its questions are written."""
    out: list[Check] = []
    for p in spec.phrases:
        out.append(Check("shape", Phrase(p.shape)))
        if spec.category == "numeracy":
            out.append(Check("count", p))
        elif p.colour is not None:
            out.append(Check("color", p))
    if spec.category == "spatial":
        out.append(Check("spatial", spec.phrases[0], spec.phrases[1], spec.relation))
    return list(dict.fromkeys(out))  # two phrases of one shape share their shape check


def total_check(spec: Spec) -> Check:
    """The image holds exactly as many objects as the prompt names. With every check of the prompt
    holding, this one holds iff nothing beyond the named objects is there (:func:`nothing_extra`)."""
    return Check("total", Phrase(ANY, None, sum(p.count for p in spec.phrases)))


def self_checks(spec: Spec, style: str = "named") -> list[Check]:
    """The checks the toy LMM's questions ask, in order: the oracle's, then under ``exhaustive`` the total."""
    if style not in STYLES:
        raise ValueError(f"unknown toy question style {style!r} (styles: {', '.join(STYLES)})")
    return checks(spec) + ([total_check(spec)] if style == "exhaustive" else [])


def questions(prompt: str, style: str = "named") -> list[str]:
    """The decomposition of a prompt into yes/no questions (one per self-check), capitalised."""
    return [q[0].upper() + q[1:] for q in (c.question() for c in self_checks(parse_prompt(prompt), style))]


_Q_NOUN = _NOUN.replace("(?P<c{i}>", "(?P<qc{i}>").replace("(?P<s{i}>", "(?P<qs{i}>").replace("(?P<pl{i}>", "(?P<qp{i}>")
_TOTAL = "|".join(TOTALS)
_QUESTIONS = [
    ("total", re.compile(f"(?:is|are) there exactly (?P<n>{_TOTAL}) {ANY}(?P<qp0>s?)")),
    ("count", re.compile(f"(?:is|are) there (?P<n>{_NUM}) {_Q_NOUN.format(i=0)}")),
    ("exists", re.compile(f"is there {_ART}{_Q_NOUN.format(i=0)}")),
    ("spatial", re.compile(f"is the {_Q_NOUN.format(i=0)} (?P<rel>{_REL}) the {_Q_NOUN.format(i=1)}")),
]


def parse_question(question: str) -> Check:
    """The check a toy question asks about (any casing, spacing before '?'); PromptError otherwise."""
    text = " ".join(question.strip().lower().replace("?", " ").split())
    for kind, pattern in _QUESTIONS:
        m = pattern.fullmatch(text)
        if not m:
            continue
        if kind == "total":
            return Check("total", Phrase(ANY, None, TOTALS.index(m.group("n")) + 1))
        p0 = Phrase(m.group("qs0"), m.group("qc0"))
        if kind == "count":
            return Check("count", Phrase(p0.shape, p0.colour, NUMBERS.index(m.group("n")) + 1))
        if kind == "exists":
            return Check("color" if p0.colour else "shape", p0)
        return Check("spatial", p0, Phrase(m.group("qs1"), m.group("qc1")), m.group("rel"))
    raise PromptError(f"question {question!r}: not a toy-world question")


@dataclass
class OracleScore:
    """Sub-scores in [0, 1] (None when the prompt has no check of that kind) and overall = all checks hold."""

    color: float | None
    shape: float | None
    count: float | None
    spatial: float | None
    overall: float

    def as_dict(self) -> dict[str, float | None]:
        return {"color": self.color, "shape": self.shape, "count": self.count, "spatial": self.spatial,
                "overall": self.overall}


def score(prompt: str | Spec, image: np.ndarray) -> OracleScore:
    """The exact oracle: parse the image, then evaluate every check of the prompt."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    objects = parse(image)
    results = [(c.kind, c.holds(objects)) for c in checks(spec)]
    sub = {}
    for kind in KINDS:
        values = [ok for k, ok in results if k == kind]
        sub[kind] = float(np.mean(values)) if values else None
    return OracleScore(sub["color"], sub["shape"], sub["count"], sub["spatial"],
                       float(all(ok for _, ok in results)))


def nothing_extra(prompt: str | Spec, image: np.ndarray) -> bool:
    """The image holds exactly as many objects as the prompt names (unparseable cells count). The checks
    only ask that named objects exist, so a cluttered image passes them; this is the stricter reading."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return len(parse(image)) == sum(p.count for p in spec.phrases)


# ----------------------------------------------------------------------------------------- scenes
def _cells(rng: random.Random) -> list[tuple[int, int]]:
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(cells)
    return cells


# Where layout "canonical" puts the two objects of a spatial prompt: side by side or stacked, mid-grid.
RELATION_CELLS = {"on the left of": ((1, 1), (1, 2)), "on the right of": ((1, 2), (1, 1)),
                  "above": ((1, 1), (2, 1)), "below": ((2, 1), (1, 1))}


def canonical_cells(spec: Spec) -> list[tuple[int, int]]:
    """Cells in the order layout "canonical" fills them (popped from the end, as :func:`_cells`'s are): the
    named objects in reading order from the top left (a spatial prompt's two at RELATION_CELLS), then
    distractors from the bottom right back."""
    named = list(RELATION_CELLS[spec.relation]) if spec.relation else []
    rest = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in named]
    need = sum(p.count for p in spec.phrases) - len(named)
    order = named + rest[:need] + rest[need:][::-1]
    return order[::-1]


def scene_for(spec: Spec, rng: random.Random, distractors: int = 0, layout: str = "random") -> list[Obj]:
    """A scene that satisfies the spec, with up to `distractors` objects of shapes the prompt does not mention
    (so they cannot change any check). layout "random": objects in random cells; "canonical": in fixed cells
    (:func:`canonical_cells`), so only the colours the prompt leaves open vary."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown toy layout {layout!r} (layouts: {', '.join(LAYOUTS)})")
    for _ in range(1000):
        cells = _cells(rng) if layout == "random" else canonical_cells(spec)
        scene: list[Obj] = []
        for p in spec.phrases:
            for _ in range(p.count):
                r, c = cells.pop()
                scene.append(Obj(r, c, p.colour or rng.choice(list(COLOURS)), p.shape))
        free = [s for s in SHAPES if s not in {p.shape for p in spec.phrases}]
        for _ in range(distractors if free else 0):
            r, c = cells.pop()
            scene.append(Obj(r, c, rng.choice(list(COLOURS)), rng.choice(free)))
        if score(spec, render(scene)).overall == 1.0:
            return sorted(scene)
    raise RuntimeError(f"no scene found for {spec.text()!r}")


def near_miss(spec: Spec, rng: random.Random, layout: str = "random") -> list[Obj]:
    """A scene close to the prompt that fails at least one check: a wrong colour, count, shape or
    relation -- the errors a text-to-image model makes (placed by ``layout``, as :func:`scene_for`)."""
    for _ in range(1000):
        phrases = list(spec.phrases)
        i = rng.randrange(len(phrases))
        p = phrases[i]
        move = rng.choice(("colour", "shape", "count", "relation", "drop"))
        relation = spec.relation
        if move == "colour":
            phrases[i] = Phrase(p.shape, rng.choice([c for c in COLOURS if c != p.colour]), p.count)
        elif move == "shape":
            phrases[i] = Phrase(rng.choice([s for s in SHAPES if s != p.shape]), p.colour, p.count)
        elif move == "count" and spec.category == "numeracy":
            phrases[i] = Phrase(p.shape, p.colour, rng.choice([n for n in range(1, 5) if n != p.count]))
        elif move == "relation" and spec.relation:
            relation = rng.choice([r for r in RELATIONS if r != spec.relation])
        elif move == "drop" and len(phrases) > 1 and spec.category != "spatial":
            phrases.pop(i)
        else:
            continue
        wrong = Spec(spec.category, tuple(phrases), relation)
        if len(wrong.phrases) == 2 and not _distinct(*wrong.phrases):
            continue
        scene = scene_for(wrong, rng, distractors=rng.random() < 0.3, layout=layout)
        if score(spec, render(scene)).overall == 0.0:
            return scene
    raise RuntimeError(f"no near miss found for {spec.text()!r}")


def random_scene(rng: random.Random, max_objects: int = 6) -> list[Obj]:
    cells = _cells(rng)
    return sorted(Obj(*cells.pop(), rng.choice(list(COLOURS)), rng.choice(SHAPES))
                  for _ in range(rng.randint(0, max_objects)))
