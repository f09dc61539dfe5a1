"""The paper's pooled zero-shot aggregate: several training settings of one task in one regime table (DALI,
arXiv:2508.20294, Sec. 6 and its ball_in_cup / walker figures; the release's anaylsis/plot_rliable.py,
`compute_agg_all` and `get_ies_scores`).

The release pools, per task, the runs of the three training settings into each regime:

    single_0, single_1   a single-feature run contributes only the contexts where its own feature changed
                         (the others at their defaults): interpolation or extrapolation of that feature
    double_box           every context of its grid, with the mixed regime (one feature inside its training
                         range, the other outside; a feature at its default counts as inside)

Here the single_k grid (contexts.eval_contexts) holds exactly the contexts where feature k changed, so a
single-feature file contributes its whole grid; `pooled_contexts` states the rule and `pool` checks every
file's recorded regime against it. A task of the pool is one (setting, context): the same physics reached
by two settings is two tasks, as in the release. Each context is normalised by its own reference,
(R - random_c) / (expert_c - random_c), or by R / 1000 (no references).

Statistics, per setting and pooled, per regime (scores.py; rliable's definitions): IQM, mean, median,
optimality gap and P(X > Y) for every ordered method pair, each with two 95% CIs:

    ci         the stratified bootstrap of rliable: each task's runs resampled with replacement
    ci_seeds   whole runs resampled: each setting's seeds drawn with replacement, a drawn seed bringing all
               its contexts, independently per setting (and per method). The per-context bootstrap treats
               the contexts of one seed as independent; when one seed breaks in several contexts it
               understates the spread between seeds, which this interval keeps.

The settings may have different seed counts (the release truncates to the smallest count; here every run is
kept): IQM, mean and optimality gap are then over all (setting, context, seed) scores, the median over tasks
of each task's mean over its seeds, P(X > Y) the mean over tasks of each task's pairwise probability. With
equal seed counts these are rliable's metrics of the concatenated (seeds, tasks) matrix.

Pooling refuses files of different tasks or evaluation protocols: episodes per context (each line's
`returns`) and action repeat (a line's `action_repeat` from 2026-12-03 on; before that it is not recorded, so
it is read from the run's train.py `args.json` beside the file, or stated with --action-repeat), and
references measured with another action repeat.

Shapes: M seeds (runs), N contexts (tasks) of a setting; blocks: one (M_s, N_s) score matrix per setting.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

import contexts
from results import MAX_RETURN, REGIMES, Reference, RunResult, _stream, aggregate
from scores import METRICS, bootstrap, bootstrap_seeds, interval, probability_of_improvement

POOLED_SETTINGS = ("single_0", "single_1", "double_box")


def pooled_contexts(task: str, setting: str, grid: list[dict]) -> list[str | None]:
    """The pooling rule for one setting's grid: each context's regime in the pool, None where the setting
    contributes nothing. single_k: a context where feature k, and it alone, differs from its default, with the
    regime of that feature; double_box: every context, regimes over both features (mixed included)."""
    if setting not in POOLED_SETTINGS:
        raise SystemExit(f"error: setting {setting!r} cannot be pooled; the pooled settings are {list(POOLED_SETTINGS)}")
    features = contexts.task_features(task)
    if setting == "double_box":
        return [contexts.regime(task, c, list(features)) for c in grid]
    own = contexts.varied_features(task, setting)[0]
    changed = lambda c: [n for n, f in features.items() if c[n] != f.default]  # noqa: E731
    return [contexts.regime(task, c, [own]) if changed(c) == [own] else None for c in grid]


def recorded_action_repeat(result: RunResult) -> tuple[int | None, str]:
    """A results file's action repeat and where it was found: the file's lines, else the train.py args.json
    of the run it belongs to (sweep.py's RUN/train/args.json or train.py's logdir beside the file)."""
    if result.action_repeat is not None:
        return result.action_repeat, "recorded in the file"
    for args in (Path(result.path).parent / "train" / "args.json", Path(result.path).parent / "args.json"):
        if args.is_file():
            return int(json.loads(args.read_text())["action_repeat"]), f"read from {args}"
    return None, "not recorded"


def check_protocol(results: list[RunResult], references: dict[str, Reference], stated_action_repeat: int = 0) -> dict:
    """Refuse files that cannot be pooled; return the protocol they share: task, episodes per context, action
    repeat and where each file's action repeat came from."""
    tasks = {r.task for r in results}
    if len(tasks) > 1:
        raise SystemExit("error: cannot pool different tasks: " + ", ".join(f"{r.path} is {r.task}" for r in results))
    episodes = {r.returns.shape[1] for r in results}
    if len(episodes) > 1:
        raise SystemExit("error: cannot pool different evaluation protocols: episodes per context differ: "
                         + ", ".join(f"{r.path} has {r.returns.shape[1]}" for r in results))  # fmt: skip
    repeats, sources = {}, {}
    for r in results:
        repeat, source = recorded_action_repeat(r)
        if repeat is None:
            if not stated_action_repeat:
                raise SystemExit(f"error: {r.path} records no action repeat and no train.py args.json lies beside it; "
                                 "state the action repeat its run was trained and evaluated with by --action-repeat N")  # fmt: skip
            repeat, source = stated_action_repeat, "stated by --action-repeat"
        repeats[r.path], sources[r.path] = repeat, source
    if len(set(repeats.values())) > 1:
        raise SystemExit("error: cannot pool different evaluation protocols: action repeats differ: "
                         + ", ".join(f"{p} has {a} ({sources[p]})" for p, a in repeats.items()))  # fmt: skip
    repeat = next(iter(repeats.values()))
    for setting, ref in references.items():
        if ref.task != results[0].task:
            raise SystemExit(f"error: reference {ref.path} is of {ref.task}, the results are of {results[0].task}")
        if ref.action_repeat is not None and ref.action_repeat != repeat:
            raise SystemExit(f"error: reference {ref.path} was measured with action repeat {ref.action_repeat}, the runs act with {repeat}")
    return {"task": results[0].task, "episodes": episodes.pop(), "action_repeat": repeat, "action_repeat_source": sources}


