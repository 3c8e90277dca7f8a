"""Every config field is checked at load, through the real CLI (issue #14).

Each refused case runs `silmm run CONFIG ...` in-process (`silmm.cli.main`) against an existing run and
asserts exit status 2, an error naming the key and where its value came from (the config file, a
profile or the command-line override), and a run directory left byte-identical. Tables:

- TYPE_CASES, generated from the schema: every number, bool and enum given a value of the wrong type,
  every float NaN and infinite;
- RANGE_CASES, by hand: zero, negative, out of range and combinations that used to fail late, with
  a completeness test (every numeric and every path or Slurm string field has a row);
- INJECTION_CASES: hostile strings in every field that reaches an sbatch line, given in a profile file;
- the sbatch scripts submitit writes for the most unusual legal values: header lines all #SBATCH,
  nothing after it but submitit's own lines and the setup lines.

A refused config must never reach the driver: `run_driver`, `run_eval_driver` and `submit_detached` are
replaced by failures.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shlex
import socket
import types
import typing
from pathlib import Path

import pytest
import submitit
import yaml

from silmm import cli
from silmm import config as C
from silmm.driver import submit_detached as SUBMIT_DETACHED  # before the autouse fixture replaces it
from silmm.rundir import RunDir


# ------------------------------------------------------------------------------------------- set-up
@dataclasses.dataclass
class Setup:
    root: Path  # run.root
    cfg: Path  # the config file every case starts from
    ckpt: Path
    run: Path  # an existing run every case targets (refusals must leave it byte-identical)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    d = tmp_path_factory.mktemp("fields")
    ckpt = d / "ckpt"
    ckpt.mkdir()
    cfg = d / "cfg.yaml"
    cfg.write_text(f"run:\n  name: r\n  root: {d / 'runs'}\nmodel:\n  path: {ckpt}\n")
    run = RunDir.create_or_open(C.load(cfg))
    return Setup(d / "runs", cfg, ckpt, run.path)


@pytest.fixture(autouse=True)
def no_driver(monkeypatch):
    """An accepted config would start the driver: here that is a failure, never a run."""
    def accepted(*_a, **_k):
        raise AssertionError("the config was accepted and the driver would start")

    monkeypatch.setattr("silmm.driver.run_driver", accepted)
    monkeypatch.setattr("silmm.driver.run_eval_driver", accepted)
    monkeypatch.setattr("silmm.driver.submit_detached", accepted)


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def assert_refused(setup: Setup, capsys, argv: list[str], key: str, source: str, phrase: str = "") -> str:
    before = snapshot(setup.root)
    status = cli.main(["run", str(setup.cfg), *argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"key '{key}'" in err, err
    assert f"{source}: key '{key}'" in err, err
    assert phrase in err, err
    assert snapshot(setup.root) == before
    return err


def override_source(overrides: list[str], key: str, default: str) -> str:
    """Where the error should say the value came from: the override setting `key`, else the config file."""
    own = [o for o in overrides if o.split("=", 1)[0] == key] or \
        [o for o in overrides if o.split("=", 1)[0].startswith(key + ".")]
    return f"command-line override '{own[-1]}'" if own else default


# --------------------------------------------------------------------------- the schema, walked
def schema_fields(cls: type = C.SilmmConfig, prefix: str = "") -> dict[str, type]:
    """Dotted key -> type of every leaf field (Optional unwrapped), nested dataclasses walked."""
    out: dict[str, type] = {}
    hints = typing.get_type_hints(cls, vars(C))
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
            t = next(a for a in typing.get_args(t) if a is not type(None))
        if dataclasses.is_dataclass(t):
            out.update(schema_fields(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


FIELDS = schema_fields()
FLOATS = sorted(k for k, t in FIELDS.items() if t is float)
INTS = sorted(k for k, t in FIELDS.items() if t is int)
BOOLS = sorted(k for k, t in FIELDS.items() if t is bool)
ENUMS = sorted(k for k, t in FIELDS.items() if isinstance(t, type) and issubclass(t, enum.Enum))

TYPE_CASES = (
    [pytest.param(k, v, "finite number", id=f"{k}={v}") for k in FLOATS for v in ("nan", "inf")]
    + [pytest.param(k, "abc", "", id=f"{k}=abc") for k in FLOATS]
    + [pytest.param(k, "1.5", "", id=f"{k}=1.5") for k in INTS]
    + [pytest.param("train.lr", "-inf", "finite number", id="train.lr=-inf"),
       pytest.param("train.batch_size", "abc", "", id="train.batch_size=abc"),
       pytest.param("train.batch_size", "true", "", id="train.batch_size=true")]
    + [pytest.param(k, "maybe", "", id=f"{k}=maybe") for k in BOOLS]
    + [pytest.param(k, "nope", "", id=f"{k}=nope") for k in ENUMS]
    # containers and their values
    + [pytest.param("prompts.categories.color", "nan", "finite number", id="prompts.categories.color=nan"),
       pytest.param("prompts.categories", "abc", "", id="prompts.categories=abc"),
       pytest.param("pairs.rejected_ranks", "abc", "", id="pairs.rejected_ranks=abc"),
       pytest.param("executor.default.setup", "5", "", id="executor.default.setup=5"),
       pytest.param("executor.default.additional_parameters", "abc", "", id="additional_parameters=abc"),
       pytest.param("executor.stages.train", "5", "", id="executor.stages.train=5"),
       pytest.param("executor.stages.train.mem_gb", "nan", "finite number", id="stages.train.mem_gb=nan"),
       pytest.param("executor.stages.train.time_min", "abc", "", id="stages.train.time_min=abc"),
       pytest.param("executor.stages.train.gpus", "4", "not in", id="stages.train.gpus (unknown key)")]
)


@pytest.mark.parametrize(("key", "value", "phrase"), TYPE_CASES)
def test_wrong_type_and_non_finite_values_are_refused(setup, capsys, key, value, phrase):
    item = f"{key}={value}"
    assert_refused(setup, capsys, [item], key, f"command-line override '{item}'", phrase)


# ----------------------------------------------------------------------- ranges and combinations
def case(key: str, value: str | list[str], phrase: str = "", id: str | None = None):
    """One refused config: `key=value`, or a list of overrides whose error is about `key`."""
    overrides = [f"{key}={value}"] if isinstance(value, str) else value
    return pytest.param(key, overrides, phrase, id=id or " ".join(overrides))


POS = "must be > 0"
RANGE_CASES = [
    # run
    case("run.iterations", "0", POS), case("run.seed", "-1", "[0, 2^63)"),
    # model (paths: a tmp dir elsewhere)
    case("model.path", "/does/not/exist", "does not exist"),
    # prompts
    case("prompts.count", "0", POS), case("prompts.max_tokens", "0", POS),
    case("prompts.vocabulary_temperature", "0", POS), case("prompts.batch_size", "0", POS),
    case("prompts.categories", ["prompts.categories.color=-1"], "none negative"),
    case("prompts.categories", ["prompts.categories.colour=1"], "unknown categories"),
    case("prompts.files", ["prompts.source=files", "prompts.files=/does/not/exist"], "does not exist"),
    case("prompts.file_categories", ["prompts.file_categories.a=color"], "prompts.source=files only"),
    case("prompts.icl_examples", "/does/not/exist.yaml", "is not a file"),
    # sampling
    case("sampling.samples_per_prompt", "1", "at least 2"), case("sampling.batch_size", "-1", POS),
    case("sampling.temperature", "0", POS), case("sampling.top_p", "0", "(0, 1]"),
    case("sampling.top_p", "1.01", "(0, 1]"), case("sampling.top_k", "-1", ">= 0"),
    case("sampling.guidance_scale", "0.5", ">= 1"), case("sampling.guidance_scale", "1.0", "Janus"),
    case("sampling.image_height", "-1", "both > 0"), case("sampling.image_width", "4", "both > 0"),
    case("sampling.image_height", ["sampling.image_height=4", "sampling.image_width=4"], "Emu3 image grid"),
    case("sampling.dropdiv_rate", "1.0", "[0, 1)"), case("sampling.dropdiv_rate", "-0.1", "[0, 1)"),
    case("sampling.dropdiv_layers", "0", POS), case("sampling.query_noise_std", "-0.1", ">= 0"),
    case("sampling.decoder_steps", "0", POS), case("sampling.decoder_guidance_scale", "0.5", ">= 1"),
    # questions, feedback
    case("questions.max_questions", "0", POS), case("questions.max_new_tokens", "0", POS),
    case("questions.temperature", "-0.1", ">= 0"), case("questions.batch_size", "0", POS),
    case("questions.icl_examples", "/does/not/exist.yaml", "is not a file"),
    case("feedback.batch_size", "0", POS),
    case("feedback.judge_path", "/does/not/exist", "does not exist"),
    case("feedback.scorer", ["feedback.method=scorer"], "is required with feedback.method=scorer"),
    case("feedback.scorer", ["feedback.method=scorer", "feedback.scorer=nope"], "unknown scorer 'nope'"),
    case("feedback.scorer", ["feedback.method=scorer", "feedback.scorer=oracle", "prompts.source=generate"],
         "only scores toy prompts, and prompts.source is 'generate'"),
    case("feedback.scorer", "oracle", "would be ignored: it is read only with feedback.method=scorer"),
    # pairs
    case("pairs.top_k", "0", POS), case("pairs.top_k", "11", "more than sampling.samples_per_prompt (10)"),
    case("pairs.bottom_k", "0", POS), case("pairs.bottom_k", "11", "more than sampling.samples_per_prompt"),
    case("pairs.rejected_ranks", "[0,3]", "1 <= first"), case("pairs.rejected_ranks", "[3,11]", "<= sampling"),
    case("pairs.min_score_gap", "-0.1", ">= 0"),
    # train
    case("train.loss", "kcdpo", "does not fit"), case("train.beta", "0", POS), case("train.gamma", "0", POS),
    case("train.label_smoothing", "0.1", "only used by"),
    case("train.label_smoothing", ["train.loss=cdpo", "train.label_smoothing=0.5"], "(0, 0.5)"),
    case("train.lora.r", "0", POS), case("train.lora.alpha", "0", POS),
    case("train.lora.dropout", "1.0", "[0, 1)"), case("train.lora.dropout", "-0.1", "[0, 1)"),
    case("train.lora.target_regex", "(unclosed", "not a regular expression"),
    case("train.lr", "0", POS), case("train.lr", "-1e-5", POS), case("train.max_steps", "0", POS),
    case("train.warmup_steps", "-1", "[0, train.max_steps"),
    case("train.warmup_steps", ["train.max_steps=10", "train.warmup_steps=11"], "[0, train.max_steps=10]"),
    case("train.batch_size", "0", POS), case("train.grad_accum", "0", POS),
    case("train.grad_clip", "-1", ">= 0"), case("train.weight_decay", "-0.01", ">= 0"),
    case("train.zero_stage", "4", "0, 1, 2 or 3"), case("train.log_every", "0", POS),
    case("train.checkpoint_every", "0", POS), case("train.heldout_fraction", "0.5", "[0, 0.5)"),
    case("train.heldout_max_pairs", "-1", ">= 0"), case("train.eval_every", "0", POS),
    case("train.prefetch", "-1", "0 = off"),
    # train batch vs accumulation vs world size (jobs/train.py used to find out after the model loaded)
    case("train.batch_size", ["train.batch_size=6"], "not divisible by train.grad_accum (4) x the train job's "
         "world size (1", id="batch 6, accum 4"),
    case("train.batch_size", ["executor.default.tasks_per_node=3"], "world size (3: tasks_per_node=3",
         id="local: 3 tasks"),
    case("train.batch_size", ["executor.kind=slurm", "executor.stages.train.nodes=3"],
         "world size (3: nodes=3 x tasks_per_node=1", id="slurm: 3 nodes"),
    case("train.batch_size", ["executor.kind=slurm", "executor.stages.train.nodes=2",
                              "executor.stages.train.tasks_per_node=2", "train.batch_size=24", "train.grad_accum=4"],
         "= 16", id="slurm: 2 x 2 ranks, accum 4, batch 24"),
    # executor
    case("executor.max_array_size", "0", POS), case("executor.retries", "-1", ">= 0"),
    case("executor.signal_delay_s", "-1", ">= 0"), case("executor.poll_interval_s", "0", POS),
    case("executor.local_parallelism", "0", POS),
    case("executor.signal_delay_s", "3600", "shorter than the time limit of every stage (60 min"),
    case("executor.signal_delay_s", ["executor.stages.train.time_min=1"], "stage train (1 min = 60 s, "
         "executor.stages.train.time_min)", id="signal delay vs train time limit"),
    case("executor.signal_delay_s", ["executor.default.time_min=100000", "executor.signal_delay_s=86400"],
         "stage driver (1440 min", id="signal delay vs the driver's one-day resubmission"),
    case("executor.default.gpus_per_node", "-1", ">= 0"), case("executor.default.cpus_per_task", "0", POS),
    case("executor.default.mem_gb", "0", POS), case("executor.default.mem_gb", "0.0001", "1 MiB"),
    case("executor.default.time_min", "0", "(0, 525600]"), case("executor.default.time_min", "525601", "365 days"),
    case("executor.default.nodes", "0", POS), case("executor.default.tasks_per_node", "0", POS),
    case("executor.default.array_parallelism", "0", POS),
    case("executor.stages.train.cpus_per_task", "0", POS), case("executor.stages.driver.time_min", "0", "(0, "),
    case("executor.stages.scores.mem_gb", "-1", POS),
    case("executor.stages.sampling", "{}", "unknown stage"),
    case("executor.default.additional_parameters.time", "10", "set by silmm (time_min)"),
    case("executor.default.additional_parameters.output", "x", "submitit's log path"),
    case("executor.stages.train.additional_parameters.ntasks_per_node", "2", "tasks_per_node"),
    case("executor.default.additional_parameters.exclusive", "false", "true for a flag"),
    case("executor.default.additional_parameters.gres", "null", "--gres=None"),
    case("executor.default.additional_parameters.gres", "[a,b]", "reaches sbatch"),
    # sharding, store, eval
    case("sharding.prompts_per_shard", "0", POS), case("sharding.flush_every", "0", POS),
    case("store.compression_level", "10", "0-9"),
    case("store.gc_after_iteration", "[progress,everything]", "unknown categories"),
    case("executor.default.shards_per_task", "0", POS),
    case("eval.prompts_per_shard", "0", POS), case("eval.batch_size", "0", POS),
    case("eval.benchmarks.toy.max_prompts", "0", POS), case("eval.benchmarks.toy.images_per_prompt", "0", POS),
    case("eval.benchmarks.nope", "{}", "unknown benchmark"),
    # toy (checked whether or not toy.enabled: a field means one thing)
    case("toy.held_out_fraction", "0", "(0, 1)"), case("toy.held_out_fraction", "1", "(0, 1)"),
    case("toy.eval_prompts", "0", POS), case("toy.eval_samples", "0", POS), case("toy.grid_prompts", "0", POS),
    case("toy.pretrain.steps", "0", POS), case("toy.pretrain.batch_size", "0", POS),
    case("toy.pretrain.lr", "0", POS), case("toy.pretrain.warmup_steps", "-1", ">= 0"),
    case("toy.pretrain.hidden", "0", POS), case("toy.pretrain.layers", "0", POS),
    case("toy.pretrain.heads", "0", POS), case("toy.pretrain.heads", "3", "divide toy.pretrain.hidden (128)"),
    case("toy.pretrain.caption_noise", "1.0", "[0, 1)"), case("toy.pretrain.distractor_p", "1.0", "[0, 1)"),
    case("toy.pretrain.distractor_p", "-0.1", "[0, 1)"), case("toy.pretrain.checkpoint_every", "0", POS),
    case("toy.pretrain.seed", "-1", "[0, 2^63)"), case("toy.pretrain.threads", "-1", ">= 0"),
    *(case(f"toy.continuous.{k}", "0", POS) for k in ("num_queries", "cross_attention_dim", "unet_channels",
                                                      "vision_hidden", "vae_lr", "generate_weight")),
    case("toy.continuous.unet_channels", "24", "multiple of 16"), case("toy.continuous.vision_hidden", "30", "of 4"),
    case("toy.continuous.vision_layers", "-1", ">= 0"), case("toy.continuous.vae_steps", "-1", ">= 0"),
    case("toy.continuous.uncond_p", "1.0", "[0, 1)"), case("toy.continuous.answer_pixel_noise", "-1", ">= 0"),
    case("toy.continuous.caption_noise", "1.0", "[0, 1)"), case("toy.continuous.caption_noise", "-0.1", "[0, 1)"),
    case("model.backend", ["toy.enabled=true", "sampling.guidance_scale=2"], "early-fusion"),
    case("feedback.judge", ["feedback.judge=base", "feedback.judge_path=."], "would be ignored"),
]


@pytest.mark.parametrize(("key", "overrides", "phrase"), RANGE_CASES)
def test_out_of_range_values_and_bad_combinations_are_refused(setup, capsys, key, overrides, phrase):
    assert_refused(setup, capsys, overrides, key, override_source(overrides, key, str(setup.cfg)), phrase)


# Fields with no row above, and why.
NO_RANGE = {
    "prompts.files_sha256": "filled from the prompt files at load, not by hand",
    "executor.default.setup": "shell lines by design (README, 'Running on a cluster')",
    **{f"eval.experts.{k}": "checked when a configured benchmark's scorer needs it (tests/test_eval_*.py)"
       for k in ("vqa", "clip", "clip_large", "detector", "depth", "segmentation", "sbert")},
}
SLURM_STRINGS = ["run.name", "executor.default.partition", "executor.default.account", "executor.default.qos",
                 "executor.default.constraint", "executor.default.additional_parameters"]


def test_every_numeric_and_string_field_has_a_row():
    """A new field without a check (or a reason why any value is fine) fails here."""
    rows = {p.values[0] for p in RANGE_CASES} | set(SLURM_STRINGS) | {"run.root"}
    rows |= {p.values[0].rsplit(".", 1)[0] for p in RANGE_CASES}  # stage override rows cover their group
    want = [k for k, t in FIELDS.items() if t in (int, float, str, list) or typing.get_origin(t) in (dict, list)]
    missing = [k for k in want if k not in rows and k not in NO_RANGE
               and not k.startswith("executor.stages") and not k.startswith("eval.benchmarks")]
    assert not missing, f"no refused case for {missing}: add a row to RANGE_CASES (or a reason to NO_RANGE)"


# ---------------------------------------------------------------------------------- injection
HOSTILE = ["gpu\nrm -rf ~", "a;b", "$(x)", "`x`"]
CONSTRAINT_ONLY = ["a b", "a'b", 'a"b', "a<b", "a>b", "a\\b", "a\tb", "a$b"]


def nested(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


INJECTION_CASES = (
    [pytest.param(k, v, id=f"{k}={v!r}") for k in ("run.name", "executor.default.partition",
                                                  "executor.default.account", "executor.default.qos",
                                                  "executor.default.constraint", "executor.stages.train.partition",
                                                  "executor.stages.driver.account", "executor.stages.samples.qos",
                                                  "executor.stages.train.constraint",
                                                  "executor.default.additional_parameters.gres",
                                                  "executor.stages.train.additional_parameters.mail-user")
     for v in HOSTILE]
    + [pytest.param("executor.default.constraint", v, id=f"constraint={v!r}") for v in CONSTRAINT_ONLY]
    + [pytest.param("run.name", v, id=f"run.name={v!r}") for v in ("..", ".", ".hidden", "a/b", "a b", "a..b",
                                                                  "x" * 129, "é")]
    + [pytest.param("run.root", v, id=f"run.root={v!r}") for v in ("runs\nrm -rf ~", "runs/%j", "")]
)


@pytest.mark.parametrize(("key", "value"), INJECTION_CASES)
def test_hostile_strings_in_slurm_fields_are_refused(setup, capsys, tmp_path, key, value):
    profile = tmp_path / "hostile.yaml"
    profile.write_text(yaml.safe_dump(nested(key, value)))
    err = assert_refused(setup, capsys, ["--profile", str(profile)], key, str(profile))
    assert "Traceback" not in err


@pytest.mark.parametrize("option", ["gres\nrm -rf ~", "a;b", "$(x)", "`x`", "-x", "a b"])
def test_hostile_additional_parameter_names_are_refused(setup, capsys, tmp_path, option):
    profile = tmp_path / "hostile.yaml"
    profile.write_text(yaml.safe_dump({"executor": {"default": {"additional_parameters": {option: "1"}}}}))
    assert_refused(setup, capsys, ["--profile", str(profile)], f"executor.default.additional_parameters.{option}",
                   str(profile), "not an sbatch option name")


# ------------------------------------------------------------------------------------ paths
def test_run_root_must_be_a_writable_directory_or_creatable(setup, capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for root, phrase in ((a_file, "is not a directory"), (a_file / "below", f"{a_file} is not a directory")):
        item = f"run.root={root}"
        assert_refused(setup, capsys, [item], "run.root", f"command-line override '{item}'", phrase)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "taken").write_text("x")
    item = f"run.root={tmp_path / 'runs'}"
    assert_refused(setup, capsys, [item, "run.name=taken"], "run.root", f"command-line override '{item}'",
                   "exists and is not a directory")
    # a root that does not exist yet is fine, and validation creates nothing
    cfg = C.load(setup.cfg, [f"run.root={tmp_path / 'new' / 'deeper'}"])
    assert cfg.run.root == str(tmp_path / "new" / "deeper") and not (tmp_path / "new").exists()


def test_refused_new_run_leaves_no_directory(setup, capsys, tmp_path):
    for bad in ("train.lr=nan", "executor.default.partition=a;b", "train.batch_size=5"):
        item = f"run.root={tmp_path / 'fresh'}"
        assert cli.main(["run", str(setup.cfg), item, bad]) == 2
        capsys.readouterr()
        assert not (tmp_path / "fresh").exists()


# ------------------------------------------------------------------- legal but unusual values
UNUSUAL_SETUP = ["module load cuda/12.4", 'source "$HOME/envs/silmm/bin/activate"', "export A='x y' B=$((1+2))"]
UNUSUAL = {
    "run": {"name": "A.b_c-1"},
    "executor": {
        "kind": "slurm", "signal_delay_s": 0, "max_array_size": 1,
        "default": {
            "partition": "gpu,gpu-long", "account": "proj_1.x", "qos": "high-prio",
            "constraint": "(a100|h100)&ib*2&!slow", "gpus_per_node": 0, "mem_gb": 0.001, "time_min": 525600,
            "additional_parameters": {"mail-type": "BEGIN,END", "mail_user": "me@uni.edu", "gres": "gpu:a100:4",
                                      "exclude": "node[01-03]", "nice": 10, "export": "ALL,HF_HOME=/scratch/hf"},
            "setup": UNUSUAL_SETUP,
        },
        "stages": {"train": {"constraint": "[rack1*2&rack2*4]", "nodes": 2, "tasks_per_node": 2,
                             "additional_parameters": {"exclusive": True}},
                   "driver": {"time_min": 5000}},
    },
    "train": {"batch_size": 16},
}


def check_script(text: str, setup_lines: list[str]) -> list[str]:
    """submitit's layout: shebang, '# Parameters' and #SBATCH lines only, then the setup lines, then its
    own command block. Returns the #SBATCH lines."""
    lines = text.split("\n")
    assert lines[:3] == ["#!/bin/bash", "", "# Parameters"], text
    end = lines.index("", 3)
    header = lines[3:end]
    for line in header:
        assert line.startswith("#SBATCH --"), line
        assert len(shlex.split(line[len("#SBATCH "):])) == 1, line  # one shell word: no unquoted space
    rest = lines[end:]
    assert rest[:2] == ["", "# setup"] and rest[2: 2 + len(setup_lines)] == setup_lines, text
    command = rest[2 + len(setup_lines):]
    assert command[:3] == ["", "# command", "export SUBMITIT_EXECUTOR=slurm"], text
    assert command[3].startswith("srun --unbuffered --output ") and "-m submitit.core._submit " in command[3]
    assert command[4:] == [""], text
    return header


