"""Zero-shot evaluation on unseen contexts (DALI, Röder et al., arXiv:2508.20294, Sec. 6): the commands.

    python evaluate.py run --checkpoint runs/x/ckpt.pt --setting double_box --episodes 10
    python evaluate.py aggregate runs/*/zeroshot_single_0.jsonl --out zeroshot
    python evaluate.py reference --task ball_in_cup --setting single_0 --out docs/results/reference_single_0.json
    python evaluate.py aggregate runs/*/zeroshot_single_0.jsonl --reference docs/results/reference_single_0.json
    python evaluate.py aggregate --pool S0/*.jsonl S1/*.jsonl DB/*.jsonl --reference REF_S0 REF_S1 REF_DB --out pooled
    python evaluate.py export --checkpoint runs/x --out pretrained/x.pt

`run` evaluates a trained agent on every context of a setting's evaluation grid (contexts.eval_contexts).
Each episode starts from a fresh latent state and an empty context window, so the agent infers the context
from scratch; nothing is learned between episodes (rollout.py acts). It writes one JSON line per context.

`aggregate` reads such files (methods x seeds) and reports IQM, mean, median and optimality gap per regime
with stratified-bootstrap 95% CIs and the probability of improvement of every method over every other
(results.py; scores normalised by R / 1000 or, with `--reference`, per context as in the DALI release), as a
table, a JSON file, the paper's figure (IQM bars per regime and a P(X > Y) panel) and the return against
each varied context feature. With `--pool` it pools files of several training settings of one task into one
regime table as the DALI release does (pooled.py). `reference` measures random_c, a uniform random policy's return per context.
`export` writes a trained agent's weights alone (a pretrained agent of a few MB that `run`, film.py and
counterfactual.py load like a checkpoint).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import torch
import tyro
from tqdm import tqdm

import envs
import figures
from checkpoint import checkpoint_path, export_agent, load_agent, resolve_device
from config import args_from_dict, method_name
from dali import Agent
from rollout import RandomPolicy, episode_returns
from pooled import format_pooled, pool
from results import MAX_RETURN, Reference, RunResult, aggregate, format_table, read_reference, read_results


def evaluate_grid(
    agent: Agent | RandomPolicy,
    task: str,
    obs: str,
    action_repeat: int,
    setting: str,
    episodes: int,
    seed: int,
    device: torch.device | str = "cpu",
    sample: bool = True,
    batch: int = 8,
    progress: bool = False,
) -> list[dict]:
    """Every context of `setting`'s grid, `episodes` episodes each: one dict per context with the context,
    its regime, the returns, their mean and std. Reset seeds are seed + job index (the same for every agent)."""
    grid = envs.eval_contexts(task, setting)
    jobs = [(context, seed + i * episodes + e) for i, (context, _) in enumerate(grid) for e in range(episodes)]
    bar = tqdm(total=len(jobs), unit="episode", desc=f"{task} {setting}", disable=not progress, dynamic_ncols=True)
    returns = np.asarray(episode_returns(agent, task, obs, action_repeat, jobs, device, sample, batch, bar)).reshape(len(grid), episodes)
    bar.close()
    return [
        {"context": context, "regime": reg, "returns": r.tolist(), "mean": float(r.mean()), "std": float(r.std())}
        for (context, reg), r in zip(grid, returns)
    ]



# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Evaluate a checkpoint zero-shot on every context of an evaluation grid."""

    checkpoint: str
    """A train.py run directory or its checkpoint (RUN or RUN/ckpt.pt)."""
    setting: envs.Setting = "double_box"
    """Evaluation grid: single_0 / single_1 / double_box (contexts.eval_contexts), or default."""
    episodes: int = 10
    """Episodes per context."""
    out: str = ""
    """Output JSON-lines file (default: zeroshot_<setting>.jsonl next to the checkpoint); folders are created."""
    method: str = ""
    """Method name in the output (default: from the checkpoint, e.g. DALI-S, Dreamer-DR)."""
    seed: int = 100_000
    """Base reset seed of the evaluation episodes (the same for every agent) and of the policy's samples."""
    batch: int = 8
    """Envs acting in lockstep."""
    mode: Literal["sample", "mode"] = "sample"
    """Actions sampled from the policy (the DALI paper) or its mode."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available."""
    threads: int = 1
    """torch CPU threads (1 is robust beside other jobs; 0: one per core)."""
    progress: bool = True
    """Show a progress bar on stderr."""


