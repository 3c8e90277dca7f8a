"""Pair selection -- one task per iteration: rank each prompt's samples, pair the best with the worst.

Reads   every iter_K/{prompts,samples,scores}/shard_NNNNN.h5 (all must be complete and from this run;
        otherwise the task stops with the list of what is missing or bad)
Writes  iter_K/pairs.h5: pairs with everything training needs -- prompt text, chosen and rejected
        tokens with their reference log-probs (discrete), or (continuous) the samples shard and the rows
        of H_w, H_l and H_r in it: the feature matrices are not copied -- and iter_K/pairs_summary.json.

Continuous pairs index rows of the samples shards, so those shards are part of the training input:
`extra.samples_shards` records each referenced shard's path (relative to iter_K/) and the CRC32s of its
feature and id columns, and training refuses a shard that is gone or differs (regenerated, replaced).
**The samples shards of an iteration are needed until that iteration's model is DONE** (`silmm gc` keeps
them until then); regenerating one after pair selection means re-running this stage.

Rules (`pairs.*`): top-k x bottom-k (k = 1 discrete, 10 continuous by default), an optional rejected
rank range (paper Table 7), an optional minimum score gap. Prompts whose samples all tie give no pair
and are counted; a prompt text seen under a lower id is skipped as a duplicate; a NaN or infinite
score stops the task, naming the shard and prompt.
Run directly: python -m jobs.pairs --run RUN --iteration K
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np

from silmm.fsutil import atomic_write_text
from silmm.pairs import PairRule, select_pairs
from silmm.prompts import first_occurrences
from silmm.rundir import RunDir
from silmm.store import ShardError, ShardMeta, StoreOptions, StreamWriter
from silmm.tasks import read_input

log = logging.getLogger("jobs.pairs")
# what pair selection loads of a samples shard (images and feature matrices are verified, not loaded)
SAMPLE_COLUMNS = ("prompt_id", "sample_index", "tokens", "ref_logprob", "ref_prompt_id")
# columns whose stored CRC32s pairs.h5 records: the rows it names mean the same H at training time
INDEXED_COLUMNS = ("prompt_id", "sample_index", "ref_prompt_id", "features", "ref_features")


def run(run: RunDir, iteration: int, shard: int = 0) -> dict[str, Any]:
    cfg = run.config
    opts = StoreOptions.from_config(cfg.store)
    shards = _complete_shards(run, iteration)
    p = cfg.pairs
    rule = PairRule(p.top_k, p.bottom_k, tuple(p.rejected_ranks) if p.rejected_ranks else None, p.min_score_gap)

    # prompt texts of the whole iteration first: a duplicate text keeps its lowest id only
    prompts = [read_input(run, iteration, "prompts", i) for i in range(len(shards))]
    all_ids = np.concatenate([s["prompt_id"] for s in prompts])
    all_texts = [t for s in prompts for t in s["text"]]
    order = np.argsort(all_ids, kind="stable")
    unique = dict(zip(all_ids[order].tolist(), first_occurrences([all_texts[i] for i in order]), strict=True))

    meta = ShardMeta("pairs", iteration, 0, 1, run.config_hash, {})
    writer = StreamWriter(run.pairs_path(iteration), meta, opts)  # one scores shard's pairs in memory at a time
    counts: Counter = Counter()
    all_scores, chosen_scores, rejected_scores = [], [], []
    referenced: list[dict[str, Any]] = []  # continuous: the samples shards the pairs index
    try:
        for i, pr in enumerate(prompts):
            samples = read_input(run, iteration, "samples", i, columns=SAMPLE_COLUMNS)  # verified whole, held: ids
            scores = read_input(run, iteration, "scores", i)
            text_of = dict(zip(pr["prompt_id"].tolist(), zip(pr["text"], pr["category"], strict=True), strict=True))
            block = _shard_pairs(i, samples, scores, list(_rows_by_prompt(scores["prompt_id"]).items()), text_of,
                                 unique, rule, counts, (all_scores, chosen_scores, rejected_scores))
            if block:
                writer.append(block)
                if "samples_shard" in block:
                    referenced.append(samples_reference(run, iteration, samples))
        if not counts["pairs"]:
            raise ShardError(f"{run.pairs_path(iteration)}: no pairs selected from {counts['prompts']} prompts "
                             f"({dict(counts)}); check the scores (all tied?) and pairs.* settings")
        writer.meta.extra["counts"] = dict(counts)
        if referenced:
            writer.meta.extra["samples_shards"] = referenced
        path = writer.finish()
    except BaseException:
        writer.abort()
        raise
    summary = {"counts": dict(counts), "rule": rule.__dict__ | {"rejected_ranks": p.rejected_ranks},
               "scores": _describe(all_scores), "chosen": _describe(chosen_scores),
               "rejected": _describe(rejected_scores),
               "gap": _describe(np.subtract(chosen_scores, rejected_scores).tolist())}
    atomic_write_text(run.iter_dir(iteration) / "pairs_summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("wrote %d pairs from %d prompts to %s: %s", counts["pairs"], counts["prompts"], path, dict(counts))
    return {"pairs": counts["pairs"], **{k: v for k, v in counts.items() if "/" not in k}}


def samples_reference(run: RunDir, iteration: int, samples) -> dict[str, Any]:
    """What pairs.h5 records of a samples shard it indexes: its index, path relative to the iteration
    directory and the CRC32s its attributes store for INDEXED_COLUMNS (verified by the read just done)."""
    stored = json.loads(samples.attrs["checksums"])
    return {"shard": samples.meta.shard_index, "path": str(samples.path.relative_to(run.iter_dir(iteration))),
            "checksums": {name: stored[name] for name in INDEXED_COLUMNS}}


def _shard_pairs(shard: int, samples, scores, prompt_rows: list[tuple[int, list[int]]], text_of: dict, unique: dict,
                 rule: PairRule, counts: Counter, score_lists: tuple[list, list, list]) -> dict[str, Any]:
    """The pairs of one scores shard as a block of pairs.h5; counts and score lists updated. Continuous
    pairs name their samples shard and the rows of H_w, H_l and H_r in it (nothing of H is read)."""
    all_scores, chosen_scores, rejected_scores = score_lists
    discrete = "tokens" in samples
    sample_rows = _rows_by_prompt(samples["prompt_id"])
    ref_row_of = {int(pid): r for r, pid in enumerate(samples["ref_prompt_id"])} if not discrete else {}
    out: dict[str, list] = {}
    for pid, rows in prompt_rows:
        counts["prompts"] += 1
        if not unique[pid]:
            counts["duplicate_prompts"] += 1
            continue
        s = scores["score"][rows].astype(np.float64)
        all_scores.extend(s.tolist())
        try:
            pairs = select_pairs(s, rule, where=f"{scores.path} prompt {pid}")
        except ValueError as exc:
            raise ShardError(str(exc)) from None
        if not pairs:
            counts["tied_prompts" if np.all(s == s[0]) else "prompts_without_pairs"] += 1
            continue
        text, category = text_of[pid]
        srow = {int(samples["sample_index"][r]): r for r in sample_rows[pid]}
        for c, r in pairs:
            ci, ri = int(scores["sample_index"][rows[c]]), int(scores["sample_index"][rows[r]])
            _add(out, prompt_id=pid, text=text, category=category, chosen_index=ci, rejected_index=ri,
                 chosen_score=s[c], rejected_score=s[r])
            chosen_scores.append(s[c])
            rejected_scores.append(s[r])
            if discrete:
                _add(out, chosen_tokens=samples["tokens"][srow[ci]], rejected_tokens=samples["tokens"][srow[ri]],
                     chosen_ref_logprob=samples["ref_logprob"][srow[ci]],
                     rejected_ref_logprob=samples["ref_logprob"][srow[ri]])
            else:
                _add(out, samples_shard=shard, chosen_row=srow[ci], rejected_row=srow[ri], ref_row=ref_row_of[pid])
        counts["pairs"] += len(pairs)
        counts[f"pairs/{category}"] += len(pairs)
    return out


def _complete_shards(run: RunDir, iteration: int) -> list[tuple]:
    """(prompts, samples, scores) shard paths; every one must exist and fit this run (structure; the
    checksums are verified by the reads that follow), else one clear error listing every problem."""
    n = run.num_shards(iteration)
    if n is None:
        read_input(run, iteration, "prompts", 0, columns=())  # says what is wrong with it
    problems, triples = [], []
    for i in range(n):
        paths = tuple(run.shard_path(iteration, st, i) for st in ("prompts", "samples", "scores"))
        for stage in ("prompts", "samples", "scores"):
            try:
                read_input(run, iteration, stage, i, columns=(), verify_checksums=False)  # verified when read
            except ShardError as exc:
                problems.append(str(exc))
        triples.append(paths)
    if problems:
        raise ShardError(f"iteration {iteration}: cannot select pairs, {len(problems)} shard(s) missing or bad:\n  "
                         + "\n  ".join(problems))
    return triples


def _rows_by_prompt(prompt_ids: np.ndarray) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for row, pid in enumerate(prompt_ids.tolist()):
        out.setdefault(int(pid), []).append(row)
    return out


def _add(out: dict[str, list], **values: Any) -> None:
    for k, v in values.items():
        out.setdefault(k, []).append(v)


def _describe(x: list[float]) -> dict[str, float]:
    if not x:
        return {"n": 0}
    a = np.asarray(x, dtype=np.float64)
    q = np.quantile(a, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": len(a), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "p05": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]), "p95": float(q[4]),
            "max": float(a.max())}


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main("pairs"))
