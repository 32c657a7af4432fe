"""Paired bootstrap intervals: is a change between two evaluations of the same examples larger than the evaluation's
own noise?

    delta, lo, hi = tasks.paired_interval(first, last, stat)   # per-example dicts, 95% percentile bootstrap
    stat: tasks.token_weighted_loss (held-out loss: loss_sum, tokens) or tasks.accuracy_of (correct: 0/1)
"""
import numpy as np


def paired_interval(first, last, stat, resamples=2000, seed=0):
    """95% percentile bootstrap interval of stat(last) - stat(first) on the same resampled examples -> (delta, lo, hi).
    first, last: dicts of per-example lists over the same examples (e.g. loss_sum and tokens); stat(d, idx) -> the
    statistic of the examples idx (an int array [..., n]). A paired interval that excludes 0 is a change larger
    than the evaluation's own noise."""
    n = len(next(iter(first.values())))
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    every = np.arange(n)
    diffs = stat(last, idx) - stat(first, idx)
    lo, hi = np.percentile(diffs, [2.5, 97.5]).tolist()
    return float(stat(last, every) - stat(first, every)), lo, hi


def token_weighted_loss(d, idx):
    """stat for paired_interval: sum of the target tokens' losses / number of target tokens, over examples idx."""
    return np.sum(np.asarray(d["loss_sum"])[idx], -1) / np.sum(np.asarray(d["tokens"])[idx], -1)


def accuracy_of(d, idx):
    """stat for paired_interval: the share of examples idx predicted correctly (d["correct"]: 0/1 per example)."""
    return np.mean(np.asarray(d["correct"])[idx], -1)
