"""The evidence of a study, for docs/results: zero-shot aggregates, learning curves and what the runs cost.

Reads one or more study directories of sweep.py (stages of one study may live in separate directories) and
writes, under --out:

    runs/<method>_s<seed>.jsonl    each finished run's zero-shot results (evaluate.py run), copied
    curves.json                    each run's evaluation return against env steps, its updates and hours
    cost.md                        a table: env steps, updates, wall-clock hours and updates/hour per run
    learning_curves.png            evaluation return against env steps, one line per run
    zeroshot_R1000.{json,txt,png}, zeroshot_R1000_contexts.png         scores R / 1000
    zeroshot_per_context.{json,txt,png}, zeroshot_per_context_contexts.png   (R - random_c) / (expert_c - random_c)

Runs still training appear in the curves and the cost table (marked), not in the aggregates. Run by hand:

    python benchmarks/study_report.py ~/studies/bic_gravity ~/studies/bic_refs --reference docs/results/reference_single_0.json --out docs/results/bic_gravity
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from evaluate import method_name  # noqa: E402
from figures import _pyplot  # noqa: E402


@dataclass(frozen=True)
class Args:
    studies: tyro.conf.Positional[tuple[str, ...]]
    """sweep.py study directories (each with study.json and one directory per run)."""
    reference: str = "docs/results/reference_single_0.json"
    """evaluate.py reference file for the per-context normalisation."""
    out: str = "docs/results/bic_gravity"
    """Output folder."""
    reps: int = 2000
    """Bootstrap resamples."""


def run_dirs(study: Path) -> list[Path]:
    return sorted(p for p in study.iterdir() if (p / "train").is_dir())


def run_label(run: Path) -> str:
    """METHOD_sSEED from the run's own configuration, not its directory's name: stages in separate
    directories may reuse a directory name (DALI-S_s0 trained with --ctx.cross-weight 1 is DALI-S-chi_s0)."""
    args = json.loads((run / "train" / "args.json").read_text())
    agent = args["agent"]
    return f"{method_name(agent['context'], agent['integration'], args['ctx']['cross_weight'])}_s{args['seed']}"


def curve(run: Path) -> dict:
    """Evaluation returns, updates and hours of a run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["eval/return"]) for r in rows if "eval/return" in r]
    last = [r for r in rows if "perf/updates" in r][-1] if rows else {}
    return {
        "steps": [s for s, _ in evals], "return": [v for _, v in evals], "env_steps": rows[-1]["step"] if rows else 0,
        "updates": int(last.get("perf/updates", 0)), "hours": float(last.get("perf/hours", 0.0)), "done": (run / "done").exists(),
    }  # fmt: skip


def main(args: Args) -> None:
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = [run for s in args.studies for run in run_dirs(Path(s).expanduser())]
    curves, files = {}, []
    for run in runs:
        label = run_label(run)
        if label in curves:
            raise SystemExit(f"error: two runs are {label}: {run} and another study directory")
        curves[label] = curve(run)
        results = list(run.glob("zeroshot_*.jsonl"))
        if (run / "done").exists() and results:
            files.append(out / "runs" / f"{label}.jsonl")
            shutil.copyfile(results[0], files[-1])
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    lines = ["| run | env steps | updates | hours | updates per hour | status |", "|---|---|---|---|---|---|"]
    for name, c in curves.items():
        rate = c["updates"] / c["hours"] if c["hours"] else 0
        lines.append(f"| {name} | {c['env_steps']:,} | {c['updates']:,} | {c['hours']:.2f} | {rate:,.0f} | {'done' if c['done'] else 'training'} |")
    (out / "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    methods = sorted({name.rsplit("_s", 1)[0] for name in curves})
    for name, c in curves.items():
        color = plt.cm.tab10(methods.index(name.rsplit("_s", 1)[0]))
        ax.plot([s / 1000 for s in c["steps"]], c["return"], color=color, marker="o", ms=2, lw=1, label=name)
    ax.set_xlabel("env steps (thousands)")
    ax.set_ylabel("evaluation return (training contexts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    plt.close(fig)
    if not files:
        print("no finished runs yet: no aggregate")
        return
    for name, extra in (("zeroshot_R1000", []), ("zeroshot_per_context", ["--reference", args.reference])):
        cmd = [sys.executable, str(REPO / "evaluate.py"), "aggregate", *map(str, files), "--out", str(out / name), "--reps", str(args.reps), *extra]
        text = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
        (out / f"{name}.txt").write_text(text)
        print(text)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
