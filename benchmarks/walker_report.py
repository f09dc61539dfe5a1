"""The README's main command, measured (issue 17): the walker DALI-S run's learning curve next to DreamerV3's
published walker-walk curve, its cost, and its zero-shot aggregate on the double_box grid.

Reads the run directory RUN (train.py's logdir is RUN/train) and writes, under --out:

    curve.json           the run's evaluation return against env steps, its updates and wall-clock hours
    learning_curve.png   that curve and DreamerV3's (mean of its 5 seeds, their range as a band)
    curve.md             both curves side by side at the run's evaluation steps
    zeroshot.{json,txt,png}, zeroshot_contexts.png   with --zeroshot: evaluate.py aggregate of the results

DreamerV3's curve is docs/results/walker/dreamerv3_walker_walk.json (from danijar/dreamerv3's score files;
the file says which). Both count env steps as environment frames at action repeat 2. Run by hand:

    python benchmarks/walker_report.py ~/studies/walker_ratio256 --zeroshot ~/studies/walker_ratio256/zeroshot_double_box.jsonl
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from figures import _pyplot  # noqa: E402
from study_report import curve  # noqa: E402


@dataclass(frozen=True)
class Args:
    run: tyro.conf.Positional[str]
    """The run directory (train.py's --logdir is RUN/train)."""
    zeroshot: str = ""
    """evaluate.py run results (JSON lines) to aggregate; empty: none yet."""
    published: str = "docs/results/walker/dreamerv3_walker_walk.json"
    """DreamerV3's published curve."""
    out: str = "docs/results/walker"
    """Output folder."""
    reps: int = 2000
    """Bootstrap resamples of the aggregate."""
    compare: str = ""
    """Another run directory whose evaluation curve is drawn beside this run's (e.g. the side-by-side)."""
    compare_label: str = "DALI-S, compared run"
    """The legend entry of --compare."""
    label: str = "DALI-S, this run (double_box training contexts)"
    """The legend entry of RUN."""


def published_curve(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Env steps (P,) and returns (seeds, P) of the published curve."""
    data = json.loads(path.read_text())
    return np.array(data["steps"]), np.array(list(data["returns_by_seed"].values()))


def main(args: Args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ours = curve(Path(args.run).expanduser())
    (out / "curve.json").write_text(json.dumps(ours, indent=1))
    steps, returns = published_curve(REPO / args.published if not Path(args.published).is_absolute() else Path(args.published))
    mean = returns.mean(0)  # (P,)
    lines = [f"run: {ours['env_steps']:,} env steps, {ours['updates']:,} updates, {ours['hours']:.2f} h wall-clock"
             f" ({'finished' if ours['done'] or ours['env_steps'] >= 500_000 else 'training'})", "",
             "| env steps | this run | DreamerV3 (mean of 5 seeds) | DreamerV3 range |", "|---|---|---|---|"]  # fmt: skip
    for s, r in zip(ours["steps"], ours["return"]):
        i = np.searchsorted(steps, s)
        theirs = f"{mean[i]:.0f} | {returns[:, i].min():.0f} to {returns[:, i].max():.0f}" if i < len(steps) and steps[i] == s else "- | -"
        lines.append(f"| {s:,} | {r:.0f} | {theirs} |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.fill_between(steps / 1000, returns.min(0), returns.max(0), color="gray", alpha=0.25, lw=0)
    ax.plot(steps / 1000, mean, color="gray", lw=1.5, label="DreamerV3 walker-walk, published (5 seeds; range shaded)")
    ax.plot(np.array(ours["steps"]) / 1000, ours["return"], color="C0", marker="o", ms=3, lw=1.5, label=args.label)
    if args.compare:
        other = curve(Path(args.compare).expanduser())
        ax.plot(np.array(other["steps"]) / 1000, other["return"], color="C1", marker="s", ms=3, lw=1, ls="--", label=args.compare_label)
    ax.set_xlabel("env steps (thousands; frames at action repeat 2)")
    ax.set_ylabel("evaluation return")
    ax.set_ylim(0, 1000)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=120)
    plt.close(fig)
    if args.zeroshot:
        cmd = [sys.executable, str(REPO / "evaluate.py"), "aggregate", str(Path(args.zeroshot).expanduser()), "--out", str(out / "zeroshot"), "--reps", str(args.reps)]
        text = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
        (out / "zeroshot.txt").write_text(text)
        print(text)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
