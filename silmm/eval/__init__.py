"""Benchmark evaluation: benchmarks/ (reading, scoring rules, export layouts) and scorers/ (judges)."""

from silmm.eval.records import (
    Benchmark,
    BenchmarkError,
    BenchmarkPrompt,
    BenchmarkQuestion,
    ImageAnswers,
)

__all__ = ["Benchmark", "BenchmarkError", "BenchmarkPrompt", "BenchmarkQuestion", "ImageAnswers"]
