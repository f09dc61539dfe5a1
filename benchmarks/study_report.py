"""The evidence of a study, for docs/results: zero-shot aggregates, learning curves and what the runs cost.

Reads one or more study directories of sweep.py (stages of one study may live in separate directories) and
writes, under --out:

    runs/<method>_s<seed>.jsonl    each finished run's zero-shot results (evaluate.py run), copied
    curves.json                    each run's evaluation return against env steps, its updates and hours
    cost.md                        a table: env steps, updates, wall-clock hours and updates/hour per run, and
                                   when its mean imagined reward first exceeded 0.05 and 0.2 (REWARD_FOUND)
    contexts.md                    each finished run's mean zero-shot return per regime and per grid context
    learning_curves.png            evaluation return against env steps, one line per run
    zeroshot_R1000.{json,txt,png}, zeroshot_R1000_contexts.png         scores R / 1000
    zeroshot_per_context.{json,txt,png}, zeroshot_per_context_contexts.png   (R - random_c) / (expert_c - random_c)
    probe_<method>_s<seed>.json, probes.md   what ctx knows: counterfactual.py probe of each finished
                                   learned-context run on its own policy data (made once, then kept)
    dream_<method>_s<seed>[_<factor>].png   of each finished deep learned-context run (DALI-D): a
                                   counterfactual dream per factor its setting varies (no suffix: gravity)
    plausibility_<method>_s<seed>.{json,txt}   of each such run whose setting varies gravity: the dream's
                                   physical plausibility with 95% bootstrap CIs (dreams and these made once, then kept)

Runs still training appear in the curves and the cost table (marked), not in the aggregates. Run by hand:

    python benchmarks/study_report.py ~/studies/bic_gravity ~/studies/bic_refs --reference docs/results/reference_single_0.json --out docs/results/bic_gravity
    python benchmarks/study_report.py --replot --out docs/results/bic_gravity    # learning_curves.png from curves.json
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
from contexts import eval_contexts, varied_features  # noqa: E402
from config import args_from_dict, method_name  # noqa: E402
from figures import study_learning_curves  # noqa: E402
from results import REGIMES, read_results  # noqa: E402


@dataclass(frozen=True)
class Args:
    studies: tyro.conf.Positional[tuple[str, ...]]
    """sweep.py study directories (each with study.json and one directory per run)."""
    reference: str = ""
    """evaluate.py reference file for the per-context normalisation (default: docs/results/reference_<setting>.json
    of the studies' setting)."""
    out: str = "docs/results/bic_gravity"
    """Output folder."""
    reps: int = 2000
    """Bootstrap resamples."""
    probe_episodes: int = 5
    """Policy episodes per grid context recorded for each probe."""
    probe_steps: int = 200
    """Policy steps per probe episode."""
    plausibility_episodes: int = 3
    """Policy episodes per grid context recorded for the plausibility measure (its start states)."""
    replot: bool = False
    """Only re-draw OUT/learning_curves.png from OUT/curves.json (no study directory needed: after a change of
    figures.py, for studies whose directories are gone)."""


def run_dirs(study: Path) -> list[Path]:
    return sorted(p for p in study.iterdir() if (p / "train").is_dir())


def run_label(run: Path) -> str:
    """METHOD_sSEED from the run's own configuration, not its directory's name: stages in separate directories
    may reuse a directory name (DALI-S_s0 trained with --ctx.cross-weight 1 is DALI-S-chi_s0, with
    --ctx.objective tc DALI-S-TC_s0)."""
    args = json.loads((run / "train" / "args.json").read_text())
    return f"{method_name(args_from_dict(args))}_s{args['seed']}"


REWARD_FOUND = (0.05, 0.2)
"""Levels of the mean imagined reward per step (actor_critic's `ac/imag_reward`) whose first crossing dates when a
run found the catch in imagination and when it exploited it (docs/results.md, stage 3)."""


def curve(run: Path) -> dict:
    """Evaluation returns, updates and hours of a run, and the first logged env step at which its mean imagined
    reward exceeded each REWARD_FOUND level (None: not yet), from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["eval/return"]) for r in rows if "eval/return" in r]
    last = [r for r in rows if "perf/updates" in r][-1] if rows else {}
    found = {f"{level:g}": next((r["step"] for r in rows if r.get("ac/imag_reward", 0.0) > level), None) for level in REWARD_FOUND}
    return {
        "steps": [s for s, _ in evals], "return": [v for _, v in evals], "env_steps": rows[-1]["step"] if rows else 0,
        "updates": int(last.get("perf/updates", 0)), "hours": float(last.get("perf/hours", 0.0)), "done": (run / "done").exists(),
        "imag_reward_above": found,
    }  # fmt: skip


def counterfactual(command: str, checkpoint: str, *flags: str) -> str:
    """Run `counterfactual.py COMMAND --checkpoint CHECKPOINT FLAGS`; its stdout."""
    cmd = [sys.executable, str(REPO / "counterfactual.py"), command, "--checkpoint", checkpoint, *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"error: counterfactual.py {command} on {checkpoint} failed (status {done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def probes(runs: list[Path], out: Path, args: Args) -> None:
    """counterfactual.py probe of every finished learned-context run, dream and plausibility of every deep
    one (files already in `out` are kept), and a table of the probes' held-out R^2 of each factor, over the
    grid and inside the training range."""
    rows = []
    for run in runs:
        train_args = json.loads((run / "train" / "args.json").read_text())
        if train_args["agent"]["context"] != "learned" or not (run / "done").exists():
            continue
        label, ckpt = run_label(run), str(run / "train" / "ckpt.pt")
        path = out / f"probe_{label}.json"
        if not path.exists():
            counterfactual("probe", ckpt, "--episodes", str(args.probe_episodes), "--steps", str(args.probe_steps), "--out", str(path))
        if train_args["agent"]["integration"] == "deep":
            varied = varied_features(train_args["task"], train_args["contexts"])
            for feature in varied:  # a dream per factor the run's setting varies; gravity keeps the plain name
                prefix = out / (f"dream_{label}" if feature == "gravity" else f"dream_{label}_{feature}")
                if not prefix.with_suffix(".png").exists():
                    counterfactual("dream", ckpt, "--feature", feature, "--out", str(prefix))
            if "gravity" in varied and not (out / f"plausibility_{label}.json").exists():  # plausibility reads gravity
                text = counterfactual("plausibility", ckpt, "--episodes", str(args.plausibility_episodes), "--out", str(out / f"plausibility_{label}.json"))
                (out / f"plausibility_{label}.txt").write_text(text)
        table = json.loads(path.read_text())
        for f in table["features"]:
            if table["r2_linear"].get(f) is not None:
                inside = (table.get("r2_linear_train_range") or {}).get(f)
                best = table["best_dim"][f]
                rows.append(f"| {run_label(run)} | {f} | {table['r2_linear'][f]:.3f} | {'-' if inside is None else f'{inside:.3f}'} "
                            f"| ctx[{best}]: {table['corr'][best][table['features'].index(f)]:.2f} |")  # fmt: skip
    if rows:
        head = [f"Probes: `counterfactual.py probe --episodes {args.probe_episodes} --steps {args.probe_steps}` on each run's final agent; "
                "a linear probe fit on every other grid context (in grid order) and tested on the rest.", "",
                "| run | factor | R^2, grid | R^2, inside the training range | best dimension: correlation |", "|---|---|---|---|---|"]  # fmt: skip
        (out / "probes.md").write_text("\n".join(head + rows) + "\n")
        print("\n".join(head + rows))


def context_table(files: list[Path]) -> str:
    """Each finished run's mean zero-shot return (over its episodes) per regime and per grid context, a row per run."""
    results = sorted((read_results(str(f)) for f in files), key=lambda r: (r.method, r.seed))
    task, setting = results[0].task, results[0].setting
    grid, varied = eval_contexts(task, setting), varied_features(task, setting)
    regimes = [reg for reg in REGIMES if reg == "all" or reg in results[0].regimes]
    head = f"| run | {' | '.join(regimes)} | " + " | ".join("/".join(f"{c[n]:g}" for n in varied) for c, _ in grid) + " |"
    lines = [f"{task} {setting}: mean zero-shot return per run; the context columns are {'/'.join(varied)}.", "", head,
             "|---" * (1 + len(regimes) + len(grid)) + "|"]  # fmt: skip
    for r in results:
        per_context = r.returns.mean(1)  # (contexts,)
        by_regime = [per_context[[reg == "all" or g == reg for g in r.regimes]].mean() for reg in regimes]
        lines.append(f"| {r.method} s{r.seed} | " + " | ".join(f"{v:.1f}" for v in by_regime) + " | " + " | ".join(f"{v:.0f}" for v in per_context) + " |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> None:
    out = Path(args.out)
    if args.replot:
        study_learning_curves(json.loads((out / "curves.json").read_text()), str(out / "learning_curves.png"))
        print(f"re-drew {out / 'learning_curves.png'} from {out / 'curves.json'}")
        return
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = [run for s in args.studies for run in run_dirs(Path(s).expanduser())]
    curves, files = {}, []
    for run in runs:
        label = run_label(run)
        if label in curves:
            raise SystemExit(f"error: two runs are {label}: {run} and another study directory")
        curves[label] = curve(run)
        setting = json.loads((run / "train" / "args.json").read_text())["contexts"]  # the study's grid is its training setting
        results = run / f"zeroshot_{setting}.jsonl"  # the run's own results, not a diagnostic's file beside it
        if (run / "done").exists() and results.exists():
            files.append(out / "runs" / f"{label}.jsonl")
            shutil.copyfile(results, files[-1])
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    levels = " / ".join(f"{v:g}" for v in REWARD_FOUND)
    lines = [f"| run | env steps | updates | hours | updates per hour | status | imagined reward first above {levels} at |", "|---|---|---|---|---|---|---|"]
    for name, c in curves.items():
        rate = c["updates"] / c["hours"] if c["hours"] else 0
        found = " / ".join("-" if c["imag_reward_above"][f"{v:g}"] is None else f"{c['imag_reward_above'][f'{v:g}'] / 1000:g}k" for v in REWARD_FOUND)
        lines.append(f"| {name} | {c['env_steps']:,} | {c['updates']:,} | {c['hours']:.2f} | {rate:,.0f} | {'done' if c['done'] else 'training'} | {found} |")
    (out / "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    study_learning_curves(curves, str(out / "learning_curves.png"))
    probes(runs, out, args)
    if not files:
        print("no finished runs yet: no aggregate")
        return
    table = context_table(files)
    (out / "contexts.md").write_text(table)
    print(table)
    reference = args.reference or f"docs/results/reference_{json.loads(files[0].read_text().splitlines()[0])['setting']}.json"
    for name, extra in (("zeroshot_R1000", []), ("zeroshot_per_context", ["--reference", reference])):
        cmd = [sys.executable, str(REPO / "evaluate.py"), "aggregate", *map(str, files), "--out", str(out / name), "--reps", str(args.reps), *extra]
        text = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
        (out / f"{name}.txt").write_text(text)
        print(text)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