@pytest.fixture
def unusual_run(tmp_path, monkeypatch, setup):
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun needed
    profile = tmp_path / "unusual.yaml"
    profile.write_text(yaml.safe_dump(UNUSUAL))
    cfg = C.load(setup.cfg, [f"run.root={tmp_path / 'my runs'}"], [profile])  # legal: it passes validation
    return RunDir.create_or_open(cfg), profile


def test_sbatch_scripts_of_the_most_unusual_legal_values_hold_no_injected_line(unusual_run):
    from silmm.executors import make_executor

    run, _ = unusual_run
    for stage in ("prompts", "samples", "train"):
        ex = make_executor(run, 1, stage)
        for text in (ex._make_submission_file_text(ex._submitit_command_str, "uid"),  # one task
                     submitit.slurm.slurm._make_sbatch_string(command=ex._submitit_command_str, folder=ex.folder,
                                                              map_count=3, **ex.parameters)):  # an array
            header = check_script(text, UNUSUAL_SETUP)
            assert f"#SBATCH --job-name=silmm-A.b_c-1-{stage}-1" in header
            assert "#SBATCH --partition=gpu,gpu-long" in header and "#SBATCH --mail-user=me@uni.edu" in header
            assert ("#SBATCH --exclusive" in header) == (stage == "train")
            assert "#SBATCH --mem=1M" in header


