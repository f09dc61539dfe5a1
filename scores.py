"""Aggregate metrics of normalised scores over runs x tasks, with rliable's definitions (Agarwal et al.
2021, "Deep RL at the edge of the statistical precipice"; checked against rliable 1.2.0 in test_dali.py).

In evaluate.py a run is a training seed and a task is an evaluation context. Scores x have shape
(runs M, tasks N), with optional leading axes for bootstrap samples:

    IQM                  25%-trimmed mean of all M * N scores (the middle 50%)
    mean                 mean of all scores
    median               median over tasks of the per-task mean over runs
    optimality gap       gamma - mean(min(x, gamma)), gamma = 1
    P(X > Y)             per task, P(x > y) + P(x = y) / 2 over all pairs of runs (the Mann-Whitney U
                         statistic / (M_X M_Y)), averaged over tasks
    95% CIs              percentile intervals of a stratified bootstrap: each task's runs are resampled with
                         replacement, independently per task (for P(X > Y), X's and Y's independently).
                         (bootstrap_seeds: whole runs resampled instead, each with all its tasks.)
                         A method with a single run has no CI (None): resampling one run always returns it,
                         and the interval [x, x] would read as certainty rather than as no evidence of spread.
"""

from __future__ import annotations

import numpy as np


def iqm(x: np.ndarray) -> np.ndarray:
    """Interquartile mean over the last two axes (..., M, N): the 25%-trimmed mean of all M * N scores
    (scipy.stats.trim_mean(x, 0.25, axis=None): int(0.25 n) scores cut from each end)."""
    flat = np.sort(x.reshape(*x.shape[:-2], -1), -1)
    cut = int(0.25 * flat.shape[-1])
    return flat[..., cut : flat.shape[-1] - cut].mean(-1)


def mean(x: np.ndarray) -> np.ndarray:
    return x.mean((-2, -1))


def median(x: np.ndarray) -> np.ndarray:
    """Median over tasks of the mean over runs."""
    return np.median(x.mean(-2), -1)


def optimality_gap(x: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """How far the scores fall short of gamma: gamma - mean(min(x, gamma))."""
    return gamma - np.minimum(x, gamma).mean((-2, -1))


METRICS = {"IQM": iqm, "mean": mean, "median": median, "optimality gap": optimality_gap}


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y): x (..., M, N), y (..., L, N) -> (...). Per task, the fraction of run pairs where x beats y,
    ties counting half; then the mean over tasks."""
    xi, yj = x[..., :, None, :], y[..., None, :, :]  # (..., M, 1, N), (..., 1, L, N)
    per_task = ((xi > yj) + 0.5 * (xi == yj)).mean((-3, -2))  # (..., N)
    return per_task.mean(-1)


def bootstrap(x: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified bootstrap samples (reps, M, N): each task's runs resampled with replacement."""
    M, N = x.shape
    idx = rng.integers(0, M, size=(reps, M, N))
    return x[idx, np.arange(N)]


def bootstrap_seeds(x: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Whole-run bootstrap samples (reps, M, N): M runs drawn with replacement, each with all its tasks."""
    idx = rng.integers(0, len(x), size=(reps, len(x)))
    return x[idx]


def interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile confidence interval of bootstrap statistics."""
    lo, hi = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


def metric_with_ci(x: np.ndarray, metric, reps: int, rng: np.random.Generator, confidence: float = 0.95) -> dict:
    """{"value", "ci": [lo, hi]} of an aggregate metric of scores x (M, N); "ci" is None when M = 1."""
    ci = list(interval(metric(bootstrap(x, reps, rng)), confidence)) if len(x) > 1 else None
    return {"value": float(metric(x)), "ci": ci}


def improvement_with_ci(x: np.ndarray, y: np.ndarray, reps: int, rng: np.random.Generator, confidence: float = 0.95) -> dict:
    """{"value", "ci"} of P(X > Y), resampling X's and Y's runs independently (stratified by task); "ci" is
    None when either method has a single run (the interval would ignore that method's spread)."""
    ci = None
    if min(len(x), len(y)) > 1:
        ci = list(interval(probability_of_improvement(bootstrap(x, reps, rng), bootstrap(y, reps, rng)), confidence))
    return {"value": float(probability_of_improvement(x, y)), "ci": ci}
