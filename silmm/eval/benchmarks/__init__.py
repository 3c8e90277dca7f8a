"""Benchmark registry: a config name -> the module and class that implement it.

The only place that knows every benchmark; generic code asks ``get_benchmark(name)``. The built-in ones
live in this package; plug-ins add theirs by name (silmm/plugins.py; the toy world's held-out prompts, ``toy``).
"""

from __future__ import annotations

from silmm import plugins
from silmm.eval.records import Benchmark, BenchmarkError

BENCHMARKS: dict[str, str] = {
    "t2i_compbench": "silmm.eval.benchmarks.t2i_compbench:T2ICompBench",
    "dpg_bench": "silmm.eval.benchmarks.dpg_bench:DPGBench",
    "tifa": "silmm.eval.benchmarks.tifa:TIFA",
    "geneval": "silmm.eval.benchmarks.geneval:GenEval",
    **plugins.entries("benchmarks"),
}


def get_benchmark(name: str) -> Benchmark:
    """A fresh instance of the benchmark registered as ``name``."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return plugins.resolve(BENCHMARKS[name])()