def test_the_detached_drivers_sbatch_script_holds_no_injected_line(unusual_run, monkeypatch, setup):
    run, profile = unusual_run
    scripts = []

    class Captured(Exception):
        pass

    def capture(self, command):
        scripts.append(self._make_submission_file_text(command, "uid"))
        raise Captured

    monkeypatch.setattr(submitit.SlurmExecutor, "_submit_command", capture)
    with pytest.raises(Captured):
        SUBMIT_DETACHED(run, str(setup.cfg), [f"run.root={run.path.parent}"], [str(profile)])
    header = check_script(scripts[0], UNUSUAL_SETUP)
    assert "#SBATCH --job-name=silmm-driver-A.b_c-1" in header


def test_shipped_configs_with_every_profile_pass():
    root = Path(__file__).resolve().parents[1]
    from omegaconf import OmegaConf

    for path in sorted((root / "configs").glob("*.yaml")):
        for profile in [None, *sorted((root / "slurm" / "profiles").glob("*.yaml"))]:
            merged = OmegaConf.merge(OmegaConf.structured(C.SilmmConfig), OmegaConf.load(path),
                                     *([OmegaConf.load(profile)] if profile else []))
            C.validate(C.resolve(OmegaConf.to_object(merged)), f"{path} + {profile}", check_paths=False)