def _pooled_metric(name: str, blocks: list[np.ndarray]) -> np.ndarray:
    """A metric of METRICS over blocks (..., M_s, N_s): median over tasks of each task's mean over its runs;
    the others over all scores (rliable's metric of the concatenated matrix when every M_s is equal)."""
    if name == "median":
        return np.median(np.concatenate([b.mean(-2) for b in blocks], -1), -1)
    flat = np.concatenate([b.reshape(*b.shape[:-2], -1) for b in blocks], -1)  # (..., sum M_s N_s)
    return METRICS[name](flat[..., None, :])


def _pooled_improvement(xs: list[np.ndarray], ys: list[np.ndarray]) -> np.ndarray:
    """P(X > Y) over blocks: the mean over all tasks of each task's pairwise probability."""
    n = np.asarray([x.shape[-1] for x in xs], np.float64)
    return sum(probability_of_improvement(x, y) * k for x, y, k in zip(xs, ys, n)) / n.sum()


def _ci(samples: np.ndarray | None) -> list[float] | None:
    return None if samples is None else list(interval(samples))


def pooled_summary(blocks: dict[str, list[np.ndarray]], reps: int, seed: int, stream: str) -> tuple[dict, dict]:
    """Every metric and every P(X > Y) of {method: blocks}, each with its stratified and its whole-seed CI
    (None when a block has a single run). Each (stream, method) and (stream, method pair) bootstraps from its
    own random stream."""
    metrics, improvement = {}, {}
    for m, b in blocks.items():
        single = min(len(x) for x in b) < 2
        rng, rng_seeds = _stream(seed, stream, m), _stream(seed, "seeds", stream, m)
        per_context = None if single else [bootstrap(x, reps, rng) for x in b]
        whole_seeds = None if single else [bootstrap_seeds(x, reps, rng_seeds) for x in b]
        metrics[m] = {
            name: {"value": float(_pooled_metric(name, b)), "ci": _ci(None if single else _pooled_metric(name, per_context)),
                   "ci_seeds": _ci(None if single else _pooled_metric(name, whole_seeds))}
            for name in METRICS
        }  # fmt: skip
    for a, b in itertools.permutations(blocks, 2):
        single = min(len(x) for x in blocks[a] + blocks[b]) < 2
        rng, rng_seeds = _stream(seed, stream, a, b), _stream(seed, "seeds", stream, a, b)
        value = {"value": float(_pooled_improvement(blocks[a], blocks[b])), "ci": None, "ci_seeds": None}
        if not single:
            value["ci"] = _ci(_pooled_improvement([bootstrap(x, reps, rng) for x in blocks[a]], [bootstrap(y, reps, rng) for y in blocks[b]]))
            value["ci_seeds"] = _ci(_pooled_improvement([bootstrap_seeds(x, reps, rng_seeds) for x in blocks[a]],
                                                        [bootstrap_seeds(y, reps, rng_seeds) for y in blocks[b]]))  # fmt: skip
        improvement[f"{a} > {b}"] = value
    return metrics, improvement


