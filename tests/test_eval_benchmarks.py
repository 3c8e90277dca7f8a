"""Benchmark modules (silmm/eval/benchmarks): reading with every id kept, exports in the official layouts,
and each benchmark's scoring rules against hand computations. Fixtures are small files in each benchmark's
format, written here (never the real benchmark files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from silmm.eval.benchmarks import BENCHMARKS, get_benchmark
from silmm.eval.benchmarks.t2i_compbench import scorer_index, scorer_prompt
from silmm.eval.records import BenchmarkError, ImageAnswers

NAN = float("nan")


def answers(correct, p_yes=None, p_no=None, score=0.0) -> ImageAnswers:
    n = len(correct)
    return ImageAnswers(score=score, questions=[f"q{i}" for i in range(n)],
                        p_yes=list(p_yes) if p_yes is not None else [NAN] * n,
                        p_no=list(p_no) if p_no is not None else [NAN] * n,
                        answers=["yes" if c else "no" for c in correct], correct=[float(c) for c in correct])


def images_for(seed: int, n: int, side: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def load_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_registry_knows_every_benchmark_and_names_them_on_a_typo():
    assert {"t2i_compbench", "dpg_bench", "tifa", "geneval", "toy"} <= set(BENCHMARKS)
    with pytest.raises(BenchmarkError, match="known: dpg_bench, geneval, t2i_compbench, tifa, toy"):
        get_benchmark("t2i_compbnech")


# ---------------------------------------------------------------- T2I-CompBench++

T2I_FILES = {
    "color": ["a red apple and a blue bowl", "", "a green_bench and a yellow cake\textra field"],
    "shape": ["a round clock and a square table"],
    "texture": ["a wooden chair and a metallic lamp"],
    "spatial": ["a cat on the left of a dog"],
    "3d_spatial": ["a cup in front of a vase"],
    "numeracy": ["three apples and two dogs"],
    "non_spatial": ["A person is reading a book."],
    "complex": ["The red hat was on top of the brown coat rack.", "The fluffy cat chased the green ball.",
                "The tall man in a blue shirt stood left of the car and waved."],
}


def write_t2i(root, files=T2I_FILES):
    base = root / "examples" / "dataset"
    base.mkdir(parents=True)
    for cat, lines in files.items():
        (base / f"{cat}_val.txt").write_text("".join(line + "\n" for line in lines))
    (base / "complex_val_spatial.txt").write_text("The red hat was on top of the brown coat rack.\n")
    (base / "complex_val_action.txt").write_text("the fluffy cat chased the green ball.\n")  # 3-in-1 lower-cases
    return root


def test_t2i_read_keeps_ids_categories_and_source_lines(tmp_path):
    bench = get_benchmark("t2i_compbench")
    prompts = bench.read(write_t2i(tmp_path))
    by_id = {p.id: p for p in prompts}
    assert len(prompts) == 11  # 12 lines, one blank
    assert by_id["color_val:1"].text == "a red apple and a blue bowl"
    assert by_id["color_val:3"].text == "a green_bench and a yellow cake"  # before the tab, like inference_eval.py
    assert "color_val:2" not in by_id
    assert by_id["color_val:3"].source == "examples/dataset/color_val.txt" and by_id["color_val:3"].line == 3
    assert by_id["3d_spatial_val:1"].category == "3d_spatial"
    assert [by_id[f"complex_val:{i}"].subcategory for i in (1, 2, 3)] == ["spatial", "action", "spatial_action"]
    assert all(p.questions == () for p in prompts)
    assert any("1 blank line" in n for n in bench.notes) and any("tab-separated" in n for n in bench.notes)


def test_t2i_missing_or_empty_files_are_errors_naming_the_file(tmp_path):
    root = write_t2i(tmp_path / "a")
    (root / "examples" / "dataset" / "numeracy_val.txt").unlink()
    with pytest.raises(BenchmarkError, match="numeracy_val.txt"):
        get_benchmark("t2i_compbench").read(root)
    root = write_t2i(tmp_path / "b", {**T2I_FILES, "shape": ["", "  "]})
    with pytest.raises(BenchmarkError, match="shape_val.txt: no prompts"):
        get_benchmark("t2i_compbench").read(root)
    with pytest.raises(BenchmarkError, match="does not exist"):
        get_benchmark("t2i_compbench").read(tmp_path / "nowhere")


def test_t2i_export_names_parse_back_through_the_official_scorers(tmp_path):
    bench = get_benchmark("t2i_compbench")
    prompts = [p for p in bench.read(write_t2i(tmp_path / "bench")) if p.category in ("color", "complex")]
    stock = {p.id: images_for(i, 3) for i, p in enumerate(prompts)}
    out = tmp_path / "export"
    (out / "color_val" / "samples").mkdir(parents=True)
    (out / "color_val" / "samples" / "stale_000099.png").write_bytes(b"old")  # an earlier export's leftover
    bench.export(out, prompts, lambda p: stock[p.id])

    assert sorted(d.name for d in out.iterdir()) == ["color_val", "complex_val"]
    for folder in ("color_val", "complex_val"):
        files = sorted((out / folder / "samples").iterdir(), key=lambda f: scorer_index(f.name))  # BLIP_vqa's sort
        group = sorted((p for p in prompts if p.id.startswith(folder + ":")), key=lambda p: p.line)
        assert [scorer_index(f.name) for f in files] == list(range(3 * len(group)))
        for k, p in enumerate(group):
            for j in range(3):
                f = files[3 * k + j]
                assert f.name.count("_") == 1  # numeracy_eval.py reads the number as name.split("_")[1]
                assert int(f.name.split(".png")[0].split("_")[1]) == 3 * k + j
                assert scorer_prompt(f.name) == p.text.replace("_", " ")  # what BLIP/CLIP/UniDet read back
                np.testing.assert_array_equal(load_png(f), stock[p.id][j])
        index = json.loads((out / folder / "silmm_export.json").read_text())
        assert {(e["file"], e["prompt_id"], e["text"]) for e in index["images"]} == {
            (f"samples/{files[3 * k + j].name}", p.id, p.text) for k, p in enumerate(group) for j in range(3)}
    assert "a red apple and a blue bowl_000000.png" in {f.name for f in (out / "color_val" / "samples").iterdir()}
    assert "a green bench and a yellow cake_000003.png" in {f.name for f in (out / "color_val" / "samples").iterdir()}
    assert "The red hat was on top of the brown coat rack._000000.png" in {
        f.name for f in (out / "complex_val" / "samples").iterdir()}


def test_t2i_aggregate_per_category_means_and_the_blip_product_rule(tmp_path):
    bench = get_benchmark("t2i_compbench")
    prompts = [p for p in bench.read(write_t2i(tmp_path)) if p.category in ("color", "numeracy")]
    color1, color3 = [p for p in prompts if p.category == "color"]
    (numeracy,) = [p for p in prompts if p.category == "numeracy"]
    got = bench.aggregate(prompts, {
        color1.id: [answers([1, 1], p_yes=[0.8, 0.5], p_no=[0.2, 0.5]),     # 0.8 * 0.5 = 0.4
                    answers([1], p_yes=[0.3], p_no=[0.1])],                 # 0.3 / 0.4 = 0.75
        color3.id: [answers([0, 1], p_yes=[0.2, 0.9], p_no=[0.6, 0.1])],   # 0.25 * 0.9 = 0.225
        numeracy.id: [answers([1], score=1.0), answers([0], score=0.0)],   # oracle: no p_yes -> its score
    })
    color = (0.4 + 0.75 + 0.225) / 3
    assert got["per_category"] == pytest.approx({"color": color, "numeracy": 0.5})
    assert got["overall"] == pytest.approx((color + 0.5) / 2)
    assert got["tables"]["images"] == {"color": 3.0, "numeracy": 2.0}
    assert any("reports per-category scores only" in n for n in got["notes"])
    with pytest.raises(BenchmarkError, match="no answers"):
        bench.aggregate(prompts, {color1.id: [answers([1], score=1.0)]})


# ---------------------------------------------------------------- DPG-Bench

DPG_CSV = """item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,question_natural_language
alpha,x,,1,0,entity,whole,entity - whole (truck),Is there a truck?
alpha,x,,2,1,attribute,color,attribute - color (truck red),Is the truck red?
alpha,x,,3,2,attribute,texture,attribute - texture (truck glossy),Is the red truck glossy?
alpha,x,,4,0,global,,global - (dusk),Is it dusk?
beta,"y, with a comma",,1,0,entity,whole,entity - whole (cat),Is there a cat?
beta,"y, with a comma",,2,0,entity,whole,entity - whole (dog),Is there a dog?
beta,"y, with a comma",,3,"1,2",relation,spatial,"relation - spatial (cat, dog, left of)",Is the cat left of the dog?
orphan,z,,1,0,entity,whole,entity - whole (cow),Is there a cow?
"""


def write_dpg(root, csv_text=DPG_CSV):
    prompts = root / "dpg_bench" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "alpha.txt").write_text("A glossy red pickup truck parked on a beach at dusk.\n")
    (prompts / "beta.txt").write_text("A cat to the left of a dog.")
    (prompts / "gamma.txt").write_text("A prompt the CSV has no questions for.")
    if csv_text is not None:
        (root / "dpg_bench" / "dpg_bench.csv").write_text(csv_text)
    return root


def test_dpg_read_keeps_item_ids_questions_parents_and_categories(tmp_path):
    bench = get_benchmark("dpg_bench")
    prompts = bench.read(write_dpg(tmp_path))
    assert [p.id for p in prompts] == ["alpha", "beta"]
    alpha, beta = prompts
    assert alpha.text == "A glossy red pickup truck parked on a beach at dusk."
    assert alpha.source == "dpg_bench/prompts/alpha.txt" and alpha.line == 0 and alpha.subcategory == "alpha"
    assert [(q.id, q.parents, q.category, q.answer) for q in alpha.questions] == [
        ("1", (), "entity - whole", "yes"), ("2", ("1",), "attribute - color", "yes"),
        ("3", ("2",), "attribute - texture", "yes"), ("4", (), "global -", "yes")]  # text before "(", as the script
    assert beta.questions[2].parents == ("1", "2") and beta.questions[2].text == "Is the cat left of the dog?"
    assert any("gamma" in n and "without questions" in n for n in bench.notes)
    assert any("orphan" in n and "without a prompt file" in n for n in bench.notes)


def test_dpg_without_csv_keeps_prompts_and_says_so(tmp_path):
    bench = get_benchmark("dpg_bench")
    prompts = bench.read(write_dpg(tmp_path, csv_text=None))
    assert [p.id for p in prompts] == ["alpha", "beta", "gamma"] and all(not p.questions for p in prompts)
    assert any("dpg_bench.csv not found" in n for n in bench.notes)


@pytest.mark.parametrize("bad_row, message", [
    ("beta,y,,x1,0,entity,whole,entity - whole (cow),Is there a cow?", r"dpg_bench\.csv:4: proposition_id 'x1'"),
    ("alpha,y,,5,0,entity,whole,entity - whole (cow),Is there a cow?", r"dpg_bench\.csv:4: rows of item 'alpha'"),
    ("beta,y,,1,0,entity,whole,entity - whole (cow),Is there a cow?", r"dpg_bench\.csv:4: duplicate proposition_id 1"),
    ("beta,y,,2,7,entity,whole,entity - whole (cow),Is there a cow?", r"dpg_bench\.csv:3: item 'beta' question 2 "
                                                                     r"depends on missing question\(s\) 7"),
    ("beta,y,,2,0,entity", r"dpg_bench\.csv:4: wrong number of fields"),
])
def test_dpg_bad_csv_rows_are_errors_naming_file_and_line(tmp_path, bad_row, message):
    csv_text = "\n".join(DPG_CSV.splitlines()[:2] + ["beta,y,,1,0,entity,whole,entity - whole (cat),Is there a cat?",
                                                      bad_row]) + "\n"
    with pytest.raises(BenchmarkError, match=message):
        get_benchmark("dpg_bench").read(write_dpg(tmp_path, csv_text))


def test_dpg_export_is_one_2x2_grid_per_item_cropped_as_the_official_script_does(tmp_path):
    bench = get_benchmark("dpg_bench")
    prompts = bench.read(write_dpg(tmp_path / "bench"))
    stock = {p.id: images_for(i, 4, side=6) for i, p in enumerate(prompts)}
    out = tmp_path / "export"
    bench.export(out, prompts, lambda p: stock[p.id])
    assert sorted(f.name for f in out.iterdir()) == ["alpha.png", "beta.png"]
    side = 6  # compute_dpg_bench.py --resolution
    crops = [(0, 0, side, side), (side, 0, side * 2, side), (0, side, side, side * 2), (side, side, side * 2, side * 2)]
    for p in prompts:
        grid = Image.open(out / f"{p.id}.png")
        assert grid.size == (12, 12)
        assert (out / f"{p.id}.png").name.split(".")[0] == p.id  # how the script finds the item's questions
        for tile, crop in enumerate(crops):
            np.testing.assert_array_equal(np.asarray(grid.crop(crop).convert("RGB")), stock[p.id][tile])
    with pytest.raises(BenchmarkError, match="2x2 grid"):
        bench.export(out, prompts[:1], lambda p: images_for(0, 5))


def test_dpg_aggregate_parent_gating_tile_means_and_official_categories(tmp_path):
    bench = get_benchmark("dpg_bench")
    alpha, beta = bench.read(write_dpg(tmp_path))
    # alpha: q1 truck, q2 red (parent 1), q3 glossy (parent 2), q4 dusk
    alpha_images = [answers([1, 1, 1, 1]),   # 4/4 = 1
                    answers([0, 1, 1, 1]),   # q2 gated by q1, q3 by the gated q2: [0,0,0,1] -> 1/4
                    answers([1, 0, 1, 0]),   # q3 gated by q2: [1,0,0,0] -> 1/4
                    answers([1, 1, 0, 1])]   # 3/4
    # beta: q1 cat, q2 dog, q3 relation (parents 1 and 2)
    beta_images = [answers([1, 0, 1]),       # q3 gated: [1,0,0] -> 1/3
                   answers([1, 1, 1]),       # 1
                   answers([1, 1, 0]),       # 2/3
                   answers([0, 1, 1])]       # [0,1,0] -> 1/3
    got = bench.aggregate([alpha, beta], {"alpha": alpha_images, "beta": beta_images})
    alpha_score = (1 + 0.25 + 0.25 + 0.75) / 4
    beta_score = (1 / 3 + 1 + 2 / 3 + 1 / 3) / 4
    assert got["overall"] == pytest.approx((alpha_score + beta_score) / 2)
    # categories: un-gated answers of the last image (tile 4), level 1 = the part before "-"
    assert got["per_category"] == pytest.approx({"global": 1.0, "entity": (1 + 0 + 1) / 3,
                                                 "attribute": (1 + 0) / 2, "relation": 1.0})
    assert list(got["per_category"]) == ["global", "entity", "attribute", "relation"]
    assert got["tables"]["per_category_l2"] == pytest.approx({
        "attribute - color": 1.0, "attribute - texture": 0.0, "entity - whole": 2 / 3, "global -": 1.0,
        "relation - spatial": 1.0})
    assert got["tables"]["per_category_all_images"]["entity"] == pytest.approx((3 + 3 + 3) / 12)
    with pytest.raises(BenchmarkError, match="answer the benchmark's questions in order"):
        bench.aggregate([alpha], {"alpha": [answers([1, 1])]})


# ---------------------------------------------------------------- TIFA

def qa(cid, caption, question, choices, answer, element_type, element):
    return {"id": cid, "caption": caption, "question": question, "choices": choices, "answer": answer,
            "element_type": element_type, "element": element}


TIFA_INPUTS = [{"id": "coco_1", "caption": "A surfer carries a white board.", "coco_val_id": "9"},
               {"id": "drawbench_2", "caption": "Three cats on the grass."},
               {"id": "partiprompt_3", "caption": "A caption nobody wrote questions for."}]
TIFA_QA = [qa("coco_1", "A surfer carries a white board.", "is this a surfer?", ["yes", "no"], "yes",
              "animal/human", "surfer"),
           qa("coco_1", "A surfer carries a white board.", "what color is the board?", ["white", "red", "blue"],
              "white", "color", "white"),
           qa("drawbench_2", "Three cats on the grass.", "how many cats are there?", ["1", "2", "3", "4"], "3",
              "counting", "three"),
           qa("drawbench_2", "Three cats on the grass.", "are there cats?", ["yes", "no"], "yes",
              "animal/human", "cats"),
           qa("drawbench_2", "Three cats on the grass.", "is there grass?", ["yes", "no"], "yes", "object", "grass")]


def write_tifa(root, inputs=TIFA_INPUTS, qas=TIFA_QA):
    base = root / "tifa_v1.0"
    base.mkdir(parents=True)
    (base / "tifa_v1.0_text_inputs.json").write_text(json.dumps(inputs, indent=4))
    (base / "tifa_v1.0_question_answers.json").write_text(json.dumps(qas, indent=4))
    return root


def test_tifa_read_keeps_ids_lines_and_multiple_choice_questions(tmp_path):
    bench = get_benchmark("tifa")
    prompts = bench.read(write_tifa(tmp_path))
    assert [p.id for p in prompts] == ["coco_1", "drawbench_2"]
    coco, draw = prompts
    assert (coco.text, coco.category, coco.source) == ("A surfer carries a white board.", "coco",
                                                       "tifa_v1.0/tifa_v1.0_text_inputs.json")
    assert (coco.line, draw.line) == (2, 7)  # where each entry's "{" stands (indent=4 layout)
    assert [(q.id, q.text, q.choices, q.answer, q.category, q.element) for q in draw.questions] == [
        ("0", "how many cats are there?", ("1", "2", "3", "4"), "3", "counting", "three"),
        ("1", "are there cats?", ("yes", "no"), "yes", "animal/human", "cats"),
        ("2", "is there grass?", ("yes", "no"), "yes", "object", "grass")]
    assert any("partiprompt_3" in n and "without questions" in n for n in bench.notes)


def test_tifa_bad_input_names_file_and_line(tmp_path):
    bad_qa = TIFA_QA[:2] + [qa("coco_404", "?", "is it?", ["yes", "no"], "yes", "object", "x")]
    with pytest.raises(BenchmarkError, match=r"tifa_v1.0_question_answers.json:27: id 'coco_404' is not in"):
        get_benchmark("tifa").read(write_tifa(tmp_path / "a", qas=bad_qa))
    with pytest.raises(BenchmarkError, match=r"tifa_v1.0_text_inputs.json:11: duplicate id 'coco_1' \(first at "
                                             r"line 2\)"):
        get_benchmark("tifa").read(write_tifa(tmp_path / "b", inputs=TIFA_INPUTS[:2] + TIFA_INPUTS[:1]))
    missing_field = [dict(TIFA_QA[0])]
    del missing_field[0]["element_type"]
    with pytest.raises(BenchmarkError, match=r"question_answers.json:2: missing field 'element_type'"):
        get_benchmark("tifa").read(write_tifa(tmp_path / "c", qas=missing_field))
    root = write_tifa(tmp_path / "d")
    (root / "tifa_v1.0" / "tifa_v1.0_text_inputs.json").write_text('[\n  {"id": "a", "caption": "b"},\n  {"id": ]\n')
    with pytest.raises(BenchmarkError, match=r"tifa_v1.0_text_inputs.json:3: malformed JSON"):
        get_benchmark("tifa").read(root)
    with pytest.raises(BenchmarkError, match="no captions"):
        get_benchmark("tifa").read(write_tifa(tmp_path / "e", inputs=[]))


def test_tifa_export_is_an_id_to_image_json_the_scorer_resolves(tmp_path):
    bench = get_benchmark("tifa")
    prompts = bench.read(write_tifa(tmp_path / "bench"))
    stock = {p.id: images_for(i, 2) for i, p in enumerate(prompts)}
    out = tmp_path / "export"
    bench.export(out, prompts, lambda p: stock[p.id])
    for j in range(2):
        id2img_path = out / f"id2img_{j}.json"
        id2img = json.loads(id2img_path.read_text())
        assert set(id2img) == {"coco_1", "drawbench_2"}
        for cid, fn in id2img.items():  # tifa_score_benchmark: relative paths join the JSON's folder
            np.testing.assert_array_equal(load_png(id2img_path.parent / fn), stock[cid][j])
    qa_out = json.loads((out / "question_answers.json").read_text())
    assert qa_out == [{k: v for k, v in e.items() if k != "coco_val_id"} for e in TIFA_QA]


def test_tifa_aggregate_per_caption_mean_and_accuracy_by_element_type(tmp_path):
    bench = get_benchmark("tifa")
    coco, draw = bench.read(write_tifa(tmp_path))
    got = bench.aggregate([coco, draw], {
        "coco_1": [answers([1, 0]), answers([1, 1])],   # (1/2 + 2/2) / 2 = 0.75
        "drawbench_2": [answers([0, 1, 1]), answers([0, 1, 0])],  # (2/3 + 1/3) / 2 = 0.5
    })
    assert got["overall"] == pytest.approx((0.75 + 0.5) / 2)
    assert got["per_category"] == pytest.approx({"object": 0.5, "animal/human": 1.0, "color": 0.5, "counting": 0.0})
    assert got["tables"]["per_source"] == pytest.approx({"coco": 0.75, "drawbench": 0.5})
    assert got["tables"]["summary"]["tifa_stdev"] == pytest.approx(np.std([0.75, 0.5], ddof=1))


# ---------------------------------------------------------------- GenEval

GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}',
    '{"tag": "counting", "include": [{"class": "bus", "count": 3}], "exclude": [{"class": "bus", "count": 4}], '
    '"prompt": "a photo of three buses"}',
    '{"tag": "colors", "include": [{"class": "apple", "count": 1, "color": "red"}], "prompt": "a photo of a red apple"}',
    '{"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": '
    '["left of", 0]}], "prompt": "a photo of a dog left of a cat"}',
    '{"tag": "single_object", "include": [{"class": "umbrella", "count": 1}], "prompt": "a photo of an umbrella"}',
]


def write_geneval(root, lines=GENEVAL_LINES):
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "evaluation_metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return root


def test_geneval_read_keeps_line_indices_tags_metadata_and_derives_questions(tmp_path):
    prompts = get_benchmark("geneval").read(write_geneval(tmp_path))
    assert [p.id for p in prompts] == ["00000", "00001", "00002", "00003", "00004"]
    assert [p.category for p in prompts] == ["single_object", "counting", "colors", "position", "single_object"]
    assert [p.line for p in prompts] == [1, 2, 3, 4, 5] and prompts[0].source == "prompts/evaluation_metadata.jsonl"
    assert [p.metadata for p in prompts] == GENEVAL_LINES
    assert [[q.text for q in p.questions] for p in prompts] == [
        ["Is there a dog?"], ["Are there exactly three buses?"], ["Is there an apple?", "Is the apple red?"],
        ["Is there a cat?", "Is there a dog?", "Is the dog to the left of the cat?"], ["Is there an umbrella?"]]
    assert [q.id for q in prompts[3].questions] == ["q0", "q1", "q2"]
    assert all(q.answer == "yes" and not q.choices for p in prompts for q in p.questions)


@pytest.mark.parametrize("line, message", [
    ('{"tag": "colors", "include": [{"class": "apple", "count": 1}], "prompt": "a photo of an apple"', "malformed JSON"),
    ('{"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["left of", 1]}, {"class": "dog", '
     '"count": 1}], "prompt": "x"}', r"include\[0\]: position should be"),
    ('{"tag": "counting", "include": [{"class": "bus", "count": 0}], "prompt": "x"}', "count should be a positive"),
    ('{"include": [{"class": "bus", "count": 1}], "prompt": "x"}', "missing tag"),
    ("", "blank line"),
])
def test_geneval_bad_lines_are_errors_naming_file_and_line(tmp_path, line, message):
    with pytest.raises(BenchmarkError, match=rf"evaluation_metadata.jsonl:2: .*{message}"):
        get_benchmark("geneval").read(write_geneval(tmp_path, [GENEVAL_LINES[0], line, GENEVAL_LINES[1]]))


def test_geneval_export_folders_samples_and_verbatim_metadata(tmp_path):
    bench = get_benchmark("geneval")
    prompts = bench.read(write_geneval(tmp_path / "bench"))
    stock = {p.id: images_for(i, 4) for i, p in enumerate(prompts)}
    out = tmp_path / "export"
    bench.export(out, prompts, lambda p: stock[p.id])
    assert sorted(d.name for d in out.iterdir()) == ["00000", "00001", "00002", "00003", "00004"]
    source = (tmp_path / "bench" / "prompts" / "evaluation_metadata.jsonl").read_text().splitlines()
    for index, folder in enumerate(sorted(out.iterdir())):
        assert folder.name.isdigit() and int(folder.name) == index  # evaluate_images.py: subfolder.isdigit()
        assert (folder / "metadata.jsonl").read_text() == source[index]  # the N-th line, verbatim
        assert json.loads((folder / "metadata.jsonl").read_text())["prompt"] == prompts[index].text
        samples = sorted((folder / "samples").iterdir())
        assert [s.name for s in samples] == ["0000.png", "0001.png", "0002.png", "0003.png"]
        assert all(re.match(r"\d+\.png", s.name) for s in samples)
        for j, s in enumerate(samples):
            np.testing.assert_array_equal(load_png(s), stock[folder.name][j])


def test_geneval_aggregate_per_tag_correctness_and_mean_of_tag_means(tmp_path):
    bench = get_benchmark("geneval")
    prompts = bench.read(write_geneval(tmp_path))
    got = bench.aggregate(prompts, {
        "00000": [answers([1]), answers([1]), answers([0]), answers([1])],                # 3/4
        "00001": [answers([0]), answers([0]), answers([0]), answers([0])],                # 0/4
        "00002": [answers([1, 0]), answers([1, 1]), answers([0, 1]), answers([1, 1])],    # 2/4
        "00003": [answers([1, 1, 1]), answers([1, 1, 0]), answers([1, 0, 1]), answers([0, 1, 1])],  # 1/4
        "00004": [answers([1]), answers([1]), answers([1]), answers([1])],                # 4/4
    })
    single = (3 + 4) / 8
    assert got["per_category"] == pytest.approx({"single_object": single, "counting": 0.0, "colors": 0.5,
                                                 "position": 0.25})
    assert got["overall"] == pytest.approx((single + 0.0 + 0.5 + 0.25) / 4)  # mean of task means
    assert got["overall"] != pytest.approx((3 + 0 + 2 + 1 + 4) / 20)            # not the mean over images
    assert got["tables"]["summary"]["correct_images"] == pytest.approx(10 / 20)
    assert got["tables"]["summary"]["correct_prompts"] == pytest.approx(4 / 5)


def test_empty_sets_are_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="evaluation_metadata.jsonl: no prompts"):
        get_benchmark("geneval").read(write_geneval(tmp_path / "g", []))
    (tmp_path / "d" / "dpg_bench" / "prompts").mkdir(parents=True)
    with pytest.raises(BenchmarkError, match="no prompt files"):
        get_benchmark("dpg_bench").read(tmp_path / "d")
    for name in ("t2i_compbench", "dpg_bench", "tifa", "geneval"):
        with pytest.raises(BenchmarkError, match="nothing to aggregate"):
            get_benchmark(name).aggregate([], {})


def test_t2i_prompts_that_cannot_be_file_names_as_written(tmp_path):
    from silmm.eval.records import BenchmarkPrompt

    bench = get_benchmark("t2i_compbench")
    slash = BenchmarkPrompt(benchmark=bench.name, id="color_val:1", text="a red and/or blue cup", category="color")
    bench.export(tmp_path / "export", [slash], lambda p: images_for(0, 1))
    (name,) = [f.name for f in (tmp_path / "export" / "color_val" / "samples").iterdir()]
    assert name == "a red and or blue cup_000000.png" and scorer_prompt(name) == "a red and or blue cup"
    long = BenchmarkPrompt(benchmark=bench.name, id="complex_val:7", text="word " * 60, category="complex")
    with pytest.raises(BenchmarkError, match="complex_val:7: file name longer than 255 bytes"):
        bench.export(tmp_path / "export2", [long], lambda p: images_for(0, 1))
    assert not (tmp_path / "export2").exists()  # nothing half-written is left in place


@pytest.mark.parametrize("name", ["t2i_compbench", "dpg_bench", "tifa", "geneval"])
def test_readme_gives_the_official_commands_of_every_benchmark(name):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert get_benchmark(name).official_commands.rstrip() in readme