# ------------------------------------------------------------------------------- the run lock
@pytest.mark.parametrize("holder", ["this host", "another host"])
@pytest.mark.parametrize("detach", [False, True])
def test_a_driver_refused_by_the_lock_changes_nothing(tmp_path, capsys, monkeypatch, holder, detach):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run:\n  name: r\n  root: {tmp_path / 'runs'}\nmodel:\n  path: {ckpt}\n")
    run = RunDir.create_or_open(C.load(cfg))
    lock = {"pid": os.getpid(), "host": socket.gethostname() if holder == "this host" else "elsewhere", "since": "x"}
    (run.path / "driver.lock").write_text(json.dumps(lock))
    before = snapshot(run.path)
    argv = ["run", str(cfg), "executor.default.mem_gb=9", *(["--detach"] if detach else [])]  # a mutable key
    assert cli.main(argv) == 1
    assert "another driver is running on this run" in capsys.readouterr().err
    assert snapshot(run.path) == before  # config.yaml, state.json and the lock itself
    # the same command without the lock does rewrite the key: the refusal above was the lock's
    (run.path / "driver.lock").unlink()
    monkeypatch.setattr("silmm.driver.run_driver", lambda *a, **k: None)
    monkeypatch.setattr("silmm.driver.submit_detached", lambda *a: "123")
    assert cli.main(argv) == 0
    assert RunDir.open(run.path).config.executor.default.mem_gb == 9
    assert not (run.path / "driver.lock").exists()


