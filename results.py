"""Zero-shot results and their aggregate (DALI, arXiv:2508.20294, Sec. 6; the statistics of Agarwal et al. 2021,
"Deep RL at the edge of the statistical precipice", as in rliable; definitions in scores.py).

A results file (`evaluate.py run`) holds one JSON line per context of an evaluation grid: one agent (method,
seed) and its episode returns there. A reference file (`evaluate.py reference`) holds random_c and expert_c per
context. A score is a return R normalised by the task's maximum (R / 1000 for DMC), or, with a reference,
per context as the DALI release's analysis does (its plot_rliable.py): (R - random_c) / (expert_c - random_c),
random_c being the mean return of a uniform random policy in context c and expert_c 1000, the release's fixed
expert return for ball_in_cup (it took walker's from expert runs trained per context, which this code has
not). The score of (seed, context) is its mean over episodes. Per regime (interpolation, extrapolation,
mixed, and all contexts), with the seeds as runs and the regime's contexts as tasks, `aggregate` reports
IQM, mean, median and optimality gap with stratified-bootstrap 95% CIs, and the probability of improvement
of every method over every other.

Shapes: M seeds (runs), N contexts (tasks), E episodes.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import envs
from scores import METRICS, improvement_with_ci, metric_with_ci

MAX_RETURN = 1000.0  # DMC rewards are in [0, 1] per control step over 1000-step episodes
REGIMES = ("interpolation", "extrapolation", "mixed", "all")


@dataclass(frozen=True)
class RunResult:
    """One results file: one agent (method, seed) on every context of a grid."""

    path: str
    task: str
    setting: str
    method: str
    seed: int
    regimes: list[str]  # per context, in grid order
    returns: np.ndarray  # (contexts, episodes)
    action_repeat: int | None = None  # as recorded by `evaluate.py run` (from 2026-12-03 on); None in older files


def read_results(path: str) -> RunResult:
    """Read and check a `run` output file: complete, one task and setting, the grid's contexts in order."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: results file {path} does not exist")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise SystemExit(f"error: {path} line {n} is not valid JSON (a truncated or corrupt results file?)") from None
    if not rows:
        raise SystemExit(f"error: results file {path} is empty")
    keys = {"task", "setting", "method", "seed", "context", "regime", "returns"}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not keys <= row.keys():
            raise SystemExit(f"error: {path} line {n} lacks the fields {sorted(keys - set(row) if isinstance(row, dict) else keys)}")
    head = rows[0]
    for field in ("task", "setting", "method", "seed"):
        values = {row[field] for row in rows}
        if len(values) > 1:
            raise SystemExit(f"error: {path} mixes {field}s {sorted(map(str, values))}")
    grid = envs.eval_contexts(head["task"], head["setting"])
    if len(rows) != len(grid):
        raise SystemExit(f"error: {path} holds {len(rows)} contexts, the {head['setting']} grid of {head['task']} has {len(grid)} (a truncated run?)")
    for n, (row, (context, _)) in enumerate(zip(rows, grid), 1):
        if any(not math.isclose(row["context"].get(k, math.nan), v) for k, v in context.items()):
            raise SystemExit(f"error: {path} line {n}: context {row['context']} is not the grid's context {context}")
    episodes = {len(row["returns"]) for row in rows}
    if len(episodes) > 1 or 0 in episodes:
        raise SystemExit(f"error: {path} has unequal or zero episode counts per context: {sorted(episodes)}")
    returns = np.asarray([row["returns"] for row in rows], np.float64)
    repeat = head.get("action_repeat")
    return RunResult(path, head["task"], head["setting"], head["method"], int(head["seed"]), [r["regime"] for r in rows], returns,
                     None if repeat is None else int(repeat))  # fmt: skip


@dataclass(frozen=True)
class Reference:
    """Per-context reference returns of one task's evaluation grid (`reference` writes them)."""

    path: str
    task: str
    setting: str
    random: np.ndarray  # (contexts,) random_c: mean return of the uniform random policy
    expert: np.ndarray  # (contexts,) expert_c
    action_repeat: int | None = None  # control steps per random decision, as the file records it


