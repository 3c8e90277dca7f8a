"""Issue #20, the toy stays outside the core: the dependency runs one way.

- no generic module under silmm/ or jobs/ imports silmm.toy or names it in a string ("module:attr"
  references, importlib), except the few listed in ALLOWED, each with its reason;
- the toy reaches the generic code through plug-in entries (silmm/plugins.py) by the names its configs use;
- behaviour is what it was before the move: the tiny fusion checkpoint's bytes (the old builder, written out
  here), and the ConfigError for a cached toy LMM from other settings.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from silmm import config as C
from silmm import plugins

ROOT = Path(__file__).resolve().parents[1]
TOY = "silmm.toy"
# generic files that may name the toy, and why; anything else that does fails test_generic_modules_never_name_the_toy
ALLOWED = {
    # the composition root: the one line naming the plug-ins bundled with silmm
    "silmm/plugins.py",
    # the toy's own stages: the stage runner finds a stage's job as `jobs.<stage>` (silmm/tasks.py, and
    # `python -m jobs.<stage>` in slurm/sbatch), so they live beside the generic stages; the driver runs them
    # only with toy.enabled, and no generic module imports them by name
    "jobs/pretrain.py",
    "jobs/evaluate.py",
}


def couplings(source: str, module: str) -> list[str]:
    """Where ``source`` (the module named ``module``) imports the toy or names it in a string."""
    found = []
    package = module.rsplit(".", 1)[0]  # a package's own __init__ included: "a.b.__init__" -> "a.b"
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the module's package
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and TOY in node.value:
            found.append(f"line {node.lineno}: string {node.value[:60]!r}")
        for name in names:
            if name == TOY or name.startswith(TOY + "."):
                found.append(f"line {node.lineno}: imports {name}")
                break
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def test_generic_modules_never_name_the_toy():
    coupled = {}
    for path in sorted([*ROOT.joinpath("silmm").rglob("*.py"), *ROOT.joinpath("jobs").rglob("*.py")]):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("silmm/toy/"):
            continue  # the toy itself
        found = couplings(path.read_text(), module_name(path))
        if found:
            coupled[rel] = found
    new = {k: v for k, v in coupled.items() if k not in ALLOWED}
    assert not new, f"generic modules coupled to the toy (plug it in through silmm/plugins.py instead): {new}"
    # an exception that no longer couples is dropped from ALLOWED, so the list stays the truth
    assert set(coupled) == ALLOWED, f"ALLOWED lists files that no longer name the toy: {ALLOWED - set(coupled)}"


@pytest.mark.parametrize(("source", "module", "flagged"), [
    ("import silmm.toy.world", "silmm.models", True),
    ("from silmm.toy import world", "silmm.models", True),
    ("from silmm import toy", "silmm.models", True),
    ("from ..toy.world import codec", "silmm.backends.fusion", True),
    ("from .toy import world", "silmm.models", True),
    ("from . import toy", "silmm.__init__", True),
    ("REF = 'silmm.toy.benchmark:ToyBenchmark'", "silmm.eval.benchmarks.__init__", True),
    ("importlib.import_module('silmm.toy.pretrain')", "silmm.models", True),
    # not couplings: a path in prose, the config's toy section, a module merely named like it
    ('"""see silmm/toy/world.py"""', "silmm.models", False),
    ("if cfg.toy.enabled:\n    pass", "silmm.driver", False),
    ("import silmm.toys", "silmm.models", False),
    ("from ..backends import fusion", "silmm.eval.stage", False),
])
def test_the_check_sees_every_form_of_coupling(source, module, flagged):
    assert bool(couplings(source, module)) is flagged, couplings(source, module)


# ------------------------------------------------------------------------------------------ plug-ins
def test_the_toy_plugs_in_by_the_names_its_configs_use(tmp_path):
    from silmm.eval.benchmarks import BENCHMARKS, get_benchmark
    from silmm.eval.scorers import SCORERS, scorer_class
    from silmm.toy.benchmark import ToyBenchmark
    from silmm.toy.oracle_scorer import OracleScorer
    from silmm.toy.plugin import build_tiny_fusion, cache_key, compose_fn

    assert BENCHMARKS["toy"] == "silmm.toy.benchmark:ToyBenchmark" and type(get_benchmark("toy")) is ToyBenchmark
    assert SCORERS["oracle"] == "silmm.toy.oracle_scorer:OracleScorer" and scorer_class("oracle") is OracleScorer
    assert plugins.get("tiny_builders", "fusion") is build_tiny_fusion
    assert plugins.get("prompt_sources", "toy") is compose_fn
    assert plugins.get("pretraining", "toy") is cache_key
    cfg = C.load(ROOT / "configs" / "toy.yaml", [f"run.root={tmp_path}"])  # validated: names known
    assert list(cfg.eval.benchmarks) == ["toy"] and cfg.eval.benchmarks["toy"].scorer == "oracle"
    with pytest.raises(plugins.PluginError, match="tiny_builders 'nope'; known: fusion"):
        plugins.get("tiny_builders", "nope")
    with pytest.raises(plugins.PluginError, match="unknown plug-in kind"):
        plugins.entries("benchmark")


def test_two_plugins_claiming_one_name_is_an_error(monkeypatch):
    fake = types.ModuleType("fake_plugin")
    fake.PLUGIN = {"benchmarks": {"toy": "fake_plugin:Other"}}
    monkeypatch.setitem(sys.modules, "fake_plugin", fake)
    monkeypatch.setattr(plugins, "PLUGINS", (*plugins.PLUGINS, "fake_plugin"))
    plugins.entries.cache_clear()
    try:
        with pytest.raises(plugins.PluginError, match="benchmarks 'toy' is already supplied"):
            plugins.entries("benchmarks")
    finally:
        plugins.entries.cache_clear()


# ---------------------------------------------------------------------------------- same behaviour
def _old_build_tiny_fusion(out_dir: Path, seed: int) -> Path:
    """silmm/backends/fusion.py's build_tiny_fusion before the move (commit e6a411a), its inputs taken
    from the toy world as it took them."""
    from silmm.backends.fusion import (
        FusionSpec,
        build_word_tokenizer,
        save_checkpoint,
        text_words,
        tiny_llama_config,
    )
    from silmm.questions import BUILTIN_EXAMPLES, question_request
    from silmm.toy import world

    words = text_words([question_request("a red circle", BUILTIN_EXAMPLES), "yes no answer:", *world.VOCAB_TEXT])
    codec = world.codec()
    tok = build_word_tokenizer(words, codec.num_codes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(tok, initializer_range=0.3))
    return save_checkpoint(out_dir, model, tok, codec, FusionSpec())


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_fusion_checkpoint_bytes_are_those_of_the_old_builder(tmp_path, seed):
    from silmm.models import build_tiny

    old = _old_build_tiny_fusion(tmp_path / "old", seed)
    new = build_tiny("fusion", tmp_path / "new", seed=seed)  # through the toy's tiny_builders entry
    files = sorted(str(p.relative_to(old)) for p in old.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(new)) for p in new.rglob("*") if p.is_file())
    assert {"model.safetensors", "tokenizer.json", "image_codec/codebook.safetensors"} <= set(files)
    for name in files:
        assert (old / name).read_bytes() == (new / name).read_bytes(), name


def test_cached_toy_model_from_other_settings_is_a_config_error_naming_what_differs(tmp_path):
    from silmm.models import check_pretrained, ensure_base_model
    from silmm.questions import load_examples
    from silmm.toy.pretrain import cache_key

    smoke = ROOT / "configs" / "toy_smoke.yaml"
    model = tmp_path / "lmm"
    cfg = C.load(smoke, [f"run.root={tmp_path}", f"model.path={model}"])
    with pytest.raises(FileNotFoundError, match="not pretrained yet"):
        ensure_base_model(cfg)
    check_pretrained(cfg)  # nothing cached yet: nothing to compare
    model.mkdir()
    # the record the toy's pretrain job writes (jobs/pretrain.py), computed here without the plug-in
    key = cache_key(cfg.toy, load_examples(cfg.questions.icl_examples))
    (model / "pretrain.json").write_text(json.dumps({"key": key, "losses": {}}))
    ensure_base_model(cfg)  # the same settings: reused
    other = C.load(smoke, [f"run.root={tmp_path}", f"model.path={model}", "toy.pretrain.steps=21",
                           "toy.held_out_fraction=0.3"])
    message = (f"{model / 'pretrain.json'}: the cached toy LMM at model.path was pretrained with other settings "
               f"(held_out_fraction, pretrain differ); delete {model} or choose another model.path")
    with pytest.raises(C.ConfigError) as err:
        check_pretrained(other)
    assert str(err.value) == message
    with pytest.raises(C.ConfigError, match="held_out_fraction, pretrain differ"):
        ensure_base_model(other)
    # without the toy there is no pretraining, so no record to compare
    check_pretrained(dataclasses.replace(other, toy=dataclasses.replace(other.toy, enabled=False)))
