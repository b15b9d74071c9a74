"""The unmasking rules of generate(), on hand-built confidences."""

import torch

from spacache_kernels.generation import factor_commit, fixed_commit, threshold_commit, transfer_schedule


def test_transfer_schedule_spreads_the_remainder_first():
    assert transfer_schedule(8, 8) == [1] * 8
    assert transfer_schedule(8, 3) == [3, 3, 2]
    assert transfer_schedule(5, 8) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert sum(transfer_schedule(32, 7)) == 32


def test_fixed_commit_takes_the_most_confident_masked():
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.3, 0.4, 0.99]])
    masked = torch.tensor([[False, True, True, True], [True, True, True, False]])
    got = fixed_commit(conf, masked, 2)
    assert got.tolist() == [[False, False, True, True], [False, True, True, False]]
    assert not fixed_commit(conf, masked, 0).any()


def test_threshold_commit_always_takes_the_best_plus_those_above_tau():
    conf = torch.tensor([[0.5, 0.95, 0.2, 0.91], [0.3, 0.4, 0.1, 0.2]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True]])
    got = threshold_commit(conf, masked, 0.9)
    # Row 0: 0.95 (best, >= tau); 0.91 is not masked. Row 1: only the best (0.4).
    assert got.tolist() == [[False, True, False, False], [False, True, False, False]]


def test_factor_commit_largest_prefix_passing_its_threshold():
    # f = 1: thresholds by rank j (1-based): j=1 passes, j=2: 1 - 1/3 = 0.667, j=3: 0.75, j=4: 0.8
    conf = torch.tensor([[0.95, 0.7, 0.76, 0.5], [0.99, 0.6, 0.98, 0.97]])
    masked = torch.ones(2, 4, dtype=torch.bool)
    got = factor_commit(conf, masked, 1.0)
    # Row 0 sorted: 0.95, 0.76 (>= .667), 0.7 (< .75) -> n = 2.  Row 1: .99, .98, .97 (>= .8?) yes
    # at j=4 threshold .8 vs .97? sorted: .99 .98 .97 .6 -> .6 < .8 -> n = 3.
    assert got.tolist() == [[True, False, True, False], [True, False, True, True]]


def test_factor_commit_ignores_unmasked_and_commits_at_least_one():
    conf = torch.tensor([[0.1, 0.99, 0.05]])
    masked = torch.tensor([[True, False, True]])
    got = factor_commit(conf, masked, 1.0)
    assert got.tolist() == [[True, False, False]]


def test_rules_prefer_fresh_masked_and_still_progress_when_all_masked_are_stale():
    inf = float("inf")
    # Row 0: position 0 is decoded, the masked ones are all stale (-inf): one of them is still taken.
    # Row 1: a fresh masked position (0.2) beats a stale one and every unmasked one.
    conf = torch.tensor([[0.9, -inf, -inf, -inf], [0.99, -inf, 0.2, 0.97]])
    masked = torch.tensor([[False, True, True, True], [False, True, True, False]])
    for rule in (lambda c, m: threshold_commit(c, m, 0.9), lambda c, m: factor_commit(c, m, 1.0),
                 lambda c, m: fixed_commit(c, m, 1)):  # fmt: skip
        got = rule(conf, masked)
        assert got[0].sum() == 1 and (got[0] <= masked[0]).all()
        assert got[1].tolist() == [False, False, True, False]
