"""Plug-ins: pieces that generic code finds by name and never imports by hand.

A plug-in is a module with a ``PLUGIN`` table, ``{kind: {name: "module:attr"}}``, naming what it adds to
the generic registries. The kinds, and who asks for them:

    benchmarks      silmm/eval/benchmarks   an ``eval.benchmarks`` name -> a Benchmark class
    scorers         silmm/eval/scorers      an ``eval.benchmarks.<name>.scorer`` name -> a Scorer class
    tiny_builders   silmm/models.build_tiny a ``model.backend`` name -> ``build(out_dir, seed) -> Path``, a
                                            tiny random checkpoint (when the backend cannot make one alone)
    prompt_sources  jobs/prompts.py         a ``prompts.source`` name -> ``compose_fn(cfg)``, which returns
                                            ``(category, rng) -> prompt text``
    pretraining     silmm/models.py         a pretraining step's name -> ``cache_key(cfg) -> dict``, what the
                                            model it writes depends on (compared with its pretrain.json)

References are imported only when used, so a plug-in's table costs nothing to read. ``PLUGINS`` is the one
place that names the plug-ins bundled with silmm (today the toy world): a user's benchmark, scorer or model
plugs in the same way, by adding its module here.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

PLUGINS: tuple[str, ...] = ("silmm.toy.plugin",)
KINDS = ("benchmarks", "scorers", "tiny_builders", "prompt_sources", "pretraining")


class PluginError(LookupError):
    """A name no plug-in supplies, or a plug-in table that does not follow the rules above."""


@cache
def entries(kind: str) -> dict[str, str]:
    """Every plug-in's ``name -> "module:attr"`` of one kind; two plug-ins claiming one name is an error."""
    if kind not in KINDS:
        raise PluginError(f"unknown plug-in kind {kind!r}; known: {', '.join(KINDS)}")
    out: dict[str, str] = {}
    for module in PLUGINS:
        table = importlib.import_module(module).PLUGIN
        for name, ref in table.get(kind, {}).items():
            if name in out:
                raise PluginError(f"{module}: {kind} '{name}' is already supplied ({out[name]})")
            out[name] = ref
    return out


def resolve(ref: str) -> Any:
    """The object a ``"module:attr"`` reference names."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise PluginError(f"{ref!r}: expected 'module:attr'")
    return getattr(importlib.import_module(module), attr)


def get(kind: str, name: str) -> Any:
    """The object a plug-in supplies as ``name`` of ``kind``."""
    known = entries(kind)
    if name not in known:
        raise PluginError(f"no plug-in supplies {kind} '{name}'; known: {', '.join(sorted(known)) or 'none'} "
                          f"(plug-ins: silmm/plugins.py)")
    return resolve(known[name])
