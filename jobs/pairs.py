"""Pair selection -- one task per iteration: rank each prompt's samples, pair the best with the worst.

Reads   every iter_K/{prompts,samples,scores}/shard_NNNNN.h5 (all must be complete and from this run;
        otherwise the task stops with the list of what is missing or bad)
Writes  iter_K/pairs.h5: pairs with everything training needs -- prompt text, chosen and rejected
        tokens with their reference log-probs (discrete), or chosen/rejected/reference features stored
        once and referenced by row (continuous) -- and iter_K/pairs_summary.json.

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

import h5py
import numpy as np

from silmm.fsutil import atomic_write_text
from silmm.pairs import PairRule, select_pairs
from silmm.prompts import first_occurrences
from silmm.rundir import RunDir
from silmm.store import ShardError, ShardMeta, StoreOptions, StreamWriter
from silmm.tasks import read_input

log = logging.getLogger("jobs.pairs")
# what pair selection loads of a samples shard (images and feature matrices are verified, not loaded)
BLOCK_BYTES = 256 << 20  # selected feature matrices held at once, whatever the run's size
SAMPLE_COLUMNS = ("prompt_id", "sample_index", "tokens", "ref_logprob", "ref_prompt_id")  # features: by row


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
    try:
        for i, pr in enumerate(prompts):
            samples = read_input(run, iteration, "samples", i, columns=SAMPLE_COLUMNS)  # verified whole, held: ids
            scores = read_input(run, iteration, "scores", i)
            text_of = dict(zip(pr["prompt_id"].tolist(), zip(pr["text"], pr["category"], strict=True), strict=True))
            by_prompt = list(_rows_by_prompt(scores["prompt_id"]).items())
            step = _prompts_per_block(samples, rule)
            for start in range(0, len(by_prompt), step):
                block = _shard_pairs(samples, scores, by_prompt[start: start + step], text_of, unique, rule,
                                     writer.rows, counts, (all_scores, chosen_scores, rejected_scores), opts)
                if block:
                    writer.append(block)
        if not counts["pairs"]:
            raise ShardError(f"{run.pairs_path(iteration)}: no pairs selected from {counts['prompts']} prompts "
                             f"({dict(counts)}); check the scores (all tied?) and pairs.* settings")
        writer.meta.extra["counts"] = dict(counts)
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


def _prompts_per_block(samples, rule: PairRule) -> int:
    """Prompts per block of pairs.h5: the selected feature matrices of a block stay within BLOCK_BYTES."""
    if "tokens" in samples:
        return 1 << 30  # token rows are small: a whole shard is one block
    with h5py.File(samples.path, "r") as f:
        matrix = int(np.prod(f["features"].shape[1:])) * f["features"].dtype.itemsize
    return max(1, BLOCK_BYTES // (matrix * (rule.top_k + rule.bottom_k + 1)))


def _shard_pairs(samples, scores, prompt_rows: list[tuple[int, list[int]]], text_of: dict, unique: dict,
                 rule: PairRule, written: dict[str, int], counts: Counter, score_lists: tuple[list, list, list],
                 opts: StoreOptions) -> dict[str, Any]:
    """The pairs of some prompts of one scores shard as a block of pairs.h5 (feature rows numbered after
    the ``written`` ones); counts and score lists updated. Continuous features are read from the samples
    file into the block row by row: only the block's selected matrices are ever held, once."""
    all_scores, chosen_scores, rejected_scores = score_lists
    discrete = "tokens" in samples
    sample_rows = _rows_by_prompt(samples["prompt_id"])
    ref_row_of = {int(pid): r for r, pid in enumerate(samples["ref_prompt_id"])} if not discrete else {}
    out: dict[str, list] = {}
    feature_rows: list[int] = []  # rows of the samples shard's `features`, in pairs.h5 order
    ref_rows: list[int] = []
    first_feature, first_ref = written.get("feature_rows", 0), written.get("ref_rows", 0)
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
        local_feature_row: dict[int, int] = {}
        if not discrete:
            ref_rows.append(ref_row_of[pid])
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
                rows_ = []
                for idx in (ci, ri):
                    if idx not in local_feature_row:  # each sampled H stored once
                        local_feature_row[idx] = first_feature + len(feature_rows)
                        feature_rows.append(srow[idx])
                    rows_.append(local_feature_row[idx])
                _add(out, chosen_row=rows_[0], rejected_row=rows_[1], ref_row=first_ref + len(ref_rows) - 1)
        counts["pairs"] += len(pairs)
        counts[f"pairs/{category}"] += len(pairs)
    if out and not discrete:
        with h5py.File(samples.path, "r", locking=opts.file_locking) as f:  # verified by read_input above
            for name, rows_ in (("features", feature_rows), ("ref_features", ref_rows)):
                dset = f[name]
                out[name] = np.empty((len(rows_), *dset.shape[1:]), dset.dtype)
                for k, r in enumerate(rows_):  # straight into the block: no per-row copies to stack
                    dset.read_direct(out[name], np.s_[r], np.s_[k])
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
