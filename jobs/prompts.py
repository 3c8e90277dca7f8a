"""Stage 1 -- compositional prompts for one shard.

Reads   config `prompts.*`; the iteration's model (only to write the vocabulary and in-context prompts)
Writes  iter_K/vocabulary.json (once per iteration, shared by every shard)
        iter_K/prompts/shard_NNNNN.h5: prompt_id, text, category (files: also source_file, source_line)

The story: assign every prompt id of the iteration a category (exact mix, seeded), get the
vocabulary (the model lists objects and attributes; unusable lists fall back to built-in ones),
compose the template prompts of the whole iteration (cheap, so every shard sees the same unique list),
then let the model write this shard's non-spatial and complex prompts from in-context examples.
With `prompts.source=files` the prompts come from the user's files instead: normalised, counted, drawn
across categories as `prompts.categories` says, each with its file and line (silmm/prompts.py).
Run directly: python -m jobs.prompts --run RUN --iteration K --shard I
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

from silmm import plugins
from silmm import prompts as P
from silmm.config import PromptSource
from silmm.fsutil import atomic_write_text
from silmm.models import load_backend, load_tokenizer
from silmm.rundir import RunDir
from silmm.seeding import derive_seed
from silmm.store import ShardMeta, StoreOptions, write_shard

log = logging.getLogger("jobs.prompts")


def run(run: RunDir, iteration: int, shard: int) -> dict[str, Any]:
    cfg = run.config
    if cfg.prompts.source is PromptSource.files:
        return _from_files(run, iteration, shard)

    count, per_shard, seed = cfg.prompts.count, cfg.sharding.prompts_per_shard, cfg.run.seed
    ids = P.shard_range(count, per_shard, shard)
    categories = P.assign_categories(count, cfg.prompts.categories, derive_seed(seed, iteration, -1, 0, "categories"))
    if cfg.prompts.source is PromptSource.toy:  # a plug-in's grammar (the toy world's: no held-out combination)
        compose_fn = plugins.get("prompt_sources", cfg.prompts.source.value)(cfg)
        texts = P.template_prompts(categories, None, seed, iteration, compose_fn=compose_fn)
        data = {"prompt_id": list(ids), "text": [texts[i] for i in ids], "category": [categories[i] for i in ids]}
        _write(run, iteration, shard, P.shard_count(count, per_shard), data, {"source": "toy"})
        return {"prompts": len(ids)}

    backend = None
    vocab_file = run.iter_dir(iteration) / "vocabulary.json"
    if vocab_file.is_file():
        vocab = P.Vocabulary.from_json(json.loads(vocab_file.read_text()))
    else:
        # every task computes the same vocabulary (greedy, same batch); the first rename wins
        backend = load_backend(run, iteration)
        seeds = [derive_seed(seed, iteration, -1, i, "vocabulary") for i in range(len(P.BUILTIN_VOCABULARY))]
        vocab = P.build_vocabulary(lambda reqs: backend.write_text(reqs, seeds[: len(reqs)], max_new_tokens=64,
                                                                   temperature=0.0))
        atomic_write_text(vocab_file, json.dumps(vocab.to_json(), indent=1) + "\n")

    texts = P.template_prompts(categories, vocab, seed, iteration)
    icl_ids = [i for i in ids if categories[i] in P.ICL_CATEGORIES]
    fallbacks = 0
    if icl_ids:
        backend = backend or load_backend(run, iteration)
        examples = P.BUILTIN_ICL if cfg.prompts.icl_examples is None else _read_icl(cfg.prompts.icl_examples)
        taken = {t.lower() for t in texts.values()}
        for start in range(0, len(icl_ids), cfg.prompts.batch_size):
            batch = icl_ids[start: start + cfg.prompts.batch_size]
            rngs = [random.Random(derive_seed(seed, iteration, i, 0, "icl")) for i in batch]
            requests = [P.icl_request(categories[i], examples[categories[i]], r) for i, r in zip(batch, rngs, strict=True)]
            answers = backend.write_text(requests, [derive_seed(seed, iteration, i, 0, "icl-text") for i in batch],
                                         max_new_tokens=48, temperature=cfg.prompts.vocabulary_temperature, top_p=0.95)
            for i, answer, rng in zip(batch, answers, rngs, strict=True):
                text = P.parse_icl_prompt(answer)
                if text is None or text.lower() in taken:
                    text = P.compose(categories[i], vocab, rng)  # unusable or duplicate: template fallback
                    fallbacks += 1
                texts[i] = text
                taken.add(text.lower())
        log.info("in-context prompts: %d written by the model, %d template fallbacks",
                 len(icl_ids) - fallbacks, fallbacks)

    data = {"prompt_id": list(ids), "text": [texts[i] for i in ids], "category": [categories[i] for i in ids]}
    extra = {"icl_prompts": len(icl_ids), "icl_fallbacks": fallbacks, "vocabulary_sources": vocab.sources}
    _write(run, iteration, shard, P.shard_count(count, per_shard), data, extra)
    return {"prompts": len(ids), "icl_fallbacks": fallbacks}


def _from_files(run: RunDir, iteration: int, shard: int) -> dict[str, Any]:
    """The user's files: checked against the hashes the run recorded, normalised and de-duplicated, drawn
    across categories (seeded), every prompt with its file and line. Every shard task draws the same list;
    its length, not prompts.count, decides the shard count (recorded in every shard)."""
    cfg = run.config
    count_tokens = P.token_counter(load_tokenizer(run, iteration))
    chosen, extra = P.select_file_prompts(cfg.prompts, cfg.run.seed, iteration, count_tokens)
    count, per_shard = len(chosen.texts), cfg.sharding.prompts_per_shard
    ids = P.shard_range(count, per_shard, shard)
    data = {"prompt_id": list(ids), "text": [chosen.texts[i] for i in ids],
            "category": [chosen.categories[i] for i in ids], "source_file": [chosen.files[i] for i in ids],
            "source_line": [chosen.lines[i] for i in ids]}
    _write(run, iteration, shard, P.shard_count(count, per_shard), data, extra)
    return {"prompts": len(ids), **extra}


def _read_icl(path: str) -> dict[str, list[str]]:
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path))
    missing = [c for c in P.ICL_CATEGORIES if not data.get(c)]
    if missing:
        raise ValueError(f"{path}: prompts.icl_examples needs a list of examples for {missing}")
    return data


def _write(run: RunDir, iteration: int, shard: int, count: int, data: dict, extra: dict) -> None:
    meta = ShardMeta("prompts", iteration, shard, count, run.config_hash, extra)
    path = write_shard(run.shard_path(iteration, "prompts", shard), meta, data,
                       StoreOptions.from_config(run.config.store))
    log.info("wrote %d prompts to %s", len(data["prompt_id"]), path)


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main("prompts"))
