"""Two methods' difference and their seeds' spread in one regime, from `evaluate.py run` files: what
docs/results.md says about power ("no detectable difference") and about which method's seeds spread less.

    python benchmarks/seed_stats.py docs/results/bic_gravity/runs/{DALI-S,Dreamer-DR}_s{0,1,2}.jsonl \
        docs/results/bic_gravity_more/runs/{DALI-S,Dreamer-DR}_s{3,4}.jsonl --a DALI-S --b Dreamer-DR

Scores as `evaluate.py aggregate` makes them (results.score_matrices: R / 1000, or per context with
--reference). In --regime, for A minus B:

    IQM and mean differences, each with two 95% percentile CIs of --reps bootstrap resamples:
      stratified   per context, A's runs and B's runs each resampled with replacement (rliable's bootstrap,
                   applied to the difference: both methods from one draw per resample)
      whole seeds  A's seeds and B's seeds resampled with replacement, each seed with all its contexts
    per-seed means  each seed's mean score over the regime's contexts
    spread tests    on the per-seed means, A's against B's: Brown-Forsythe (Levene's test centred on the
                   median, scipy.stats.levene(center="median")), and an exact permutation test of
                   |SD_A - SD_B| over every split of the pooled seeds into groups of A's and B's sizes

Shapes: M seeds, N contexts.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import read_reference, read_results, score_matrices  # noqa: E402
from scores import bootstrap, bootstrap_seeds, interval, iqm, mean  # noqa: E402


@dataclass(frozen=True)
class Args:
    files: tyro.conf.Positional[tuple[str, ...]]
    """`evaluate.py run` files of one setting: A's and B's seeds (other methods are ignored)."""
    a: str = "DALI-S"
    """Method A."""
    b: str = "Dreamer-DR"
    """Method B."""
    regime: str = "extrapolation"
    """interpolation, extrapolation, mixed, or all."""
    reference: str = ""
    """An `evaluate.py reference` file: per-context normalisation (default R / 1000)."""
    reps: int = 2000
    """Bootstrap resamples."""
    seed: int = 0
    """Bootstrap seed."""


def spread_permutation_p(x: np.ndarray, y: np.ndarray) -> float:
    """Exact two-sided permutation p-value of |SD(x) - SD(y)| (sample SDs) over every split of x and y pooled."""
    pooled, observed = np.concatenate([x, y]), abs(x.std(ddof=1) - y.std(ddof=1))
    splits = list(itertools.combinations(range(len(pooled)), len(x)))
    hits = 0
    for idx in splits:
        mask = np.zeros(len(pooled), bool)
        mask[list(idx)] = True
        hits += abs(pooled[mask].std(ddof=1) - pooled[~mask].std(ddof=1)) >= observed - 1e-12
    return hits / len(splits)


def main(args: Args) -> dict:
    results = [r for r in map(read_results, args.files) if r.method in (args.a, args.b)]
    reference = read_reference(args.reference) if args.reference else None
    scores = score_matrices(results, reference=reference)
    for m in (args.a, args.b):
        if m not in scores or len(scores[m]) < 2:
            raise SystemExit(f"error: method {m} needs at least 2 runs in the files (has {len(scores.get(m, []))})")
    cols = np.ones(len(results[0].regimes), bool) if args.regime == "all" else np.asarray(results[0].regimes) == args.regime
    if not cols.any():
        raise SystemExit(f"error: no context of regime {args.regime!r}; the files have {sorted(set(results[0].regimes))}")
    x, y = scores[args.a][:, cols], scores[args.b][:, cols]  # (M_a, N), (M_b, N)
    rng = np.random.default_rng(args.seed)
    out: dict = {"regime": args.regime, "contexts": int(cols.sum()), "seeds": {args.a: len(x), args.b: len(y)},
                 "normalisation": reference.path if reference else "R / 1000"}  # fmt: skip
    lines = [f"{args.a} minus {args.b}, {args.regime} ({cols.sum()} contexts; seeds {len(x)} and {len(y)}; scores {out['normalisation']}; "
             f"{args.reps} resamples, 95% CIs)"]  # fmt: skip
    for name, f in (("IQM", iqm), ("mean", mean)):
        strat = f(bootstrap(x, args.reps, rng)) - f(bootstrap(y, args.reps, rng))
        seeds = f(bootstrap_seeds(x, args.reps, rng)) - f(bootstrap_seeds(y, args.reps, rng))
        d = {"value": float(f(x) - f(y)), "ci": list(interval(strat)), "ci_seeds": list(interval(seeds))}
        out[f"{name} difference"] = d
        lines.append(f"{name} difference {d['value']:+.3f}, stratified [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], "
                     f"whole seeds [{d['ci_seeds'][0]:+.3f}, {d['ci_seeds'][1]:+.3f}]")  # fmt: skip
    mx, my = x.mean(1), y.mean(1)  # (M,) per-seed means over the regime's contexts
    out["per-seed means"] = {args.a: mx.tolist(), args.b: my.tolist()}
    out["SD of per-seed means"] = {args.a: float(mx.std(ddof=1)), args.b: float(my.std(ddof=1))}
    out["Brown-Forsythe p"] = float(stats.levene(mx, my, center="median").pvalue)
    out["permutation p"] = spread_permutation_p(mx, my)
    for m, v in out["per-seed means"].items():
        lines.append(f"per-seed means, {m}: " + ", ".join(f"{s:.3f}" for s in v) + f" (SD {out['SD of per-seed means'][m]:.3f})")
    lines.append(f"spread of per-seed means: Brown-Forsythe p = {out['Brown-Forsythe p']:.3f}; "
                 f"exact permutation test of |SD_A - SD_B|, p = {out['permutation p']:.3f}")  # fmt: skip
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
