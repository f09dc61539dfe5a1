"""Which configuration reaches a good policy in the least wall-clock time? (the choice of the CPU preset)

Reads the metrics.jsonl of finished or running train.py runs (or a JSON curve: {"steps", "updates",
"return"} lists, e.g. docs/learning_before_fixes.json, a run whose logs are gone) and prints, per run, where its evaluation
return first reaches the threshold: env steps, updates, wall-clock hours. It also estimates each run's
time as if alone on the machine: its updates times a per-update time you measured side by side with
benchmarks/speed.py (`--update-seconds`), plus its env steps over the acting rate. Plots return against
env steps and against hours.

Wall-clock is rebuilt from the logged rates: between two log lines, (steps_i - steps_{i-1}) / perf/fps_i
is exactly the time train.py measured, evaluation included; pauses between resumes are not counted.
Runs that shared the cores with other jobs look slower than they are; the estimate corrects for that.

Run by hand:
    python benchmarks/learning_curve.py runs/bic_none_r128 runs/bic_r128_s128 --labels "ratio 128" "ratio 128, 128 starts"
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from figures import learning_curves  # noqa: E402


@dataclass(frozen=True)
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """train.py log directories (each with metrics.jsonl), or JSON curves."""
    labels: tuple[str, ...] = ()
    """A label per run (default: the directory names)."""
    threshold: float = 900.0
    """The return that counts as a good policy."""
    update_seconds: tuple[float, ...] = ()
    """Per-update time of each run's configuration, measured side by side (benchmarks/speed.py); gives the
    unshared estimate."""
    acting_rate: float = 1000.0
    """Env steps per second of the acting loop (benchmarks/speed.py), for the unshared estimate."""
    out: str = "docs/learning_curve.png"
    """Figure path."""
    title: str = "ball_in_cup, features, default context"
    """Figure title."""


def read_curve(run: Path) -> dict[str, np.ndarray]:
    """Evaluation returns of a run with their env steps, updates and wall-clock hours (nan where unknown)."""
    if run.suffix == ".json":
        saved = json.loads(run.read_text())
        n = len(saved["steps"])
        hours = saved.get("hours", [float("nan")] * n)
        return {k: np.array(v, float) for k, v in (("steps", saved["steps"]), ("hours", hours), ("updates", saved["updates"]), ("return", saved["return"]))}
    path = run / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist (is {run} a train.py log directory?)")
    steps, hours, updates, returns = [], [], [], []
    last_step, seconds, last_updates = 0, 0.0, 0.0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "perf/fps" in row:  # rates come with every log line; evaluation results only with some
            seconds += (row["step"] - last_step) / row["perf/fps"]
            last_step, last_updates = row["step"], row["perf/updates"]
        if "eval/return" in row:
            steps.append(row["step"]), hours.append(seconds / 3600), updates.append(last_updates), returns.append(row["eval/return"])
    if not steps:
        raise SystemExit(f"error: {path} has no evaluation yet")
    return {"steps": np.array(steps, float), "hours": np.array(hours), "updates": np.array(updates), "return": np.array(returns)}


def main(args: Args) -> None:
    labels = args.labels or tuple(Path(r).name for r in args.runs)
    if len(labels) != len(args.runs) or (args.update_seconds and len(args.update_seconds) != len(args.runs)):
        raise SystemExit(f"error: {len(args.runs)} runs need as many --labels and --update-seconds (got {len(labels)} and {len(args.update_seconds)})")
    curves = {label: read_curve(Path(run)) for label, run in zip(labels, args.runs)}
    print(f"| run | first eval >= {args.threshold:.0f} at env steps | updates | hours (as run) | hours (unshared estimate) | best eval |")
    print("|---|---|---|---|---|---|")
    for i, (label, c) in enumerate(curves.items()):
        hit = np.flatnonzero(c["return"] >= args.threshold)
        best = f"{c['return'].max():.0f}"
        if not len(hit):
            print(f"| {label} | not reached by {c['steps'][-1]:.0f} | {c['updates'][-1]:.0f} | > {c['hours'][-1]:.2f} | | {best} |")
            continue
        j = hit[0]
        estimate = ""
        if args.update_seconds:
            estimate = f"{(c['updates'][j] * args.update_seconds[i] + c['steps'][j] / args.acting_rate) / 3600:.2f}"
        print(f"| {label} | {c['steps'][j]:.0f} | {c['updates'][j]:.0f} | {c['hours'][j]:.2f} | {estimate} | {best} |")
    learning_curves(curves, args.threshold, args.title, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
