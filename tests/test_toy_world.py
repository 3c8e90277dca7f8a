"""The toy world (silmm/toy/world.py), its oracle metrics (silmm/toy/evaluate.py) and the patch codec.

Every expectation here is computed independently of the code under test: by hand, from the documented
layout (cell grid, codebook order), or by a small re-derivation in plain numpy / Python.
"""

import math
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from silmm.toy import evaluate as E
from silmm.toy import world as W
from silmm.toy.world import Obj, Phrase, Spec

COLOUR_NAMES = list(W.COLOURS)
BG = np.array(W.BACKGROUND, np.uint8)
FAST = settings(max_examples=60, deadline=None)

# ------------------------------------------------------------------------------------------ helpers


@st.composite
def scenes(draw, min_objects=0, max_objects=W.GRID * W.GRID):
    """Random distinct cells, random colours and shapes, in random (unsorted) order."""
    order = draw(st.permutations(range(W.GRID * W.GRID)))
    n = draw(st.integers(min_objects, max_objects))
    return [Obj(i // W.GRID, i % W.GRID, draw(st.sampled_from(COLOUR_NAMES)), draw(st.sampled_from(W.SHAPES)))
            for i in order[:n]]


def cell_of(image, row, col):
    return image[row * W.CELL:(row + 1) * W.CELL, col * W.CELL:(col + 1) * W.CELL]


def my_relation(a: Obj, b: Obj, relation: str) -> bool:
    """Independent reading of the spatial relations: pixel centres of the two cells (image y grows
    downwards); a relation holds when its axis offset is at least the other axis' offset."""
    xa, ya = a.col * W.CELL + W.CELL / 2, a.row * W.CELL + W.CELL / 2
    xb, yb = b.col * W.CELL + W.CELL / 2, b.row * W.CELL + W.CELL / 2
    horizontal = xa != xb and abs(xb - xa) >= abs(yb - ya)
    vertical = ya != yb and abs(yb - ya) >= abs(xb - xa)
    return {"on the left of": horizontal and xa < xb, "on the right of": horizontal and xa > xb,
            "above": vertical and ya < yb, "below": vertical and ya > yb}[relation]


def my_match(p: Phrase, o: Obj) -> bool:
    return o.shape == p.shape and (p.colour is None or o.colour == p.colour)


def my_spatial(a: Phrase, b: Phrase, relation: str, objects) -> bool:
    return any(my_relation(x, y, relation) for x in objects for y in objects
               if (x.row, x.col) != (y.row, y.col) and my_match(a, x) and my_match(b, y))


def my_satisfies(spec: Spec, objects) -> bool:
    if spec.category == "color":
        return all(any(my_match(p, o) for o in objects) for p in spec.phrases)
    if spec.category == "numeracy":
        return all(sum(my_match(p, o) for o in objects) == p.count for p in spec.phrases)
    return my_spatial(*spec.phrases, spec.relation, objects)


def my_subscores(spec: Spec, objects) -> dict:
    """Sub-scores as the documented T2I-CompBench reading: one shape check per distinct shape named, one
    colour check per distinct coloured phrase (not for counting), one count check per distinct phrase."""
    shapes = list(dict.fromkeys(p.shape for p in spec.phrases))
    out = {"shape": float(np.mean([any(o.shape == s for o in objects) for s in shapes])),
           "color": None, "count": None, "spatial": None}
    phrases = list(dict.fromkeys(spec.phrases))
    if spec.category == "numeracy":
        out["count"] = float(np.mean([sum(my_match(p, o) for o in objects) == p.count for p in phrases]))
    else:
        coloured = [p for p in phrases if p.colour is not None]
        if coloured:
            out["color"] = float(np.mean([any(my_match(p, o) for o in objects) for p in coloured]))
    if spec.category == "spatial":
        out["spatial"] = float(my_spatial(*spec.phrases, spec.relation, objects))
    return out


def my_code(o: Obj | None) -> int:
    """Documented codebook order: 0 = empty cell, then (colour, shape) with colour major."""
    if o is None:
        return 0
    return 1 + COLOUR_NAMES.index(o.colour) * len(W.SHAPES) + W.SHAPES.index(o.shape)


# ------------------------------------------------------------------------------------ render / parse


def test_masks_are_distinct_and_inside_their_cell():
    for name, m in W.MASKS.items():
        assert m.shape == (W.CELL, W.CELL) and m.dtype == bool and m.any(), name
        # a one-pixel margin, so objects in neighbouring cells never touch
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()), name
        assert (m == m[:, ::-1]).all(), name  # left-right symmetric
    assert W.MASKS["square"].sum() == (W.CELL - 2) ** 2 and W.MASKS["square"][1:-1, 1:-1].all()
    assert (W.MASKS["circle"] == W.MASKS["circle"].T).all() and (W.MASKS["circle"] == W.MASKS["circle"][::-1]).all()
    widths = W.MASKS["triangle"].sum(1)
    assert (np.diff(widths[1:-1]) >= 0).all() and widths[1] < widths[-2]  # apex at the top, base at the bottom
    names = list(W.MASKS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (W.MASKS[a] ^ W.MASKS[b]).sum() >= 2, (a, b)  # one pixel can never turn one into another


@FAST
@given(scene=scenes())
def test_parse_inverts_render(scene):
    image = W.render(scene)
    assert image.shape == (W.SIZE, W.SIZE, 3) and image.dtype == np.uint8
    assert W.parse(image) == sorted(scene)
    assert W.parse(image.astype(np.int64)) == sorted(scene)  # any integer dtype with uint8 values


@FAST
@given(scene=scenes())
def test_render_paints_exactly_each_mask(scene):
    image = W.render(scene)
    non_bg = (image != BG).any(-1)
    assert non_bg.sum() == sum(int(W.MASKS[o.shape].sum()) for o in scene)
    occupied = {(o.row, o.col) for o in scene}
    for o in scene:
        cell = cell_of(image, o.row, o.col)
        painted = (cell != BG).any(-1)
        assert (painted == W.MASKS[o.shape]).all()
        assert (cell[painted] == np.array(W.COLOURS[o.colour], np.uint8)).all()
    for r in range(W.GRID):
        for c in range(W.GRID):
            if (r, c) not in occupied:
                assert (cell_of(image, r, c) == BG).all()


@pytest.mark.parametrize("scene", [
    [Obj(0, 0, "red", "circle"), Obj(0, 0, "blue", "square")],
    [Obj(0, 0, "pink", "circle")],
    [Obj(0, 0, "red", "hexagon")],
    [Obj(4, 0, "red", "circle")],
    [Obj(0, -1, "red", "circle")],
])
def test_render_rejects_bad_scenes(scene):
    with pytest.raises(ValueError):
        W.render(scene)


def test_parse_rejects_wrong_shape():
    with pytest.raises(ValueError, match="32x32x3"):
        W.parse(np.zeros((W.SIZE, W.SIZE), np.uint8))
    with pytest.raises(ValueError):
        W.parse(np.zeros((W.SIZE + 1, W.SIZE, 3), np.uint8))


@FAST
@given(scene=scenes(max_objects=15), data=st.data())
def test_one_changed_pixel_reads_as_the_same_cell(scene, data):
    """A decoder's small error (here one value of one pixel, any amount) stays within world.PARSE_TOLERANCE."""
    r, c = data.draw(st.integers(0, W.GRID - 1)), data.draw(st.integers(0, W.GRID - 1))
    y, x, ch = data.draw(st.integers(0, W.CELL - 1)), data.draw(st.integers(0, W.CELL - 1)), data.draw(st.integers(0, 2))
    image = W.render(scene)
    image[r * W.CELL + y, c * W.CELL + x, ch] = data.draw(st.integers(0, 255))
    assert W.parse(image) == sorted(scene)


@FAST
@given(scene=scenes(max_objects=15), data=st.data())
def test_a_cell_far_from_every_rendering_is_an_unknown_object(scene, data):
    """A cell painted one dark grey (at least 44% of every rendering is white background) is nearer to no
    rendering than PARSE_TOLERANCE, whether it held an object or was empty."""
    r, c = data.draw(st.integers(0, W.GRID - 1)), data.draw(st.integers(0, W.GRID - 1))
    image = W.render(scene)
    image[r * W.CELL:(r + 1) * W.CELL, c * W.CELL:(c + 1) * W.CELL] = data.draw(st.integers(0, 150))
    kept = [o for o in scene if (o.row, o.col) != (r, c)]
    assert W.parse(image) == sorted(kept + [Obj(r, c, W.UNKNOWN, W.UNKNOWN)])


# ----------------------------------------------------------------------------------------- codec


CODEC = W.codec()


def my_nearest_codes(image: np.ndarray) -> np.ndarray:
    """Per cell, the index of the nearest codebook entry (squared L2, first index on ties), in numpy."""
    book = W.codebook().astype(np.int64).reshape(len(W.codebook()), -1)
    out = np.empty(W.GRID * W.GRID, np.int64)
    for r in range(W.GRID):
        for c in range(W.GRID):
            patch = cell_of(image, r, c).astype(np.int64).reshape(-1)
            out[r * W.GRID + c] = int(np.argmin(((book - patch) ** 2).sum(1)))
    return out


def test_codebook_layout():
    book = W.codebook()
    assert book.shape == (1 + len(W.COLOURS) * len(W.SHAPES), W.CELL, W.CELL, 3) and book.dtype == np.uint8
    assert (book[0] == BG).all()
    for colour in COLOUR_NAMES:
        for shape in W.SHAPES:
            entry = book[my_code(Obj(0, 0, colour, shape))]
            assert (entry == W.render([Obj(0, 0, colour, shape)])[:W.CELL, :W.CELL]).all()
    assert len({e.tobytes() for e in book}) == len(book)
    assert (CODEC.num_codes, CODEC.num_tokens, CODEC.image_size) == (len(book), W.GRID * W.GRID, W.SIZE)


@FAST
@given(scene=scenes())
def test_codec_round_trips_rendered_images(scene):
    image = W.render(scene)
    codes = CODEC.encode(image[None])
    assert codes.shape == (1, W.GRID * W.GRID) and codes.dtype == torch.int64
    by_cell = {(o.row, o.col): o for o in scene}
    expected = [my_code(by_cell.get((i // W.GRID, i % W.GRID))) for i in range(W.GRID * W.GRID)]
    assert codes[0].tolist() == expected
    decoded = CODEC.decode(codes)
    assert decoded.shape == (1, W.SIZE, W.SIZE, 3) and decoded.dtype == np.uint8
    assert (decoded[0] == image).all()


@FAST
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 4))
def test_codec_encode_inverts_decode_for_random_codes(seed, batch):
    codes = torch.from_numpy(np.random.default_rng(seed).integers(0, CODEC.num_codes, (batch, CODEC.num_tokens)))
    images = CODEC.decode(codes)
    assert torch.equal(CODEC.encode(images), codes)
    for b in range(batch):  # decode pastes codebook entries row-major
        for i, code in enumerate(codes[b].tolist()):
            assert (cell_of(images[b], i // W.GRID, i % W.GRID) == W.codebook()[code]).all()


@FAST
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["noise", "noisy_render", "blend"]))
def test_codec_encode_is_the_nearest_codebook_entry(seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "noise":
        images = rng.integers(0, 256, (3, W.SIZE, W.SIZE, 3), dtype=np.uint8)
    else:
        base = CODEC.decode(torch.from_numpy(rng.integers(0, CODEC.num_codes, (3, CODEC.num_tokens))))
        other = CODEC.decode(torch.from_numpy(rng.integers(0, CODEC.num_codes, (3, CODEC.num_tokens))))
        if kind == "noisy_render":
            noise = rng.integers(-60, 61, base.shape)
            images = np.clip(base.astype(np.int64) + noise, 0, 255).astype(np.uint8)
        else:
            t = rng.random((3, W.SIZE, W.SIZE, 1))
            images = (base * t + other * (1 - t)).round().astype(np.uint8)
    codes = CODEC.encode(images).numpy()
    for b in range(len(images)):
        assert (codes[b] == my_nearest_codes(images[b])).all()


def test_codec_rejects_bad_inputs():
    with pytest.raises(ValueError):
        CODEC.encode(np.zeros((W.SIZE, W.SIZE, 3), np.uint8))  # no batch dimension
    with pytest.raises(ValueError):
        CODEC.decode(torch.full((1, CODEC.num_tokens), CODEC.num_codes))
    with pytest.raises(ValueError):
        CODEC.decode(torch.zeros((1, CODEC.num_tokens - 1), dtype=torch.int64))


# --------------------------------------------------------------------------------------- grammar


def my_text_is_well_formed(spec: Spec, text: str) -> None:
    words = text.rstrip(".").split()
    assert text[0].isupper() and text[1:] == text[1:].lower()
    lower = [w.lower() for w in words]
    for art, nxt in zip(lower, lower[1:], strict=False):
        if art in ("a", "an"):
            assert art == ("an" if nxt[0] in "aeiou" else "a"), text
    if spec.category == "numeracy":
        for p in spec.phrases:
            noun = " ".join(([p.colour] if p.colour else []) + [p.shape + ("s" if p.count > 1 else "")])
            assert f"{W.NUMBERS[p.count - 1]} {noun}" in text.lower(), text
    if spec.category == "spatial":
        assert f" {spec.relation} " in text


@FAST
@given(seed=st.integers(0, 2**32 - 1), category=st.sampled_from(W.CATEGORIES))
def test_prompt_round_trip(seed, category):
    spec = W.random_spec(category, random.Random(seed))
    assert spec.category == category
    text = spec.text()
    my_text_is_well_formed(spec, text)
    assert W.parse_prompt(text) == spec
    for variant in (text.upper(), text.lower(), text + ".", f"  {text.upper()}. ", text.replace(" ", "   ")):
        assert W.parse_prompt(variant) == spec, variant


@pytest.mark.parametrize(("prompt", "spec"), [
    ("A red circle", Spec("color", (Phrase("circle", "red"),))),
    ("an orange square and a blue triangle.", Spec("color", (Phrase("square", "orange"), Phrase("triangle", "blue")))),
    ("Two red squares and one circle", Spec("numeracy", (Phrase("square", "red", 2), Phrase("circle", None, 1)))),
    ("FOUR TRIANGLES", Spec("numeracy", (Phrase("triangle", None, 4),))),
    ("A circle on the left of a yellow square", Spec("spatial", (Phrase("circle"), Phrase("square", "yellow")),
                                                     "on the left of")),
    ("A green triangle below a square.", Spec("spatial", (Phrase("triangle", "green"), Phrase("square")), "below")),
])
def test_parse_prompt_by_hand(prompt, spec):
    assert W.parse_prompt(prompt) == spec


@pytest.mark.parametrize("prompt", [
    "a orange circle", "An red circle", "two circle", "one circles", "a circles", "a red hexagon", "a cat", "",
    "five circles", "zero squares", "a circle beside a square", "a red circle and", "red circle",
    "a circle on the left of two squares", "a circle and a square and a triangle", "a purple circle?",
])
def test_bad_prompts_raise_prompt_error_naming_the_prompt(prompt):
    with pytest.raises(W.PromptError, match=re.escape(repr(prompt))):
        W.parse_prompt(prompt)


def test_prompt_error_is_a_value_error_and_unknown_category():
    assert issubclass(W.PromptError, ValueError)
    with pytest.raises(ValueError, match="unknown toy prompt category"):
        W.random_spec("3d_spatial", random.Random(0))


# ---------------------------------------------------------------------------------------- oracle


@FAST
@given(seed=st.integers(0, 2**32 - 1), category=st.sampled_from(W.CATEGORIES))
def test_oracle_accepts_scene_for_and_rejects_near_miss(seed, category):
    rng = random.Random(seed)
    spec = W.random_spec(category, rng)
    good = W.scene_for(spec, rng, distractors=rng.randint(0, 3))
    assert len({(o.row, o.col) for o in good}) == len(good)
    assert my_satisfies(spec, good)
    s = W.score(spec, W.render(good))
    assert s.overall == 1.0
    assert all(v in (None, 1.0) for v in s.as_dict().values())
    assert W.score(spec.text(), W.render(good)) == s  # a prompt string and its spec score alike
    bad = W.near_miss(spec, rng)
    assert not my_satisfies(spec, bad)
    assert W.score(spec, W.render(bad)).overall == 0.0


@FAST
@given(seed=st.integers(0, 2**32 - 1), category=st.sampled_from(W.CATEGORIES))
def test_canonical_layout_fixes_the_cells_and_still_meets_or_misses(seed, category):
    """layout "canonical": the named objects fill the same cells whatever the random draws (reading order from
    the top left; a relation's pair mid-grid), distractors fill from the bottom right, and the oracle reads
    scene_for as meeting the prompt and near_miss as missing it."""
    rng = random.Random(seed)
    spec = W.random_spec(category, rng)
    named = sum(p.count for p in spec.phrases)
    scenes_ = [W.scene_for(spec, random.Random(seed + k), layout="canonical") for k in range(3)]
    cells = [{(o.row, o.col) for o in s} for s in scenes_]
    assert cells[0] == cells[1] == cells[2] and len(cells[0]) == named
    if spec.relation:
        assert cells[0] == set(W.RELATION_CELLS[spec.relation])
    else:
        assert cells[0] == {(k // W.GRID, k % W.GRID) for k in range(named)}
    assert all(W.score(spec, W.render(s)).overall == 1.0 for s in scenes_)
    cluttered = W.scene_for(spec, rng, distractors=2, layout="canonical")
    extra = {(o.row, o.col) for o in cluttered} - cells[0]
    if {p.shape for p in spec.phrases} != set(W.SHAPES):  # else no shape is free for a distractor
        assert extra == {(3, 3), (3, 2)}
    assert W.score(spec, W.render(cluttered)).overall == 1.0
    assert W.score(spec, W.render(W.near_miss(spec, rng, layout="canonical"))).overall == 0.0


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="unknown toy layout 'grid'"):
        W.scene_for(W.parse_prompt("a red circle"), random.Random(0), layout="grid")


@FAST
@given(seed=st.integers(0, 2**32 - 1), category=st.sampled_from(W.CATEGORIES), scene=scenes(max_objects=8))
def test_oracle_matches_an_independent_evaluator_on_random_scenes(seed, category, scene):
    spec = W.random_spec(category, random.Random(seed))
    s = W.score(spec, W.render(scene)).as_dict()
    assert s.pop("overall") == float(my_satisfies(spec, scene))
    assert s == my_subscores(spec, scene)


def _score(prompt, scene):
    return W.score(prompt, W.render(scene))


@pytest.mark.parametrize(("prompt", "scene", "ok"), [
    ("A red circle", [Obj(1, 1, "red", "circle")], True),
    ("A red circle", [Obj(1, 1, "blue", "circle")], False),
    ("A red circle", [Obj(1, 1, "red", "square")], False),
    ("A red circle", [Obj(1, 1, "blue", "circle"), Obj(2, 2, "red", "square")], False),  # binding
    ("A red circle", [Obj(1, 1, "blue", "circle"), Obj(3, 0, "red", "circle")], True),
    ("Two squares", [Obj(0, 0, "red", "square"), Obj(1, 1, "blue", "square"), Obj(2, 2, "red", "square")], False),
    ("Two squares", [Obj(0, 0, "red", "square")], False),
    ("Two squares", [Obj(0, 0, "red", "square"), Obj(3, 3, "green", "square")], True),
    ("Two squares", [Obj(0, 0, "red", "square"), Obj(3, 3, "green", "square"), Obj(1, 2, "red", "circle")], True),
    ("Two red squares", [Obj(0, 0, "red", "square"), Obj(0, 1, "red", "square"), Obj(0, 2, "blue", "square")], True),
    ("Two red squares", [Obj(0, 0, "red", "square"), Obj(0, 1, "red", "square"), Obj(0, 2, "red", "square")], False),
    ("A circle on the left of a square", [Obj(1, 0, "red", "circle"), Obj(1, 3, "blue", "square")], True),
    ("A circle on the left of a square", [Obj(1, 3, "red", "circle"), Obj(1, 0, "blue", "square")], False),
    ("A circle on the left of a square", [Obj(0, 0, "red", "circle"), Obj(3, 1, "blue", "square")], False),
    ("A circle on the left of a square", [Obj(2, 0, "red", "circle"), Obj(0, 3, "blue", "square")], True),
    ("A circle on the left of a square", [Obj(0, 3, "red", "circle"), Obj(2, 0, "red", "circle"),
                                          Obj(2, 2, "blue", "square")], True),  # some pair suffices
    ("A circle on the left of a square", [Obj(1, 1, "red", "circle")], False),
    ("A square above a red circle", [Obj(0, 2, "red", "square"), Obj(3, 1, "red", "circle")], True),
    ("A square above a red circle", [Obj(0, 2, "red", "square"), Obj(3, 1, "blue", "circle")], False),
    ("A square above a red circle", [Obj(3, 1, "red", "square"), Obj(0, 2, "red", "circle")], False),
    ("A circle on the left of a circle", [Obj(1, 1, "red", "circle")], False),  # needs two objects
    ("A circle on the left of a circle", [Obj(1, 1, "red", "circle"), Obj(1, 2, "red", "circle")], True),
])
def test_oracle_on_hand_made_scenes(prompt, scene, ok):
    assert _score(prompt, scene).overall == float(ok)


def test_sub_scores_by_hand():
    s = _score("A red circle and a blue square", [Obj(0, 0, "red", "circle"), Obj(2, 3, "green", "square")])
    assert s.as_dict() == {"color": 0.5, "shape": 1.0, "count": None, "spatial": None, "overall": 0.0}
    s = _score("A red circle and a blue circle", [Obj(0, 0, "red", "circle")])  # one shared shape check
    assert s.as_dict() == {"color": 0.5, "shape": 1.0, "count": None, "spatial": None, "overall": 0.0}
    s = _score("Two red squares and one circle", [Obj(0, 0, "red", "square"), Obj(0, 1, "red", "square"),
                                                  Obj(0, 2, "red", "square"), Obj(3, 3, "blue", "circle")])
    assert s.as_dict() == {"color": None, "shape": 1.0, "count": 0.5, "spatial": None, "overall": 0.0}
    s = _score("A red circle on the left of a blue square", [Obj(0, 0, "blue", "circle"), Obj(0, 2, "blue", "square")])
    assert s.as_dict() == {"color": 0.5, "shape": 1.0, "count": None, "spatial": 0.0, "overall": 0.0}
    s = _score("A red circle on the left of a blue square", [Obj(2, 0, "blue", "triangle")])
    assert s.as_dict() == {"color": 0.0, "shape": 0.0, "count": None, "spatial": 0.0, "overall": 0.0}
    s = _score("A circle below a triangle", [Obj(3, 0, "red", "circle"), Obj(1, 0, "red", "triangle")])
    assert s.as_dict() == {"color": None, "shape": 1.0, "count": None, "spatial": 1.0, "overall": 1.0}
    # an unknown (corrupted) cell matches nothing
    image = W.render([Obj(0, 0, "red", "circle")])
    image[:W.CELL, :W.CELL] = (0, 0, 0)
    assert W.score("A red circle", image).as_dict() == {"color": 0.0, "shape": 0.0, "count": None,
                                                        "spatial": None, "overall": 0.0}


def test_relation_holds_for_every_pair_of_cells():
    cells = [(r, c) for r in range(W.GRID) for c in range(W.GRID)]
    for ra, ca in cells:
        for rb, cb in cells:
            a, b = Obj(ra, ca, "red", "circle"), Obj(rb, cb, "blue", "square")
            held = {rel for rel in W.RELATIONS if W.relation_holds(a, b, rel)}
            assert held == {rel for rel in W.RELATIONS if my_relation(a, b, rel)}, (a, b)
            for rel in W.RELATIONS:  # symmetric under swapping the objects
                assert W.relation_holds(a, b, rel) == W.relation_holds(b, a, W.OPPOSITE[rel])
            dx, dy = abs(cb - ca), abs(rb - ra)
            assert len(held) == (0 if (dx, dy) == (0, 0) else 2 if dx == dy else 1), (a, b, held)
    with pytest.raises(ValueError, match="unknown relation"):
        W.relation_holds(Obj(0, 0, "red", "circle"), Obj(0, 1, "red", "circle"), "near")


# ------------------------------------------------------------------------------------- questions


@FAST
@given(seed=st.integers(0, 2**32 - 1), category=st.sampled_from(W.CATEGORIES), scene=scenes(max_objects=8))
def test_questions_parse_back_to_their_checks(seed, category, scene):
    spec = W.random_spec(category, random.Random(seed))
    checks = W.checks(spec)
    qs = W.questions(spec.text())
    assert len(qs) == len(checks) == len(set(checks))
    objects = W.parse(W.render(scene))
    for q, c in zip(qs, checks, strict=True):
        assert q[0].isupper() and q.endswith("?")
        assert W.parse_question(q) == c
        assert W.parse_question(" " + q.upper().replace("?", " ?")) == c
        # what each check means, independently
        if c.kind == "count":
            expected = sum(my_match(c.phrase, o) for o in scene) == c.phrase.count
        elif c.kind in ("color", "shape"):
            expected = any(my_match(c.phrase, o) for o in scene)
        else:
            expected = my_spatial(c.phrase, c.other, c.relation, scene)
        assert c.holds(objects) == expected


def test_questions_by_hand():
    assert W.questions("Two red squares and one circle.") == [
        "Is there a square?", "Are there two red squares?", "Is there a circle?", "Is there one circle?"]
    assert W.questions("An orange circle on the left of a triangle") == [
        "Is there a circle?", "Is there an orange circle?", "Is there a triangle?",
        "Is the orange circle on the left of the triangle?"]


def test_check_holds_by_hand():
    scene = [Obj(0, 0, "red", "circle"), Obj(0, 3, "blue", "circle"), Obj(3, 1, "red", "square")]
    q = W.parse_question
    assert q("Is there a red circle?").holds(scene)
    assert not q("Is there a green circle?").holds(scene)
    assert q("Are there two circles?").holds(scene)
    assert not q("Are there two red circles?").holds(scene)
    assert q("Is there one red circle?").holds(scene)
    assert not q("Are there three circles?").holds(scene)
    assert not q("Is there a triangle?").holds(scene)
    assert q("Is the red circle on the left of the blue circle?").holds(scene)
    assert not q("Is the blue circle on the left of the red circle?").holds(scene)
    assert q("Is the blue circle above the square?").holds(scene)  # dx = -2, dy = 3: vertical dominates
    assert not q("Is the blue circle on the right of the square?").holds(scene)
    assert q("Is the square below the circle?").holds(scene)
    assert not q("Is the red square below the blue circle?").holds([])
    assert q("is there a square").kind == "shape" and q("IS THERE A RED SQUARE").kind == "color"


@pytest.mark.parametrize("question", [
    "", "?", "Is there a cat?", "Is there a hexagon?", "Are there five circles?", "Is the circle near the square?",
    "What colour is the circle?", "Is there a red?", "Is the circle on the left of?", "there is a circle?",
])
def test_parse_question_rejects_junk(question):
    with pytest.raises(W.PromptError, match=re.escape(repr(question))):
        W.parse_question(question)


# ------------------------------------------------------------------------------------ held-out split


def test_eval_prompts_are_held_out_distinct_balanced_and_fixed():
    for count, fraction in ((30, 0.2), (7, 0.1), (12, 0.5)):
        prompts = W.eval_prompts(count, fraction)
        assert len(prompts) == count
        assert all(W.is_held_out(p, fraction) for p in prompts)
        assert len({W.parse_prompt(p) for p in prompts}) == count
        cats = [W.parse_prompt(p).category for p in prompts]
        sizes = [cats.count(c) for c in W.CATEGORIES]
        assert sum(sizes) == count and max(sizes) - min(sizes) <= 1
        assert prompts == W.eval_prompts(count, fraction)
        assert all(p == W.parse_prompt(p).text() for p in prompts)  # canonical text
    assert W.eval_prompts(30, 0.2, seed=1) != W.eval_prompts(30, 0.2, seed=2)
    assert W.eval_prompts(0, 0.2) == []


def test_compose_never_returns_a_held_out_prompt():
    rng = random.Random(7)
    for category in W.CATEGORIES:
        seen = set()
        for _ in range(1000):
            p = W.compose(category, rng, 0.3)
            assert not W.is_held_out(p, 0.3), p
            assert W.parse_prompt(p).category == category
            seen.add(p)
        assert len(seen) > 50  # still draws from the whole (training) space


@FAST
@given(seed=st.integers(0, 2**32 - 1), category=st.sampled_from(W.CATEGORIES),
       fraction=st.floats(0.0, 1.0))
def test_is_held_out_is_canonical_and_monotone(seed, category, fraction):
    text = W.random_spec(category, random.Random(seed)).text()
    held = W.is_held_out(text, fraction)
    for variant in (text.upper(), text.lower() + ".", f" {text}. ", text.replace(" ", "  ")):
        assert W.is_held_out(variant, fraction) == held
    assert not W.is_held_out(text, 0.0) and W.is_held_out(text, 1.0 + 1e-9)
    if held:
        assert W.is_held_out(text, min(1.0, fraction + 0.1))
    else:
        assert not W.is_held_out(text, max(0.0, fraction - 0.1))


def test_held_out_share_is_near_the_fraction():
    rng = random.Random(3)
    for fraction in (0.1, 0.3):
        texts = [W.random_spec(c, rng).text() for c in W.CATEGORIES for _ in range(1500)]
        share = np.mean([W.is_held_out(t, fraction) for t in texts])
        assert abs(share - fraction) < 0.05, (fraction, share)
        distinct = set(texts)
        share = np.mean([W.is_held_out(t, fraction) for t in distinct])
        assert abs(share - fraction) < 0.05, (fraction, share)


# ------------------------------------------------------------------------------------ evaluate.py


def _result(partial, self_score, oracle=None, category="color", exact=True):
    oracle = [float(p == 1.0) for p in partial] if oracle is None else oracle
    return E.PromptResult(prompt="A red circle", category=category, oracle=oracle, partial=list(partial),
                          self_score=list(self_score), questions=["Is there a red circle?"], questions_exact=exact)


def my_spearman(x, y) -> float:
    """Pearson correlation of average ranks."""
    def ranks(v):
        v = list(v)
        return [sum(w < u for w in v) + (sum(w == u for w in v) + 1) / 2 for u in v]
    rx, ry = np.array(ranks(x)), np.array(ranks(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt((rx ** 2).sum() * (ry ** 2).sum()))


def test_pairwise_agreement_by_hand():
    r1 = _result([0.0, 0.5, 1.0], [0.1, 0.3, 0.2])  # pairs: agree, agree, disagree
    r2 = _result([1.0, 1.0, 0.0], [0.5, 0.5, 0.5])  # one oracle tie (skipped), two self ties (half each)
    assert E.pairwise_agreement([r1]) == pytest.approx((2 / 3, 3))
    assert E.pairwise_agreement([r2]) == pytest.approx((0.5, 2))
    agreement, pairs = E.pairwise_agreement([r1, r2])
    assert pairs == 5 and agreement == pytest.approx((2 + 0.5 + 0.5) / 5)
    r3 = _result([0.0, 1.0], [0.9, -0.3])  # reversed
    assert E.pairwise_agreement([r3]) == (0.0, 1)
    for empty in ([], [_result([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])], [_result([1.0], [0.2])]):
        agreement, pairs = E.pairwise_agreement(empty)
        assert pairs == 0 and math.isnan(agreement)


def test_mean_spearman_by_hand():
    r1 = _result([0.0, 0.5, 1.0], [0.1, 0.3, 0.2])  # ranks (1,2,3) vs (1,3,2): 1 - 6*2/(3*8) = 0.5
    r2 = _result([1.0, 1.0, 0.0], [0.5, 0.5, 0.5])  # self constant: left out
    r3 = _result([0.5, 0.5], [0.1, 0.9])  # oracle constant: left out
    r4 = _result([0.0, 1.0, 0.5, 0.25], [0.0, 0.8, 0.4, 0.2])  # same order: 1
    rho, n = E.mean_spearman([r1, r2, r3, r4])
    assert n == 2 and rho == pytest.approx((0.5 + 1.0) / 2)
    r5 = _result([0.0, 0.0, 1.0], [0.1, 0.2, 0.3])  # ties in the oracle: average ranks
    assert my_spearman(r5.self_score, r5.partial) == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    rho, n = E.mean_spearman([r5, r1])
    assert n == 2 and rho == pytest.approx((1.5 / math.sqrt(3) + 0.5) / 2)
    rho, n = E.mean_spearman([r2, r3])
    assert n == 0 and math.isnan(rho)
    assert math.isnan(E.mean_spearman([])[0])


@FAST
@given(seed=st.integers(0, 2**32 - 1))
def test_metrics_match_independent_computations_on_random_results(seed):
    rng = random.Random(seed)
    results = []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(1, 6)
        results.append(_result([rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(n)],
                               [rng.choice([-0.5, 0.0, 0.5, 1.0]) for _ in range(n)]))
    agree, pairs = 0.0, 0
    rhos = []
    for r in results:
        for a in range(len(r.partial)):
            for b in range(len(r.partial)):
                if r.partial[a] < r.partial[b]:
                    pairs += 1
                    agree += 1.0 if r.self_score[a] < r.self_score[b] else 0.5 if r.self_score[a] == r.self_score[b] else 0
        if len(set(r.partial)) > 1 and len(set(r.self_score)) > 1:
            rhos.append(my_spearman(r.self_score, r.partial))
    got, got_pairs = E.pairwise_agreement(results)
    assert got_pairs == pairs
    assert (math.isnan(got) and pairs == 0) or got == pytest.approx(agree / pairs)
    rho, n = E.mean_spearman(results)
    assert n == len(rhos)
    assert (math.isnan(rho) and not rhos) or rho == pytest.approx(float(np.mean(rhos)))


def test_summarize_by_hand():
    results = [_result([1.0, 0.5], [0.9, 0.1], oracle=[1.0, 0.0], category="color", exact=True),
               _result([0.0, 1.0], [0.2, 0.4], oracle=[0.0, 1.0], category="spatial", exact=False)]
    s = E.summarize(results)
    assert s["overall"] == pytest.approx(0.5) and s["partial"] == pytest.approx(0.625)
    assert s["per_category"] == pytest.approx({"color": 0.5, "spatial": 0.5})
    assert s["self_score"] == pytest.approx(0.4) and s["questions_exact"] == pytest.approx(0.5)
    assert (s["agreement_pairwise"], s["agreement_pairs"]) == (1.0, 2)
    assert s["spearman_prompts"] == 2 and s["spearman_mean"] == pytest.approx(1.0)


def test_nothing_extra_and_strict_by_hand():
    prompt = "A red circle and a blue square"
    both = [Obj(0, 0, "red", "circle"), Obj(3, 3, "blue", "square")]
    extra = both + [Obj(1, 1, "green", "triangle")]
    assert W.nothing_extra(prompt, W.render(both)) and not W.nothing_extra(prompt, W.render(extra))
    assert W.score(prompt, W.render(extra)).overall == 1.0  # the checks alone accept the cluttered image
    assert W.nothing_extra("Two squares and three circles", W.render(
        [Obj(0, i, "red", "square") for i in range(2)] + [Obj(2, i, "red", "circle") for i in range(3)]))
    corrupt = W.render(both)
    corrupt[16:24, 16:24] = (1, 2, 3)  # an unparseable cell is an extra object too
    assert not W.nothing_extra(prompt, corrupt)
    results = [_result([1.0, 1.0], [0.0, 0.1]), _result([1.0, 0.0], [0.2, 0.1])]
    for r, strict in zip(results, ([1.0, 0.0], [0.0, 0.0]), strict=True):
        r.strict = strict
    assert E.summarize(results)["strict"] == pytest.approx(0.25)
    assert math.isnan(E.summarize([_result([1.0], [0.0])])["strict"])  # an evaluation from before the metric


def test_check_fraction_by_hand():
    prompt = "A red circle on the left of a blue square"
    # checks: circle exists, red circle exists, square exists, blue square exists, relation
    scene = [Obj(0, 0, "blue", "circle"), Obj(0, 2, "blue", "square")]
    assert E.check_fraction(prompt, W.render(scene)) == pytest.approx(3 / 5)
    scene = [Obj(0, 0, "red", "circle"), Obj(0, 2, "blue", "square")]
    assert E.check_fraction(prompt, W.render(scene)) == 1.0
    scene = [Obj(0, 3, "red", "circle"), Obj(0, 2, "blue", "square")]
    assert E.check_fraction(prompt, W.render(scene)) == pytest.approx(4 / 5)
    assert E.check_fraction(prompt, W.render([])) == 0.0
    # numeracy: square exists, exactly two squares, circle exists, exactly one circle
    scene = [Obj(0, 0, "red", "square"), Obj(1, 1, "red", "square"), Obj(2, 2, "red", "square")]
    assert E.check_fraction("Two squares and one circle", W.render(scene)) == pytest.approx(1 / 4)
