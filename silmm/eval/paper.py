"""The SILMM paper's published benchmark numbers, as data: the reference rows of `silmm report`.

Source: SILMM, arXiv 2412.05818 (v2), the text in /work/shared/seeds. Every row below is the paper's line copied
with its numbers unchanged, in **percent as printed** (the benchmarks' own scorers give fractions; the paper
multiplies by 100). Only whitespace differs: numbers and the paper's "-" (not reported) are separated by single
spaces where the extracted text ran them together. The ``%Improvment`` rows (the paper's spelling) are printed
with a "%" after each number; the sign is dropped here and ``kind="improvement"`` says what they are.

    TABLE_1   all benchmarks, base models vs "+ Ours" (T2I models, SEED-LLaMA, DreamLLM, Emu3)
    TABLE_4   T2I-CompBench++ by category, SEED-LLaMA and DreamLLM, iterations 0-3
    TABLE_5   DPG-Bench by category, SEED-LLaMA and DreamLLM, iterations 0-3 (see its note on the header)
    TABLE_6   TIFA by element type, SEED-LLaMA and DreamLLM, iterations 0-3

Not encoded: Tables 2, 3 and 7 (ablations of the feedback, the KC-DPO kernel and the negative range; nothing
in silmm reports against them yet). The paper reports no GenEval numbers.

A column's ``key`` is (benchmark registry name, category key as in results.json's ``per_category``, or
"overall" for the paper's All / ALL). T2I-CompBench++'s Table 1 columns are groups of its categories
(``T2I_COMPBENCH_GROUPS``): the paper's Attribute is the mean of Color, Shape and Texture, and Layout the mean
of Spatial, 3D Spatial and Numeracy (Table 1's base and "+ Ours" rows are those means of Table 4's rows to
the printed precision; tests/test_eval_report.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER = "SILMM (arXiv 2412.05818)"
LMM_MODELS = ("SEED-LLaMA", "DreamLLM", "Emu3")  # the models the paper improves; the report shows their rows

# T2I-CompBench++ category groups of the paper's Table 1 (and Tables 2-3): group key -> category keys
T2I_COMPBENCH_GROUPS: dict[str, tuple[str, ...]] = {
    "attribute": ("color", "shape", "texture"),
    "layout": ("spatial", "3d_spatial", "numeracy"),
    "non_spatial": ("non_spatial",),
    "complex": ("complex",),
}


@dataclass(frozen=True)
class PaperRow:
    model: str  # "SEED-LLaMA", "DreamLLM", "Emu3", or a text-to-image model of Table 1 ("SD-v1.5", ...)
    label: str  # the row's label as printed ("+ SILMM (Iter. 2)", "SEED-LLaMA + Ours", "%Improvment")
    iteration: int | None  # 0 base model, K "+ SILMM (Iter. K)"; None: Table 1's "+ Ours" (final) or not a model
    printed: str  # the row's numbers as printed, one per column, "-" where the paper reports none
    kind: str = "score"  # "score", or "improvement" (Table 1's %Improvment rows: percent of the base model)

    def cells(self) -> tuple[str, ...]:
        return tuple(self.printed.split())

    def values(self) -> tuple[float | None, ...]:
        return tuple(None if c == "-" else float(c) for c in self.cells())


@dataclass(frozen=True)
class PaperTable:
    source: str  # "SILMM (arXiv 2412.05818) Table 4"
    title: str
    columns: tuple[str, ...]  # the column headers as printed
    keys: tuple[tuple[str, str], ...]  # per column: (benchmark, category key or group key or "overall")
    rows: tuple[PaperRow, ...]
    unit: str = "percent"  # the numbers as printed are percentages (0-100)
    note: str = ""

    def __post_init__(self) -> None:  # a transcription slip (a number lost or doubled) fails at import
        if len(self.keys) != len(self.columns):
            raise ValueError(f"{self.source}: {len(self.columns)} columns but {len(self.keys)} keys")
        for row in self.rows:
            if len(row.cells()) != len(self.columns):
                raise ValueError(f"{self.source}, row {row.model!r} {row.label!r}: {len(row.cells())} numbers "
                                 f"for {len(self.columns)} columns")

    def benchmarks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b for b, _ in self.keys))

    def columns_of(self, benchmark: str) -> list[tuple[int, str, str]]:
        """(column index, printed header, key) of the columns that belong to ``benchmark``."""
        return [(i, col, key) for i, (col, (b, key)) in enumerate(zip(self.columns, self.keys, strict=True))
                if b == benchmark]

    def value(self, row: PaperRow, benchmark: str, key: str) -> float | None:
        for i, _, k in self.columns_of(benchmark):
            if k == key:
                return row.values()[i]
        raise KeyError(f"{self.source}: no column {key!r} for {benchmark}")


def _t2i(*keys: str) -> tuple[tuple[str, str], ...]:
    return tuple(("t2i_compbench", k) for k in keys)


def _dpg(*keys: str) -> tuple[tuple[str, str], ...]:
    return tuple(("dpg_bench", k) for k in keys)


def _tifa(*keys: str) -> tuple[tuple[str, str], ...]:
    return tuple(("tifa", k) for k in keys)


# ------------------------------------------------------------------------------------------ Table 1
TABLE_1 = PaperTable(
    source=f"{PAPER} Table 1",
    title="Performance comparison and improvement on T2I-CompBench++, DPG-Bench and TIFA (expert scorers "
          "recommended by each benchmark; Emu3 without prompt rewriting)",
    columns=("T2I-CompBench++ Attribute", "T2I-CompBench++ Layout", "T2I-CompBench++ Non-spatial",
             "T2I-CompBench++ Complex", "DPG-Bench Global", "DPG-Bench Entity", "DPG-Bench Attribute",
             "DPG-Bench Relation", "DPG-Bench Other", "DPG-Bench All", "TIFA All"),
    keys=(_t2i("attribute", "layout", "non_spatial", "complex")
          + _dpg("global", "entity", "attribute", "relation", "other", "overall") + _tifa("overall")),
    rows=(
        # Text-to-Image Generative Models
        PaperRow("SD-v1.5", "SD-v1.5", None, "38.65 - - - 74.63 74.23 75.39 73.49 67.81 63.18 78.40"),
        PaperRow("DALL-E 2", "DALL-E 2", None, "58.63 - - - - - - - - - -"),
        PaperRow("SD-v2", "SD-v2", None, "47.36 30.50 31.27 33.86 77.67 78.13 74.91 80.72 80.66 68.09 -"),
        PaperRow("SD-v2.1", "SD-v2.1", None, "50.57 - - - - - - - - - 82.00"),
        PaperRow("SDXL", "SDXL", None, "52.88 35.62 31.19 32.37 83.27 82.43 80.91 86.76 80.41 74.65 -"),
        PaperRow("PixArt-alpha", "PixArt-α", None, "60.31 36.74 31.97 34.33 74.97 79.32 78.60 82.57 76.96 71.11 -"),
        PaperRow("DALL-E 3", "DALL-E 3", None, "70.09 41.63 30.03 37.73 90.97 89.61 88.39 90.58 89.83 83.50 -"),
        # Large Multimodal Models
        PaperRow("SEED-LLaMA", "SEED-LLaMA", 0, "19.20 20.29 28.86 21.46 65.59 55.87 61.96 62.77 59.46 47.12 66.74"),
        PaperRow("SEED-LLaMA", "SEED-LLaMA + Ours", None,
                 "39.60 25.11 29.82 28.28 73.55 70.48 68.49 74.79 68.64 57.31 73.74"),
        PaperRow("SEED-LLaMA", "%Improvment", None,
                 "106.25 23.77 3.33 31.78 12.14 26.15 10.54 19.15 15.44 21.63 10.49", kind="improvement"),
        PaperRow("DreamLLM", "DreamLLM", 0, "22.94 23.74 28.76 23.01 74.47 65.86 63.80 74.24 46.00 53.93 69.91"),
        PaperRow("DreamLLM", "DreamLLM + Ours", None,
                 "39.94 27.63 29.00 26.43 76.29 75.91 69.20 84.41 60.00 64.22 75.38"),
        PaperRow("DreamLLM", "%Improvment", None,
                 "74.15 16.40 0.83 14.86 2.44 15.26 8.46 13.70 30.43 19.08 7.82", kind="improvement"),
        PaperRow("Emu3", "Emu3", 0, "44.79 32.30 30.15 31.32 84.19 80.81 82.75 87.23 50.80 74.19 81.86"),
        PaperRow("Emu3", "Emu3 + Ours", None, "59.71 36.03 30.51 33.93 84.19 81.57 84.52 89.01 64.80 77.45 85.11"),
        PaperRow("Emu3", "%Improvment", None,
                 "33.30 11.57 1.19 8.33 0.00 0.94 2.14 2.04 27.56 4.39 3.97", kind="improvement"),
    ),
    note="'+ Ours' is the final model; for SEED-LLaMA and DreamLLM it is iteration 3 of Tables 4-6 (the same "
         "numbers, up to rounding). The paper does not say how many iterations Emu3 ran. T2I-CompBench++ "
         "Attribute and Layout are means of their categories (T2I_COMPBENCH_GROUPS).",
)

# ------------------------------------------------------------------------------------------ Table 4
TABLE_4 = PaperTable(
    source=f"{PAPER} Table 4",
    title="T2I-CompBench++, 8 categories, over three iterations (expert scorers recommended by the benchmark)",
    columns=("Color", "Shape", "Texture", "Spatial", "3D Spatial", "Numeracy", "Non-spatial", "Complex"),
    keys=_t2i("color", "shape", "texture", "spatial", "3d_spatial", "numeracy", "non_spatial", "complex"),
    rows=(
        PaperRow("SEED-LLaMA", "SEED-LLaMA", 0, "17.87 19.43 20.31 5.72 21.72 33.43 28.86 21.46"),
        PaperRow("SEED-LLaMA", "+ SILMM (Iter. 1)", 1, "37.41 33.12 39.46 9.16 26.07 35.75 29.80 26.17"),
        PaperRow("SEED-LLaMA", "+ SILMM (Iter. 2)", 2, "39.81 37.62 38.00 8.60 25.42 38.59 29.62 27.14"),
        PaperRow("SEED-LLaMA", "+ SILMM (Iter. 3)", 3, "41.91 36.27 40.63 11.90 25.74 37.70 29.82 28.28"),
        PaperRow("DreamLLM", "DreamLLM", 0, "21.04 21.86 25.91 6.13 25.62 39.46 28.76 23.01"),
        PaperRow("DreamLLM", "+ SILMM (Iter. 1)", 1, "32.47 32.25 39.84 8.87 27.60 40.07 28.82 25.31"),
        PaperRow("DreamLLM", "+ SILMM (Iter. 2)", 2, "36.39 35.82 47.28 12.13 27.76 41.44 28.94 26.87"),
        PaperRow("DreamLLM", "+ SILMM (Iter. 3)", 3, "35.61 36.83 47.39 12.70 28.58 41.61 29.00 26.43"),
    ),
    note="The paper reports no overall T2I-CompBench++ number.",
)

# ------------------------------------------------------------------------------------------ Table 5
TABLE_5 = PaperTable(
    source=f"{PAPER} Table 5",
    title="DPG-Bench, 5 categories, over three iterations (expert scorers recommended by the benchmark)",
    columns=("Global", "Entity", "Attribute", "Relation", "Other", "All"),
    keys=_dpg("global", "entity", "attribute", "relation", "other", "overall"),
    rows=(
        PaperRow("SEED-LLaMA", "SEED-LLaMA", 0, "65.59 55.87 62.00 62.77 59.46 47.12"),
        PaperRow("SEED-LLaMA", "+ SILMM (Iter. 1)", 1, "69.73 70.33 69.40 73.27 68.65 57.07"),
        PaperRow("SEED-LLaMA", "+ SILMM (Iter. 2)", 2, "73.41 69.04 71.00 74.47 69.18 56.94"),
        PaperRow("SEED-LLaMA", "+ SILMM (Iter. 3)", 3, "73.55 70.48 68.50 74.79 68.64 57.31"),
        PaperRow("DreamLLM", "DreamLLM", 0, "74.47 65.86 63.80 74.24 46.00 53.93"),
        PaperRow("DreamLLM", "+ SILMM (Iter. 1)", 1, "74.47 73.31 67.00 80.39 52.80 60.95"),
        PaperRow("DreamLLM", "+ SILMM (Iter. 2)", 2, "75.38 76.61 69.20 84.41 62.40 64.47"),
        PaperRow("DreamLLM", "+ SILMM (Iter. 3)", 3, "76.29 75.91 69.20 84.41 60.00 64.22"),
    ),
    note="The paper prints this table's header as 'Color Shape Texture Spatial 3D Spatial All' (Table 4's, "
         "a slip: its caption says 'the 5 categories of the DPG-Bench'). The rows are DPG-Bench's Global, "
         "Entity, Attribute, Relation, Other and All: iteration 0 and 3 equal Table 1's DPG-Bench columns up "
         "to rounding (SEED-LLaMA Attribute 61.96 vs 62.00, 68.49 vs 68.50).",
)

# ------------------------------------------------------------------------------------------ Table 6
TABLE_6 = PaperTable(
    source=f"{PAPER} Table 6",
    title="TIFA, 12 element types, over three iterations (expert scorers recommended by the benchmark)",
    columns=("Animal", "Object", "Location", "Activity", "Color", "Spatial", "Attribute", "Food", "Counting",
             "Material", "Other", "Shape", "ALL"),
    keys=_tifa("animal/human", "object", "location", "activity", "color", "spatial", "attribute", "food",
               "counting", "material", "other", "shape", "overall"),
    rows=(
        PaperRow("SEED-LLaMA", "SEED-LLaMA", 0,
                 "69.35 63.14 72.55 65.73 60.59 66.75 71.9 60.37 61.66 68.42 52.74 43.48 66.74"),
        PaperRow("SEED-LLaMA", "+ SILMM (Iter. 1)", 1,
                 "76.52 71.67 75.27 74.5 74.7 72.36 74.52 66.85 65.82 75.16 60.7 52.17 73.82"),
        PaperRow("SEED-LLaMA", "+ SILMM (Iter. 2)", 2,
                 "76.75 72.65 76.41 73.87 78.03 71.35 75.46 67.18 65.92 81.82 64.18 56.52 74.47"),
        PaperRow("SEED-LLaMA", "+ SILMM (Iter. 3)", 3,
                 "76.98 72.1 74.89 73.38 77.91 71.13 73.08 70.36 63.29 78.95 64.18 62.32 73.74"),
        PaperRow("DreamLLM", "DreamLLM", 0,
                 "75.44 67.7 75.6 64.64 63.57 67.24 70.43 70.69 61.05 75.6 55.22 56.52 69.91"),
        PaperRow("DreamLLM", "+ SILMM (Iter. 1)", 1,
                 "78.81 71.67 79.35 72.26 63.74 71.48 72.70 73.55 61.97 75.60 61.19 63.77 73.37"),
        PaperRow("DreamLLM", "+ SILMM (Iter. 2)", 2,
                 "80.06 74.28 79.57 76.18 63.74 75.54 74.40 76.51 66.73 77.99 68.66 60.87 75.59"),
        PaperRow("DreamLLM", "+ SILMM (Iter. 3)", 3,
                 "80.29 73.85 79.35 75.34 63.80 74.53 74.05 77.06 65.72 77.51 67.66 65.22 75.38"),
    ),
    note="Animal is TIFA's element type 'animal/human'. Some numbers are printed with one decimal (71.9); "
         "they are kept as printed.",
)

TABLES: tuple[PaperTable, ...] = (TABLE_1, TABLE_4, TABLE_5, TABLE_6)

# Per benchmark, the paper tables the report sets beside our numbers: the per-iteration table first.
BENCHMARK_TABLES: dict[str, tuple[PaperTable, ...]] = {
    "t2i_compbench": (TABLE_4, TABLE_1),
    "dpg_bench": (TABLE_5, TABLE_1),
    "tifa": (TABLE_6, TABLE_1),
}

# A benchmark's group keys (Table 1's T2I-CompBench++ Attribute, Layout): our value is the mean of the group's
# categories, as the paper computes it.
GROUPS: dict[str, dict[str, tuple[str, ...]]] = {"t2i_compbench": T2I_COMPBENCH_GROUPS}


def tables_for(benchmark: str) -> tuple[PaperTable, ...]:
    """The paper tables that report ``benchmark`` (empty: the paper has no numbers for it, e.g. GenEval)."""
    return BENCHMARK_TABLES.get(benchmark, ())