@dataclass(frozen=True)
class Aggregate:
    """Aggregate results files (methods x seeds) into IQM, mean, median, optimality gap and P(X > Y)."""

    files: tyro.conf.Positional[tuple[str, ...]]
    """Output files of `evaluate.py run`, one per (method, seed)."""
    out: str = "zeroshot"
    """Writes OUT.json (every number), OUT.png (the paper's figure) and OUT_contexts.png (return against each
    varied feature); folders are created."""
    random_return: float = 0.0
    """Return of a random policy (score 0), the same in every context."""
    expert_return: float = MAX_RETURN
    """Return of an expert (score 1), the same in every context; default the task's maximum return."""
    reference: tuple[str, ...] = ()
    """A `reference` file: normalise per context by its random_c and expert_c instead (the DALI release's way);
    with --pool, one per pooled setting."""
    pool: bool = False
    """Pool files of several training settings of one task (single_0, single_1, double_box) into one regime
    table as the DALI release does (pooled.py): per setting and pooled, with stratified and whole-seed CIs.
    Writes OUT.json, OUT.txt, OUT.png and OUT_<setting>_contexts.png."""
    action_repeat: int = 0
    """With --pool: the action repeat of results files that record none and have no train.py args.json beside
    them (files before 2026-12-03); 0 refuses such files."""
    reps: int = 2000
    """Bootstrap resamples (rliable uses 50000; 2000 gives CI ends to about +-0.01)."""
    seed: int = 0
    """Bootstrap seed."""


@dataclass(frozen=True)
class ReferenceReturns:
    """Measure random_c, the return of a uniform random policy, in every context of an evaluation grid."""

    task: envs.Task = "ball_in_cup"
    """Contextual DMC task."""
    setting: envs.Setting = "single_0"
    """Evaluation grid (contexts.eval_contexts)."""
    episodes: int = 20
    """Episodes per context."""
    action_repeat: int = 2
    """Control steps per random decision: that of the agents compared (train.py --action-repeat)."""
    seed: int = 200_000
    """Base reset seed of the episodes and seed of the random actions."""
    out: str = "docs/results/reference.json"
    """Output JSON file; folders are created."""
    batch: int = 10
    """Envs stepping in lockstep."""


@dataclass(frozen=True)
class Export:
    """Write a trained agent's weights alone (no replay, optimisers or random streams): a pretrained agent."""

    checkpoint: str
    """A train.py run directory or its checkpoint."""
    out: str
    """The pretrained agent's file, e.g. pretrained/walker_dali_s.pt; folders are created."""


def writable_output(path: Path) -> Path:
    """Create the parent folders of an output file and check that it can be written, before any work."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(path.name + ".probe")
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write {path} ({e.strerror})") from None
    return path


def run(cmd: Run) -> list[dict]:
    if cmd.episodes < 1:
        raise SystemExit(f"error: --episodes {cmd.episodes}: must be >= 1")
    if cmd.threads < 0:
        raise SystemExit(f"error: --threads {cmd.threads}: must be >= 0 (0: one per core)")
    if cmd.threads:
        torch.set_num_threads(cmd.threads)
    device = resolve_device(cmd.device)
    path = checkpoint_path(cmd.checkpoint)
    out = writable_output(Path(cmd.out) if cmd.out else path.parent / f"zeroshot_{cmd.setting}.jsonl")
    args, agent, ckpt = load_agent(path, device)
    torch.manual_seed(cmd.seed)  # sampled actions and latents: an evaluation rerun gives the same numbers
    if cmd.setting != "default" and args.contexts not in ("default", cmd.setting):
        print(f"note: the agent trained on {args.contexts} contexts and is evaluated on the {cmd.setting} grid", file=sys.stderr)
    method = cmd.method or method_name(args)
    rows = evaluate_grid(agent, args.task, args.obs, args.action_repeat, cmd.setting, cmd.episodes, cmd.seed, device, cmd.mode == "sample", cmd.batch, cmd.progress)
    head = {"task": args.task, "setting": cmd.setting, "method": method, "seed": args.seed, "env_steps": ckpt["counters"]["env_steps"],
            "action_repeat": args.action_repeat}  # fmt: skip
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps({**head, **row}) + "\n" for row in rows))
    tmp.replace(out)  # a crash never leaves a half-written results file under the real name
    by_regime: dict[str, list[float]] = {}
    for row in rows:
        by_regime.setdefault(row["regime"], []).append(row["mean"])
    print(f"{method} seed {args.seed} on {args.task} {cmd.setting}: " + ", ".join(f"{r} {np.mean(v):.1f}" for r, v in by_regime.items()) + f" -> {out}")
    return rows


def contexts_figure(results: list[RunResult], reference: Reference | None, path: str) -> None:
    """Return against each varied feature of the files' setting, one line per method (figures.return_by_context)."""
    returns = {m: np.stack([r.returns.mean(1) for r in results if r.method == m]) for m in dict.fromkeys(r.method for r in results)}
    features = {n: envs.task_features(results[0].task)[n] for n in envs.varied_features(results[0].task, results[0].setting)}
    grid = [c for c, _ in envs.eval_contexts(results[0].task, results[0].setting)]
    title = f"{results[0].task}, {results[0].setting}: zero-shot return per context"
    figures.return_by_context(returns, grid, features, path, title, None if reference is None else reference.random)