def pool(results: list[RunResult], references: dict[str, Reference] | None = None, reps: int = 2000, seed: int = 0,
         stated_action_repeat: int = 0) -> dict:  # fmt: skip
    """The pooled regime table of runs of several settings of one task, and each setting's own, as JSON.
    references: {setting: Reference} for every setting (per-context normalisation), or None for R / 1000."""
    protocol = check_protocol(results, references or {}, stated_action_repeat)
    by_setting: dict[str, list[RunResult]] = {}
    for r in results:
        by_setting.setdefault(r.setting, []).append(r)
    settings = [s for s in POOLED_SETTINGS if s in by_setting] + [s for s in by_setting if s not in POOLED_SETTINGS]
    methods = list(dict.fromkeys(r.method for r in results))
    for s in settings:
        missing = [m for m in methods if m not in {r.method for r in by_setting[s]}]
        if missing:
            raise SystemExit(f"error: {missing[0]} has no run on {s}: its pooled score would cover other contexts than the other methods'")
    if references is not None:
        missing = [s for s in settings if s not in references]
        if missing:
            raise SystemExit(f"error: no reference of setting {missing[0]}: give one reference file per pooled setting "
                             f"(have {sorted(references)})")  # fmt: skip
    out: dict = {"task": protocol["task"], "setting": "pooled: " + " + ".join(settings), "episodes": protocol["episodes"],
                 "action_repeat": protocol["action_repeat"], "action_repeat_source": protocol["action_repeat_source"],
                 "normalisation": ("per context, " + ", ".join(references[s].path for s in settings)) if references else f"R / {MAX_RETURN:g}",
                 "seeds": {m: {s: sum(r.method == m for r in by_setting[s]) for s in settings} for m in methods},
                 "contexts": {}, "settings": {}, "metrics": {}, "improvement": {}}  # fmt: skip
    # per setting: blocks (M, N) of the contributed contexts with their pooled regimes
    blocks: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # setting -> method -> (scores (M, N), regimes (N,))
    for s in settings:
        runs = by_setting[s]
        grid = [c for c, _ in contexts.eval_contexts(protocol["task"], s)]
        rule = pooled_contexts(protocol["task"], s, grid)
        for r in runs:
            bad = [i for i, (reg, rec) in enumerate(zip(rule, r.regimes)) if reg is not None and reg != rec]
            if bad:
                raise SystemExit(f"error: {r.path}: context {grid[bad[0]]} is recorded as {r.regimes[bad[0]]}, the pooling rule makes it {rule[bad[0]]}")
        keep = np.asarray([reg is not None for reg in rule])
        ref = references[s] if references else None
        random, expert = (ref.random, ref.expert) if ref is not None else (0.0, MAX_RETURN)
        regimes = np.asarray([reg for reg in rule if reg is not None])
        out["contexts"][s] = [{"context": c, "regime": reg} for c, reg in zip(grid, rule) if reg is not None]
        blocks[s] = {}
        for m in methods:
            mine = [r for r in runs if r.method == m]
            scores = np.stack([(r.returns.mean(1) - random) / (expert - random) for r in mine])[:, keep]  # (M, N)
            blocks[s][m] = (scores, regimes)
        # the setting alone: its aggregate (the same numbers and stratified CIs as `evaluate.py aggregate` of its
        # files), plus whole-seed CIs
        alone = aggregate(runs, reps, seed, 0.0, MAX_RETURN, ref)
        for reg in alone["metrics"]:
            cols = {m: (x[:, regimes == reg] if reg != "all" else x) for m, (x, regimes) in blocks[s].items()}
            metrics, improvement = pooled_summary({m: [x] for m, x in cols.items()}, reps, seed, f"{s} {reg}")
            for m in alone["metrics"][reg]:
                for name in METRICS:
                    alone["metrics"][reg][m][name]["ci_seeds"] = metrics[m][name]["ci_seeds"]
            for pair in alone["improvement"][reg]:
                alone["improvement"][reg][pair]["ci_seeds"] = improvement[pair]["ci_seeds"]
        out["settings"][s] = alone
    for reg in REGIMES:
        per_method = {m: [x if reg == "all" else x[:, regimes == reg] for x, regimes in (blocks[s][m] for s in settings)] for m in methods}
        per_method = {m: [x for x in b if x.shape[1]] for m, b in per_method.items()}
        if not per_method[methods[0]]:
            continue
        out["metrics"][reg], out["improvement"][reg] = pooled_summary(per_method, reps, seed, f"pooled {reg}")
    return out


def format_pooled(summary: dict) -> str:
    """The pooled table, then each setting's: IQM and mean with both CIs, then P(X > Y) for every pair."""
    fmt = lambda d, k: f"[{d[k][0]:.3f}, {d[k][1]:.3f}]" if d.get(k) else "(no CI)"  # noqa: E731
    both = lambda d: f"{d['value']:.3f} {fmt(d, 'ci')} seeds {fmt(d, 'ci_seeds')}"  # noqa: E731
    seeds = "; ".join(f"{m} " + ", ".join(f"{s} {n}" for s, n in per.items()) for m, per in summary["seeds"].items())
    n_contexts = ", ".join(f"{s} {len(c)}" for s, c in summary["contexts"].items())
    lines = [f"{summary['task']} {summary['setting']}; contexts {n_contexts}; seeds: {seeds}",
             f"{summary['episodes']} episodes per context, action repeat {summary['action_repeat']}; scores normalised {summary['normalisation']}",
             "95% CIs: stratified bootstrap (runs resampled per context), then whole seeds resampled per setting"]  # fmt: skip
    for title, part in [("pooled", summary)] + [(s, summary["settings"][s]) for s in summary["settings"]]:
        lines.append(f"\n{title}")
        lines.append(f"{'regime':<14} {'method':<12} {'IQM':<50} {'mean':<50}")
        for reg, methods in part["metrics"].items():
            for m, v in methods.items():
                lines.append(f"{reg:<14} {m:<12} {both(v['IQM']):<50} {both(v['mean']):<50}")
        for reg, pairs in part["improvement"].items():
            for pair, v in pairs.items():
                lines.append(f"{reg:<14} P({pair}) = {both(v)}")
    return "\n".join(lines)
