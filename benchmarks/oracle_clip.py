"""Why does cRSSM-S break outside its training range? A diagnostic of the study's cRSSM-S agents (docs/results.md,
stage 2), run by hand, not a method: the agent is not changed or retrained.

cRSSM-S reads the true gravity normalised over the training range, (g - lo) / (hi - lo) * 2 - 1, which leaves
[-1, 1] in extrapolation (-1.8 at g = 0.98, +2.0 at 19.6): inputs its encoder never saw. This evaluates a
trained cRSSM-S agent zero-shot exactly as `evaluate.py run` does (same reset seeds, same action samples),
except that the context it reads is clipped to [-1, 1], i.e. every low gravity reads as the range's lowest
(4.9) and every high one as its highest (14.7). If out-of-range inputs are what breaks it, clipping recovers
the extrapolation returns; if the agent breaks because it cannot act in that physics, clipping does not help.

Inside the training range clipping changes nothing, so there the output must equal the study's results file
number for number: the script checks that (it proves that the evaluation is the study's) before it reports.

    python benchmarks/oracle_clip.py ~/studies/bic_crssm/cRSSM-S_s0 ~/studies/bic_crssm/cRSSM-S_s1   # -> docs/results/bic_gravity/oracle_clip/
"""

import json
import sys
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
from checkpoint import saved_args  # noqa: E402
import evaluate  # noqa: E402


def clipped_evaluation(run_dir: Path, out: Path) -> tuple[list[dict], list[dict]]:
    """(the study's rows, the rows with the context clipped to [-1, 1]) of one cRSSM-S run directory; the
    clipped rows are written to `out` (never into the run directory, where they would pass for its results)."""
    if (context := saved_args(run_dir / "train").agent.context) != "oracle":
        raise SystemExit(f"error: {run_dir} trained with --context {context}; only an oracle agent reads the true context")
    study = [json.loads(line) for line in (run_dir / "zeroshot_single_0.jsonl").read_text().splitlines()]
    normalize, clipped = envs.normalize_context, []

    def clip(task: str, context: dict) -> np.ndarray:
        true = normalize(task, context)
        clipped.append(bool((np.abs(true) > 1.0).any()))
        return np.clip(true, -1.0, 1.0)

    envs.normalize_context = clip
    tmp = out.with_suffix(".tmp")
    try:
        rows = evaluate.run(evaluate.Run(checkpoint=str(run_dir / "train" / "ckpt.pt"), setting="single_0", episodes=len(study[0]["returns"]),
                                         out=str(tmp), method="cRSSM-S (context clipped)", progress=False))  # fmt: skip
    finally:
        envs.normalize_context = normalize
    if not any(clipped):  # e.g. the environment no longer reads normalize_context through the module
        raise SystemExit(f"error: {run_dir}: no out-of-range context was clipped; the patch did not reach the evaluation")
    for s, c in zip(study, rows):
        if s["regime"] == "interpolation" and s["returns"] != c["returns"]:
            raise SystemExit(f"error: {run_dir}: at {s['context']} the clipped evaluation differs from the study's inside the training range")
    tmp.replace(out)  # only a checked evaluation lands beside the results
    return study, rows


def main(run_dirs: tyro.conf.Positional[tuple[str, ...]], out: str = "docs/results/bic_gravity/oracle_clip") -> None:
    """Evaluate each cRSSM-S run with its context clipped; print the per-context means beside the study's.

    Args:
        run_dirs: cRSSM-S run directories of a study (each with train/ckpt.pt and zeroshot_single_0.jsonl).
        out: Folder of the clipped evaluations, one RUN.jsonl per run.
    """
    for run_dir in map(Path, run_dirs):
        study, clipped = clipped_evaluation(run_dir, Path(out) / f"{run_dir.name}.jsonl")
        print(f"\n{run_dir.name}: mean return per gravity, as in the study / context clipped to [-1, 1]")
        for s, c in zip(study, clipped):
            print(f"  g = {s['context']['gravity']:6.3f} {s['regime']:13s} {s['mean']:6.1f} / {c['mean']:6.1f}")
        for regime in ("interpolation", "extrapolation"):
            pick = [i for i, s in enumerate(study) if s["regime"] == regime]
            print(f"  {regime}: {np.mean([study[i]['mean'] for i in pick]):.1f} / {np.mean([clipped[i]['mean'] for i in pick]):.1f}")


if __name__ == "__main__":
    tyro.cli(main)
