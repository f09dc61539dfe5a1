"""The README's main command, measured (issue 17): the walker DALI-S run's learning curve next to DreamerV3's
published walker-walk curve, its cost, and its zero-shot aggregate on the double_box grid.

Reads the run directory RUN (train.py's logdir is RUN/train), or a curve.json this script wrote before (so a
committed curve can be redrawn after its run directory is gone), and writes, under --out:

    curve.json           the run's evaluation return against env steps, its updates and wall-clock hours
    learning_curve.png   that curve, any --compare curves and DreamerV3's (mean of its 5 seeds, their range as
                         a band); a curve whose label starts with a method's name has that method's colour
    curve.md             both curves side by side at the run's evaluation steps, and the run's level: the mean
                         of its evaluations at --level-steps with their standard error
    zeroshot.{json,txt,png}, zeroshot_contexts.png   with --zeroshot: evaluate.py aggregate of the results

DreamerV3's curve is docs/results/walker/dreamerv3_walker_walk.json (from danijar/dreamerv3's score files;
the file says which). Both count env steps as environment frames at action repeat 2. Run by hand:

    python benchmarks/walker_report.py ~/studies/walker_ratio256 --zeroshot ~/studies/walker_ratio256/zeroshot_double_box.jsonl
    python benchmarks/walker_report.py docs/results/walker/curve.json --label "DALI-S, main command (cpu preset, ratio 256)" \
        --compare docs/results/walker/ratio128/curve.json --compare-label "DALI-S, cpu preset at ratio 128 (stopped at 260k)"
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
from figures import METHOD_COLORS, _pyplot, method_color  # noqa: E402
from study_report import curve  # noqa: E402


@dataclass(frozen=True)
class Args:
    run: tyro.conf.Positional[str]
    """The run directory (train.py's --logdir is RUN/train), or a curve.json this script wrote."""
    zeroshot: str = ""
    """evaluate.py run results (JSON lines) to aggregate; empty: none yet."""
    published: str = "docs/results/walker/dreamerv3_walker_walk.json"
    """DreamerV3's published curve."""
    out: str = "docs/results/walker"
    """Output folder."""
    reps: int = 2000
    """Bootstrap resamples of the aggregate."""
    compare: tuple[str, ...] = ()
    """Other runs (directories or curve.json files) whose evaluation curves are drawn beside this run's."""
    compare_label: tuple[str, ...] = ()
    """The legend entries of --compare, one each."""
    label: str = "DALI-S, this run (double_box training contexts)"
    """The legend entry of RUN; a label that starts with a method's name gets its colour (figures.METHOD_COLORS)."""
    level_steps: tuple[int, ...] = (220_000, 240_000, 260_000)
    """The evaluations whose mean (with its standard error) curve.md states as the run's level (docs/walker.md's
    rule); steps the run has not reached are left out."""


def published_curve(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Env steps (P,) and returns (seeds, P) of the published curve."""
    data = json.loads(path.read_text())
    return np.array(data["steps"]), np.array(list(data["returns_by_seed"].values()))


def load_curve(path: Path) -> dict:
    """A run's evaluation curve: from its directory, or from a curve.json written by this script."""
    return json.loads(path.read_text()) if path.suffix == ".json" else curve(path)


def label_color(label: str) -> str:
    """The colour of the method a legend entry starts with ("DALI-S, main command" -> DALI-S's)."""
    return method_color(max((m for m in METHOD_COLORS if label == m or label.startswith(m + ",") or label.startswith(m + " ")), key=len, default=""))


def level(c: dict, steps: tuple[int, ...]) -> str:
    """The mean of the evaluations at `steps` with the standard error of that mean (their std / sqrt(n))."""
    values = [r for s, r in zip(c["steps"], c["return"]) if s in steps]
    if not values:
        return "level: none of the evaluations at " + ", ".join(f"{s:,}" for s in steps) + " reached yet"
    se = np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    at = ", ".join(f"{s:,}" for s, _ in zip(c["steps"], c["return"]) if s in steps)
    return f"level: {np.mean(values):.0f} (standard error {se:.0f}), the mean of the {len(values)} evaluations at {at} env steps"


def main(args: Args) -> None:
    if len(args.compare_label) != len(args.compare):
        raise SystemExit(f"error: {len(args.compare)} --compare runs but {len(args.compare_label)} --compare-label entries; give one label each")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ours = load_curve(Path(args.run).expanduser())
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
    lines += ["", level(ours, args.level_steps)]
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.fill_between(steps / 1000, returns.min(0), returns.max(0), color="gray", alpha=0.25, lw=0)
    ax.plot(steps / 1000, mean, color="gray", lw=1.5, label="DreamerV3 walker-walk, published (5 seeds; range shaded)")
    ax.plot(np.array(ours["steps"]) / 1000, ours["return"], color=label_color(args.label), marker="o", ms=3, lw=1.5, label=args.label)
    for path, label, ls, marker in zip(args.compare, args.compare_label, ("--", ":", "-."), ("s", "^", "v")):
        other = load_curve(Path(path).expanduser())
        ax.plot(np.array(other["steps"]) / 1000, other["return"], color=label_color(label), marker=marker, ms=3, lw=1, ls=ls, label=label)
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
