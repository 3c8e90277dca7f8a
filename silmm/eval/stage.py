"""What the eval stage (jobs/eval.py, jobs/eval_results.py) and the driver share about one (iteration,
benchmark): which prompts, how they are sharded, their seeds, where things live, the eval hash, the model's
context check, and the shard rows.

    RUN/eval/<benchmark>/iter_KK/shard_NNNNN.h5   prompts with ids and questions, images, answers (stage "eval")
    RUN/eval/<benchmark>/iter_KK/results.json     Benchmark.aggregate's numbers (silmm/eval/results.py)
    RUN/eval/<benchmark>/iter_KK/export/          the benchmark's official layout (Benchmark.export)

Seeds. Image j of the prompt with benchmark id I is drawn with ``derive_seed(run seed, 0, stable_int(benchmark,
I), j, "eval")`` and decoded with purpose "eval-decode": they depend on neither the iteration nor the shard
layout, so every iteration is judged on the same noise. A benchmark may define ``image_seeds(run_seed, prompt, j)
-> (sample seed, decode seed)`` instead; the toy benchmark does, to draw exactly what the toy evaluation drew.
With ``sampling.decoder_noise: fixed`` every image decodes from the run's one noise (seeding.fixed_decode_seed),
the noise its training samples were decoded with.

The eval hash covers everything an eval shard's content depends on beyond the run's config hash: the
benchmark's prompts as read (ids, texts, categories, questions, metadata), the eval settings that change
images or answers, the scorer, and a content fingerprint of each model involved. A shard or results file
with another eval hash is not done, and is redone.

Optional benchmark hooks (duck-typed, so the Benchmark interface stays small): ``needs_path = False`` for a
benchmark that reads no files (the toy), ``configure(cfg)`` for one that depends on the run's config (the
toy's held-out prompts), ``image_seeds`` as above.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from silmm.config import BenchmarkConfig, DecoderNoise, OverlongPolicy
from silmm.eval.benchmarks import get_benchmark
from silmm.eval.records import Benchmark, BenchmarkError, BenchmarkPrompt, BenchmarkQuestion, ImageAnswers
from silmm.eval.results import eval_dir, results_path
from silmm.seeding import derive_seed, fixed_decode_seed

log = logging.getLogger(__name__)

EXPORT = "export"
FINGERPRINT_WHOLE = 64 << 20  # files up to this size are hashed whole
FINGERPRINT_WINDOWS, FINGERPRINT_WINDOW = 16, 1 << 20  # larger ones: 16 evenly spaced 1-MiB windows + size


class EvalError(RuntimeError):
    """The eval stage cannot go on (an overlong prompt, shards from other settings); says what to do."""


# ----------------------------------------------------------------------------------------------- seeds
def stable_int(benchmark: str, prompt_id: str) -> int:
    """A 63-bit integer naming a benchmark prompt, the same on every machine and in every run."""
    digest = hashlib.sha256(f"{benchmark}|{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_seeds(bench: Benchmark, run_seed: int, prompt: BenchmarkPrompt, j: int) -> tuple[int, int]:
    """(sampling seed, decoding seed) of image j of ``prompt``; independent of iteration and shard."""
    own = getattr(bench, "image_seeds", None)
    if own is not None:
        return own(run_seed, prompt, j)
    key = stable_int(prompt.benchmark, prompt.id)
    return derive_seed(run_seed, 0, key, j, "eval"), derive_seed(run_seed, 0, key, j, "eval-decode")


# ---------------------------------------------------------------------------------------- the benchmark
def open_benchmark(name: str, cfg) -> Benchmark:
    """The registered benchmark, configured for this run when it has a ``configure`` hook."""
    bench = get_benchmark(name)
    if hasattr(bench, "configure"):
        bench.configure(cfg)
    return bench


@functools.lru_cache(maxsize=16)
def _read(name: str, root: str, config_hash: str, cfg_json: str) -> tuple[tuple[BenchmarkPrompt, ...], tuple[str, ...]]:
    from silmm import config as C

    cfg = C.from_yaml_text(cfg_json, "run config")
    bench = open_benchmark(name, cfg)
    prompts = tuple(bench.read(Path(root)))
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BenchmarkError(f"{name}: benchmark id {dup!r} occurs more than once in {root}")
    return prompts, tuple(getattr(bench, "notes", ()) or ())


def select(prompts: Sequence[BenchmarkPrompt], max_prompts: int | None) -> list[int]:
    """Indices of the prompts to evaluate: all of them, or with ``max_prompts`` (a smoke test) that many taken
    round-robin across categories (in the order they first appear), each category in benchmark order."""
    if max_prompts is None or max_prompts >= len(prompts):
        return list(range(len(prompts)))
    by_cat: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_cat.setdefault(p.category, []).append(i)
    picked: list[int] = []
    queues = [list(v) for v in by_cat.values()]
    while len(picked) < max_prompts:
        for q in queues:
            if q and len(picked) < max_prompts:
                picked.append(q.pop(0))
    return sorted(picked)


def prompts_hash(prompts: Sequence[BenchmarkPrompt]) -> str:
    """sha256 of every field of every prompt as read (the benchmark files' content that evaluation uses)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps(asdict(p), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ fingerprint
@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FINGERPRINT_WHOLE:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for k in range(FINGERPRINT_WINDOWS):
                fh.seek((size - FINGERPRINT_WINDOW) * k // (FINGERPRINT_WINDOWS - 1))
                h.update(fh.read(FINGERPRINT_WINDOW))
    return h.hexdigest()


def model_fingerprint(path: str | Path) -> str:
    """A content fingerprint of a checkpoint directory: every file's relative name and sha256 (files over
    64 MiB: their size and 16 evenly spaced 1-MiB windows). Hidden files are left out. Computed once per file
    version in a process (cached by size and modification time)."""
    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"{path}: the model to evaluate does not exist")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        st = f.stat()
        h.update(f"{rel.as_posix()}|{_file_digest(str(f), st.st_size, st.st_mtime_ns)}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class EvalPlan:
    """One (iteration, benchmark) of a run: its prompts, shards, image count, seeds and paths."""

    run: Any  # RunDir
    iteration: int
    name: str
    bench: Benchmark
    settings: BenchmarkConfig
    prompts: tuple[BenchmarkPrompt, ...]  # the whole benchmark as read
    selected: list[int]  # indices into `prompts` that are evaluated, in benchmark order
    read_notes: tuple[str, ...] = ()

    @property
    def images_per_prompt(self) -> int:
        return self.settings.images_per_prompt or self.bench.default_images

    @property
    def prompts_per_shard(self) -> int:
        return self.run.config.eval.prompts_per_shard

    @property
    def shard_count(self) -> int:
        return max(1, math.ceil(len(self.selected) / self.prompts_per_shard))

    def shard_items(self, shard: int) -> list[tuple[int, BenchmarkPrompt]]:
        if not 0 <= shard < self.shard_count:
            raise EvalError(f"{self.name} iteration {self.iteration}: shard {shard} out of range (0..{self.shard_count - 1})")
        idx = self.selected[shard * self.prompts_per_shard:(shard + 1) * self.prompts_per_shard]
        return [(i, self.prompts[i]) for i in idx]

    def group_size(self) -> int:
        """Prompts processed (sampled, decoded, scored) together: as many as fill one batch of images. Groups
        are fixed within a shard and flushes fall between them, so a resumed task forms the same batches."""
        return max(1, self.run.config.eval.batch_size // self.images_per_prompt)

    def flush_every(self) -> int:
        g = self.group_size()
        return g * max(1, math.ceil(self.run.config.sharding.flush_every / g))

    def seeds(self, prompt: BenchmarkPrompt, j: int) -> tuple[int, int]:
        run_seed = self.run.config.run.seed
        seed, decode = image_seeds(self.bench, run_seed, prompt, j)
        if self.run.config.sampling.decoder_noise is DecoderNoise.fixed:  # training's one noise
            decode = fixed_decode_seed(run_seed)
        return seed, decode

    # paths
    @property
    def dir(self) -> Path:
        return eval_dir(self.run.path, self.name, self.iteration)

    def shard_path(self, shard: int) -> Path:
        return self.dir / f"shard_{shard:05d}.h5"

    @property
    def results_path(self) -> Path:
        return results_path(self.run.path, self.name, self.iteration)

    @property
    def export_dir(self) -> Path:
        return self.dir / EXPORT

    # models and the eval hash
    def model_dir(self) -> Path:
        from silmm.models import model_path

        return model_path(self.run, self.iteration + 1)  # the model iteration K ends with

    def scorer_class(self):
        from silmm.eval.scorers import scorer_class

        return scorer_class(self.settings.scorer)

    def settings_record(self) -> dict[str, Any]:
        """The eval settings that change what the stage writes (recorded in every shard and in the hash)."""
        s = self.settings
        return {"benchmark": self.name, "scorer": s.scorer, "images_per_prompt": self.images_per_prompt,
                "max_prompts": s.max_prompts, "overlong": s.overlong.value,
                "prompts_per_shard": self.prompts_per_shard, "batch_size": self.run.config.eval.batch_size,
                "flush_every": self.flush_every(),
                # continuous models are drawn without DropDiv since this key exists: older shards are redone
                **({} if self.run.config.discrete else {"continuous_draws": "generate"})}

    def images_hash(self) -> str:
        """What the images depend on: the eval hash without the scorer. A shard whose images hash matches
        is re-scored from its stored images instead of drawing them again (changing only the scorer costs
        no generation)."""
        settings = {k: v for k, v in self.settings_record().items() if k != "scorer"}
        record = {**settings, "prompts": prompts_hash(self.prompts),
                  "selected": hashlib.sha256(json.dumps(self.selected).encode()).hexdigest()[:16],
                  "config_hash": self.run.config_hash, "generator": model_fingerprint(self.model_dir())}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]

    def eval_hash(self) -> str:
        scorer = self.scorer_class()
        models = {"generator": model_fingerprint(self.model_dir())}
        for role, path in scorer.model_paths(self.run, self.iteration).items():
            models[role] = model_fingerprint(path)
        record = {**self.settings_record(), "scorer_identity": scorer.identity_of(self.run),
                  "prompts": prompts_hash(self.prompts), "selected": hashlib.sha256(
                      json.dumps(self.selected).encode()).hexdigest()[:16],
                  "config_hash": self.run.config_hash, "models": models}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def benchmark_settings(cfg, name: str) -> BenchmarkConfig:
    if name not in cfg.eval.benchmarks:
        raise EvalError(f"benchmark '{name}' is not configured: add eval.benchmarks.{name} (with its path) to the "
                        f"run's config, e.g. `silmm eval RUN eval.benchmarks.{name}.path=/data/{name}`")
    return cfg.eval.benchmarks[name]


def plan(run, iteration: int, name: str) -> EvalPlan:
    """The plan of one (iteration, benchmark) of ``run``; reading the benchmark is cached per process."""
    from silmm import config as C

    settings = benchmark_settings(run.config, name)
    if not settings.path and getattr(get_benchmark(name), "needs_path", True):
        raise EvalError(f"eval.benchmarks.{name}.path is not set: point it to a local copy of the benchmark's files")
    prompts, notes = _read(name, str(settings.path or ""), run.config_hash, C.to_yaml(run.config))
    if not prompts:
        raise BenchmarkError(f"{name}: no prompts in {settings.path}")
    bench = open_benchmark(name, run.config)
    return EvalPlan(run, iteration, name, bench, settings, prompts, select(prompts, settings.max_prompts), notes)


# ------------------------------------------------------------------------------------------- completion
def shard_is_current(plan_: EvalPlan, shard: int, eval_hash: str) -> bool:
    from silmm.store import ShardError, StoreOptions, read_shard

    path = plan_.shard_path(shard)
    if not path.is_file():
        return False
    try:
        s = read_shard(path, stage="eval", config_hash=plan_.run.config_hash, iteration=plan_.iteration,
                       options=StoreOptions.from_config(plan_.run.config.store), columns=())
    except ShardError:
        return False
    return s.meta.extra.get("eval_hash") == eval_hash and s.meta.shard_count == plan_.shard_count


def reusable_images(plan_: EvalPlan, shard: int, images_hash: str) -> dict[str, list[bytes]]:
    """prompt id -> its stored PNG images, from a finished shard of this (iteration, benchmark, shard) whose
    images came from the same model, prompts, seeds and settings (another scorer, say); {} otherwise."""
    from silmm.store import ShardError, StoreOptions, read_shard

    path = plan_.shard_path(shard)
    if not path.is_file():
        return {}
    try:
        data = read_shard(path, stage="eval", config_hash=plan_.run.config_hash, iteration=plan_.iteration,
                          options=StoreOptions.from_config(plan_.run.config.store))
    except ShardError:
        return {}
    if data.meta.extra.get("images_hash") != images_hash:
        return {}
    pngs = data["image_png"]
    return {sp.prompt.id: [bytes(pngs[r]) for r in sp.image_rows] for sp in read_prompts(data)}


def reset_stale_progress(progress_dir: Path, eval_hash: str) -> None:
    """Progress left by a task under other eval settings is dropped (its parts would mix two settings);
    then the current hash is recorded beside the parts."""
    marker = progress_dir / "eval_hash"
    if progress_dir.is_dir() and (not marker.is_file() or marker.read_text().strip() != eval_hash):
        log.warning("%s: progress from other eval settings, starting the shard afresh", progress_dir)
        shutil.rmtree(progress_dir)
    progress_dir.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        marker.write_text(eval_hash + "\n")


# --------------------------------------------------------------------------------------- context check
def _max_positions(backend) -> int | None:
    for attr in ("model", "base"):
        config = getattr(getattr(backend, attr, None), "config", None)
        for c in (config, getattr(config, "text_config", None), getattr(config, "language_config", None)):
            n = getattr(c, "max_position_embeddings", None)
            if isinstance(n, int):
                return n
    return None


def generation_positions(backend) -> Callable[[str], int] | None:
    """Positions the model's sequence needs to draw an image for a text: the backend's own generation input
    (chat template, special tokens) plus the image tokens (discrete) or dream queries (continuous)."""
    row = getattr(backend, "generation_row", None) or getattr(backend, "_generation_row", None)
    if row is not None and hasattr(backend, "num_image_tokens"):
        return lambda text: len(row(text)) + int(backend.num_image_tokens)
    head_cfg, head = getattr(backend, "head_cfg", None), getattr(backend, "head", None)
    if head_cfg is not None and head is not None:  # dream: prompt template + the dream queries
        return lambda text: (len(backend.tokenizer(head_cfg.prompt_template.format(prompt=text))["input_ids"])
                             + int(head.queries.shape[0]))
    tok = getattr(backend, "tokenizer", None)
    if tok is not None:
        return lambda text: len(tok(text)["input_ids"])
    return None


def fit_to_context(backend, prompts: Sequence[BenchmarkPrompt], policy: OverlongPolicy) -> list[str]:
    """The text the model gets for each prompt: the benchmark's text when it fits the model's real context
    (its maximum positions); an overlong one is an EvalError naming the benchmark id, or with
    ``overlong=truncate`` cut at a word boundary to the longest prefix that fits."""
    need, limit = generation_positions(backend), _max_positions(backend)
    if need is None or limit is None:
        log.warning("cannot tell this backend's context length; prompts are not checked against it")
        return [p.text for p in prompts]
    out = []
    for p in prompts:
        n = need(p.text)
        if n <= limit:
            out.append(p.text)
            continue
        if policy is not OverlongPolicy.truncate:
            raise EvalError(f"{p.benchmark} prompt {p.id} ({p.source}:{p.line}) needs {n} positions, the model has "
                            f"{limit}: it does not fit. Set eval.benchmarks.{p.benchmark}.overlong=truncate to cut "
                            "such prompts (recorded in the shards and results), or use a model with a longer context")
        words = p.text.split()
        lo, hi = 0, len(words)  # the longest prefix of words that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if need(" ".join(words[:mid])) <= limit:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise EvalError(f"{p.benchmark} prompt {p.id}: not even its first word fits the model's context ({limit})")
        log.warning("%s prompt %s: %d positions > %d, truncated to %d of %d words", p.benchmark, p.id, n, limit,
                    lo, len(words))
        out.append(" ".join(words[:lo]))
    return out


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Preemption signals (USR2, TERM) held back while a group's rows are added: the flush they trigger then
    lands between groups, and the resumed task forms the same batches as an uninterrupted one."""
    held = {signal.SIGUSR2, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


# ------------------------------------------------------------------------------------------ shard rows
def shard_record(index: int, prompt: BenchmarkPrompt, model_text: str, seeds: Sequence[tuple[int, int]],
                 pngs: Sequence[bytes], answers: Sequence[ImageAnswers]) -> dict[str, Any]:
    """One prompt's rows of an eval shard (see the `eval` schema in silmm/store.py)."""
    from silmm.store import ShardError

    if not len(seeds) == len(pngs) == len(answers):
        raise ShardError(f"{prompt.benchmark} {prompt.id}: {len(seeds)} seeds, {len(pngs)} images, "
                         f"{len(answers)} answers")
    for a in answers:
        if not len(a.questions) == len(a.p_yes) == len(a.p_no) == len(a.answers) == len(a.correct):
            raise ShardError(f"{prompt.benchmark} {prompt.id}: a scorer's answer lists differ in length")
    qs = prompt.questions
    return {
        "prompt_index": [index], "prompt_id": [prompt.id], "text": [prompt.text], "model_text": [model_text],
        "category": [prompt.category], "subcategory": [prompt.subcategory], "source": [prompt.source],
        "line": [prompt.line], "metadata": [prompt.metadata],
        "question_count": [len(qs)], "image_count": [len(pngs)],
        "question_id": [q.id for q in qs], "question_text": [q.text for q in qs],
        "question_answer": [q.answer for q in qs], "question_choices": [json.dumps(list(q.choices)) for q in qs],
        "question_parents": [json.dumps(list(q.parents)) for q in qs],
        "question_category": [q.category for q in qs], "question_element": [q.element for q in qs],
        "image_index": list(range(len(pngs))), "seed": [s for s, _ in seeds], "decode_seed": [d for _, d in seeds],
        "image_png": list(pngs), "score": np.asarray([a.score for a in answers], np.float32),
        "score_extra": [json.dumps(a.extra, sort_keys=True) for a in answers],
        "answer_count": [len(a.questions) for a in answers],
        "question": [q for a in answers for q in a.questions],
        "p_yes": np.asarray([x for a in answers for x in a.p_yes], np.float32),
        "p_no": np.asarray([x for a in answers for x in a.p_no], np.float32),
        "answer": [x for a in answers for x in a.answers],
        "correct": np.asarray([x for a in answers for x in a.correct], np.float32),
    }


@dataclass
class ShardPrompt:
    """One prompt as an eval shard holds it: the record, its text for the model, its answers and images."""

    index: int
    prompt: BenchmarkPrompt
    model_text: str
    seeds: list[int]
    answers: list[ImageAnswers]
    image_rows: list[int]  # rows of `image_png` in the shard


def read_prompts(shard) -> list[ShardPrompt]:
    """Rebuild the prompts (with the benchmark's own questions) and the scorer's answers from an eval shard."""
    d = shard.data
    out = []
    q0 = img0 = ans0 = 0
    for k in range(len(d["prompt_index"])):
        nq, ni = int(d["question_count"][k]), int(d["image_count"][k])
        questions = tuple(
            BenchmarkQuestion(id=d["question_id"][q], text=d["question_text"][q], answer=d["question_answer"][q],
                              choices=tuple(json.loads(d["question_choices"][q])),
                              parents=tuple(json.loads(d["question_parents"][q])),
                              category=d["question_category"][q], element=d["question_element"][q])
            for q in range(q0, q0 + nq))
        prompt = BenchmarkPrompt(benchmark=shard.meta.extra.get("benchmark", ""), id=d["prompt_id"][k],
                                 text=d["text"][k], category=d["category"][k], subcategory=d["subcategory"][k],
                                 source=d["source"][k], line=int(d["line"][k]), questions=questions,
                                 metadata=d["metadata"][k])
        answers = []
        for r in range(img0, img0 + ni):
            na = int(d["answer_count"][r])
            sl = slice(ans0, ans0 + na)
            answers.append(ImageAnswers(
                score=float(d["score"][r]), questions=list(d["question"][sl]),
                p_yes=[float(x) for x in d["p_yes"][sl]], p_no=[float(x) for x in d["p_no"][sl]],
                answers=list(d["answer"][sl]), correct=[float(x) for x in d["correct"][sl]],
                extra=json.loads(d["score_extra"][r])))
            ans0 += na
        out.append(ShardPrompt(int(d["prompt_index"][k]), prompt, d["model_text"][k],
                               [int(s) for s in d["seed"][img0:img0 + ni]], answers, list(range(img0, img0 + ni))))
        q0 += nq
        img0 += ni
    return out