def test_eval_refused_by_the_lock_changes_nothing(tmp_path, capsys, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the config's relative paths (in-context examples)
    run = RunDir.create_or_open(C.load(repo / "configs" / "toy_smoke.yaml",
                                       [f"run.root={tmp_path}", f"model.path={tmp_path / 'lmm'}"]))
    (run.path / "driver.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "x"}))
    before = snapshot(run.path)
    assert cli.main(["eval", str(run.path), "eval.batch_size=4", "--iterations", "0"]) == 1  # an eval.* change
    assert "another driver is running on this run" in capsys.readouterr().err
    assert snapshot(run.path) == before


def test_a_result_changing_key_is_refused_before_the_lock(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run:\n  name: r\n  root: {tmp_path / 'runs'}\nmodel:\n  path: {ckpt}\n")
    run = RunDir.create_or_open(C.load(cfg))
    before = snapshot(run.path)
    assert cli.main(["run", str(cfg), "train.lr=1e-3"]) == 2
    assert "these keys would change its results" in capsys.readouterr().err
    assert snapshot(run.path) == before


def test_removed_keys_are_refused_and_old_frozen_configs_still_open(setup, capsys):
    item = "logging.level=DEBUG"
    assert_refused(setup, capsys, [item], "logging.level", f"command-line override '{item}'", "was removed")
    frozen = setup.run / "config.yaml"
    old = frozen.read_text().replace("logging:\n", "logging:\n  level: INFO\n")
    assert C.from_yaml_text(old, "old") == RunDir.open(setup.run).config


def test_loading_never_changes_the_shared_schema(setup):
    changed = C.load(setup.cfg, ["train.lr=0.5", "executor.stages.train.mem_gb=3"])
    again = C.load(setup.cfg)
    assert (changed.train.lr, again.train.lr, again.executor.stages) == (0.5, 5e-5, {})