def read_reference(path: str) -> Reference:
    """Read and check a `reference` file: the grid of its task and setting, in order, every expert > random."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: reference file {path} does not exist")
    try:
        ref = json.loads(p.read_text())
        task, setting, rows = ref["task"], ref["setting"], ref["contexts"]
        random, expert = (np.asarray([row[k] for row in rows], np.float64) for k in ("random_mean", "expert"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} is not a reference file of `evaluate.py reference` ({type(e).__name__}: {e})") from None
    grid = envs.eval_contexts(task, setting)
    if len(rows) != len(grid) or any(not math.isclose(row["context"].get(k, math.nan), v) for row, (c, _) in zip(rows, grid) for k, v in c.items()):
        raise SystemExit(f"error: {path}: its contexts are not the {setting} grid of {task}")
    if (expert <= random).any():
        raise SystemExit(f"error: {path}: expert return <= random return in context {rows[int(np.argmax(expert <= random))]['context']}")
    return Reference(path, task, setting, random, expert, ref.get("action_repeat"))


def score_matrices(
    results: list[RunResult], random_return: float = 0.0, expert_return: float = MAX_RETURN, reference: Reference | None = None
) -> dict[str, np.ndarray]:
    """{method: normalised scores (seeds, contexts)}, after checking that the files fit together: (R - random) /
    (expert - random) with the scalar returns, or with `reference`'s per-context ones."""
    tasks = {r.task for r in results}
    if len(tasks) > 1:
        raise SystemExit("error: the files mix tasks: " + ", ".join(f"{r.path} is {r.task}" for r in results))
    settings = {r.setting for r in results}
    if len(settings) > 1:
        raise SystemExit("error: the files mix settings (`aggregate --pool` pools settings as the paper does): "
                         + ", ".join(f"{r.path} is {r.setting}" for r in results))  # fmt: skip
    by_method: dict[str, list[RunResult]] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    for method, runs in by_method.items():
        seeds = [r.seed for r in runs]
        if len(set(seeds)) < len(seeds):
            dup = sorted(s for s in set(seeds) if seeds.count(s) > 1)
            raise SystemExit(f"error: {method} has seed {dup[0]} twice: " + ", ".join(r.path for r in runs if r.seed == dup[0]))
    if reference is not None:
        if (reference.task, reference.setting) != (results[0].task, results[0].setting):
            raise SystemExit(f"error: reference {reference.path} is {reference.task} {reference.setting}, the results are {results[0].task} {results[0].setting}")
        random_return, expert_return = reference.random, reference.expert  # (contexts,)
    elif expert_return <= random_return:
        raise SystemExit(f"error: --expert-return {expert_return} must exceed --random-return {random_return}")
    return {m: np.stack([(r.returns.mean(1) - random_return) / (expert_return - random_return) for r in runs]) for m, runs in by_method.items()}


def _stream(seed: int, *names: str) -> np.random.Generator:
    """The bootstrap's random stream of one (regime, method) or (regime, method pair): its own, so that a method's
    CIs stay the same when other methods are aggregated beside it (e.g. as a study's later stages finish)."""
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in names)])


def _metrics_with_ci(x: np.ndarray, reps: int, rng: np.random.Generator) -> dict:
    """Every metric of METRICS with its CI, for scores x (M, N)."""
    return {name: metric_with_ci(x, f, reps, rng) for name, f in METRICS.items()}


def aggregate(
    results: list[RunResult], reps: int = 2000, seed: int = 0, random_return: float = 0.0, expert_return: float = MAX_RETURN,
    reference: Reference | None = None,
) -> dict:  # fmt: skip
    """Every metric with CIs per regime and method, and P(X > Y) for every ordered pair of methods."""
    scores = score_matrices(results, random_return, expert_return, reference)
    regimes = np.asarray(results[0].regimes)
    norm = f"per context, {reference.path}" if reference is not None else f"(R - {random_return:g}) / ({expert_return:g} - {random_return:g})"
    out: dict = {"task": results[0].task, "setting": results[0].setting, "seeds": {m: len(x) for m, x in scores.items()}, "normalisation": norm,
                 "metrics": {}, "improvement": {}}  # fmt: skip
    for reg in REGIMES:
        cols = np.ones(len(regimes), bool) if reg == "all" else regimes == reg
        if not cols.any():
            continue
        out["metrics"][reg] = {m: _metrics_with_ci(x[:, cols], reps, _stream(seed, reg, m)) for m, x in scores.items()}
        out["improvement"][reg] = {
            f"{a} > {b}": improvement_with_ci(scores[a][:, cols], scores[b][:, cols], reps, _stream(seed, reg, a, b))
            for a, b in itertools.permutations(scores, 2)
        }
    return out


def format_table(summary: dict) -> str:
    fmt = lambda d: f"{d['value']:.3f} " + (f"[{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]" if d["ci"] else "(1 run, no CI)")  # noqa: E731
    seeds = ", ".join(f"{m} {n}" for m, n in summary["seeds"].items())
    lines = [f"{summary['task']} {summary['setting']}, seeds per method: {seeds}; 95% stratified-bootstrap CIs, "
             f"scores normalised {summary.get('normalisation', '')}"]  # fmt: skip
    lines.append(f"{'regime':<14} {'method':<12} " + " ".join(f"{n:<22}" for n in METRICS))
    for reg, methods in summary["metrics"].items():
        for m, values in methods.items():
            lines.append(f"{reg:<14} {m:<12} " + " ".join(f"{fmt(values[n]):<22}" for n in METRICS))
    for reg, pairs in summary["improvement"].items():
        for pair, value in pairs.items():
            lines.append(f"{reg:<14} P({pair}) = {fmt(value)}")
    return "\n".join(lines)