def aggregate_main(cmd: Aggregate) -> dict:
    if not cmd.files:
        raise SystemExit("error: give at least one results file")
    for suffix in (".json", ".png"):
        writable_output(Path(cmd.out + suffix))
    if cmd.pool:
        return pool_main(cmd)
    if len(cmd.reference) > 1:
        raise SystemExit(f"error: {len(cmd.reference)} reference files without --pool: give one, of the files' setting")
    reference = read_reference(cmd.reference[0]) if cmd.reference else None
    results = [read_results(f) for f in cmd.files]
    summary = aggregate(results, cmd.reps, cmd.seed, cmd.random_return, cmd.expert_return, reference)
    print(format_table(summary))
    Path(cmd.out + ".json").write_text(json.dumps(summary, indent=1))
    figures.zeroshot_figure(summary, cmd.out + ".png")
    if results[0].setting != "default":
        contexts_figure(results, reference, cmd.out + "_contexts.png")
    print(f"wrote {cmd.out}.json, {cmd.out}.png and {cmd.out}_contexts.png")
    return summary


def pool_main(cmd: Aggregate) -> dict:
    """--pool: the release's pooled regime table (pooled.py), each setting normalised by its own reference."""
    if (cmd.random_return, cmd.expert_return) != (0.0, MAX_RETURN):
        raise SystemExit("error: --pool normalises by R / 1000 or, with --reference, per context; --random-return and --expert-return do not apply")
    results = [read_results(f) for f in cmd.files]
    references = None
    if cmd.reference:
        refs = [read_reference(f) for f in cmd.reference]
        references = {r.setting: r for r in refs}
        if len(references) < len(refs):
            raise SystemExit("error: two reference files of one setting: " + ", ".join(f"{r.path} is {r.setting}" for r in refs))
    summary = pool(results, references, cmd.reps, cmd.seed, cmd.action_repeat)
    table = format_pooled(summary)
    print(table)
    Path(cmd.out + ".json").write_text(json.dumps(summary, indent=1))
    Path(cmd.out + ".txt").write_text(table + "\n")
    seeds = "; ".join(f"{m} " + "/".join(map(str, per.values())) for m, per in summary["seeds"].items())
    figures.zeroshot_figure(summary, cmd.out + ".png", f"{summary['task']}, {summary['setting']}: zero-shot; seeds {seeds}")
    for setting in summary["settings"]:
        contexts_figure([r for r in results if r.setting == setting], (references or {}).get(setting), f"{cmd.out}_{setting}_contexts.png")
    print(f"wrote {cmd.out}.json, {cmd.out}.txt, {cmd.out}.png and {cmd.out}_<setting>_contexts.png for " + ", ".join(summary["settings"]))
    return summary


def reference_main(cmd: ReferenceReturns) -> dict:
    """random_c per context (mean and every episode's return) and expert_c = MAX_RETURN, as one JSON file."""
    if cmd.episodes < 1 or cmd.action_repeat < 1:
        raise SystemExit(f"error: --episodes {cmd.episodes}, --action-repeat {cmd.action_repeat}: both must be >= 1")
    out = writable_output(Path(cmd.out))
    policy = RandomPolicy(envs.make_env(cmd.task).action_size, cmd.seed)
    rows = evaluate_grid(policy, cmd.task, "features", cmd.action_repeat, cmd.setting, cmd.episodes, cmd.seed, "cpu", True, cmd.batch)
    command = f"python evaluate.py reference --task {cmd.task} --setting {cmd.setting} --episodes {cmd.episodes} --action-repeat {cmd.action_repeat} --seed {cmd.seed} --out {cmd.out}"
    ref = {
        "task": cmd.task, "setting": cmd.setting, "episodes": cmd.episodes, "action_repeat": cmd.action_repeat, "seed": cmd.seed,
        "command": command, "random": "mean over the episodes of a uniform random policy", "expert": f"{MAX_RETURN:g} in every context",
        "contexts": [{"context": r["context"], "regime": r["regime"], "random_mean": r["mean"], "random_std": r["std"],
                      "random_returns": r["returns"], "expert": MAX_RETURN} for r in rows],
    }  # fmt: skip
    out.write_text(json.dumps(ref, indent=1))
    print("\n".join(f"{r['context']} {r['regime']}: random {r['mean']:.1f} +- {r['std']:.1f}" for r in rows) + f"\nwrote {out}")
    return ref


def export_main(cmd: Export) -> Path:
    out = writable_output(Path(cmd.out))
    payload = export_agent(cmd.checkpoint, out)
    args = payload["args"]
    print(f"{args['task']} {method_name(args_from_dict(args))} seed {args['seed']} "
          f"at {payload['counters']['env_steps']} env steps -> {out} ({out.stat().st_size / 1e6:.1f} MB)")  # fmt: skip
    return out


Command = Union[
    Annotated[Run, tyro.conf.subcommand("run")],
    Annotated[Aggregate, tyro.conf.subcommand("aggregate")],
    Annotated[ReferenceReturns, tyro.conf.subcommand("reference")],
    Annotated[Export, tyro.conf.subcommand("export")],
]


def main(argv: list[str] | None = None):
    cmd = tyro.cli(Command, args=argv, description=__doc__)
    commands = {Run: run, Aggregate: aggregate_main, ReferenceReturns: reference_main, Export: export_main}
    return commands[type(cmd)](cmd)


if __name__ == "__main__":
    main()
