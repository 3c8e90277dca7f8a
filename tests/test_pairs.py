import numpy as np
import pytest

from silmm.feedback import random_score, ratio_yes_score, vqa_score
from silmm.pairs import PairRule, PairSelectionError, select_pairs


def test_top1_vs_last1():
    assert select_pairs([0.1, 0.9, -0.5, 0.3], PairRule(1, 1)) == [(1, 2)]


def test_topk_by_bottomk_all_combinations_ordered_by_rank():
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    assert select_pairs(scores, PairRule(2, 2)) == [(2, 5), (2, 1), (4, 5), (4, 1)]


def test_ties_all_equal_are_skipped_and_partial_ties_never_pair():
    assert select_pairs([0.2, 0.2, 0.2], PairRule(1, 1)) == []
    # best two tie: chosen is the lower sample index; a tied pair is never formed
    assert select_pairs([0.5, 0.5, 0.1], PairRule(2, 2)) == [(0, 2), (1, 2)]


def test_k_larger_than_n_overlaps_without_self_pairs():
    pairs = select_pairs([0.3, 0.1, 0.2], PairRule(10, 10))
    assert sorted(pairs) == [(0, 1), (0, 2), (2, 1)]


def test_rejected_rank_range_like_table7():
    scores = np.linspace(1.0, 0.0, 30)  # sample i has rank i+1
    pairs = select_pairs(scores, PairRule(1, 1, rejected_ranks=(20, 30)))
    assert pairs == [(0, r) for r in range(19, 30)]


def test_min_gap():
    assert select_pairs([0.5, 0.45, 0.0], PairRule(1, 2, min_score_gap=0.1)) == [(0, 2)]


def test_nan_is_an_error_naming_the_place():
    with pytest.raises(PairSelectionError, match="shard_00003.h5 prompt 17: non-finite scores at sample indices \\[1\\]"):
        select_pairs([0.1, float("nan"), 0.2], PairRule(1, 1), where="shard_00003.h5 prompt 17")


def test_scores():
    assert vqa_score(np.array([0.9, 0.2]), np.array([0.05, 0.7])) == pytest.approx(((0.85) + (-0.5)) / 2)
    assert ratio_yes_score(np.array([0.9, 0.2, 0.6]), np.array([0.05, 0.7, 0.3])) == pytest.approx(2 / 3)
    assert random_score(3) == random_score(3) != random_score(4)
    assert -1 <= random_score(11) <= 1
    with pytest.raises(ValueError):
        vqa_score(np.array([]), np.array([]))


def test_pairs_job_memory_does_not_grow_with_the_prompt_count(tmp_path):
    """Continuous pairs index rows of the samples shards and hold one scores shard's pairs at a time: 4x the
    prompts (same shard size) leaves the peak allocation where it was, and pairs.h5 holds no matrix. (The first job stacked every selected matrix, the next copied
    them block by block.)"""
    import tracemalloc

    import jobs.pairs as J
    from bench.scale import old_pairs_bytes, synthetic_run
    from silmm import store as S

    peaks = []
    for prompts in (16, 64):
        run = synthetic_run(tmp_path / str(prompts), prompts, per_shard=8, samples=6, L=8, D=1024, top_k=2)
        tracemalloc.start()
        J.run(run, 1)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        pairs = S.read_shard(run.pairs_path(1), stage="pairs")
        assert pairs.rows("pairs") == prompts * 4 and "features" not in pairs
        assert [r["shard"] for r in pairs.meta.extra["samples_shards"]] == list(range(prompts // 8))
        assert run.pairs_path(1).stat().st_size < old_pairs_bytes(run) / 5  # what copying the matrices wrote
    assert peaks[1] < 1.25 * peaks[0], peaks
