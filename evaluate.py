"""Zero-shot evaluation on unseen contexts and its statistics (DALI, Röder et al., arXiv:2508.20294, Sec. 6;
the statistics of Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice", as in rliable).

    python evaluate.py run --checkpoint runs/x/ckpt.pt --setting double_box --episodes 10
    python evaluate.py aggregate runs/*/zeroshot_single_0.jsonl --out zeroshot
    python evaluate.py reference --task ball_in_cup --setting single_0 --out docs/results/reference_single_0.json
    python evaluate.py aggregate runs/*/zeroshot_single_0.jsonl --reference docs/results/reference_single_0.json

`run` evaluates a trained agent on every context of a setting's evaluation grid (contexts.eval_contexts).
Each episode starts from a fresh latent state and an empty context window, so the agent infers the context
from scratch; nothing is learned between episodes. It writes one JSON line per context.

`aggregate` reads such files (methods x seeds). A score is a return R normalised by the task's maximum
(R / 1000 for DMC), or, with `--reference`, per context as the DALI release's analysis does (its
plot_rliable.py): (R - random_c) / (expert_c - random_c), where random_c is the mean return of a uniform
random policy in context c (`reference`) and expert_c is 1000, the release's fixed expert return for
ball_in_cup (it took walker's from expert runs trained per context, which this code has not). The score of
(seed, context) is its mean over episodes. Per regime (interpolation, extrapolation, mixed, and all contexts), with the seeds as runs and
the regime's contexts as tasks, it reports IQM, mean, median and optimality gap with stratified-bootstrap
95% CIs, and the probability of improvement of every method over every other (definitions: scores.py),
as a table, a JSON file and the paper's figure: IQM bars with CIs per regime and a P(X > Y) panel.
"""

from __future__ import annotations

import itertools
import json
import math
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
from checkpoint import checkpoint_path, load_agent, resolve_device
from dali import Agent, AgentConfig
from scores import METRICS, improvement_with_ci, metric_with_ci

MAX_RETURN = 1000.0  # DMC rewards are in [0, 1] per control step over 1000-step episodes
REGIMES = ("interpolation", "extrapolation", "mixed", "all")

# ----------------------------------------------------------------------------------------------------
# Acting: episodes in fixed contexts
# ----------------------------------------------------------------------------------------------------


def episode_returns(
    agent: Agent | RandomPolicy,
    task: str,
    obs: str,
    action_repeat: int,
    jobs: list[tuple[dict, int]],
    device: torch.device | str = "cpu",
    sample: bool = True,
    batch: int = 8,
    progress: tqdm | None = None,
) -> list[float]:
    """Return of one episode per (context, reset seed) job, `batch` envs acting in lockstep with the
    current policy (no learning). Every episode starts with a fresh agent state."""
    returns: list[float] = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        vec = envs.VectorEnv([envs.make_env(task, obs, [context], seed, action_repeat) for context, seed in chunk])
        o, info = vec.reset()
        state = agent.initial_state(vec.num_envs)
        total, done = np.zeros(vec.num_envs), np.zeros(vec.num_envs, bool)
        while not done.all():  # the VectorEnv auto-resets finished envs; their later rewards are ignored
            oracle = torch.as_tensor(info["context_vector"], device=device) if agent.cfg.context == "oracle" else None
            action, state = agent.act({k: torch.as_tensor(v, device=device) for k, v in o.items()}, state, sample=sample, context=oracle)
            o, reward, term, trunc, info = vec.step(action.cpu().numpy())
            total += reward * ~done
            done |= term | trunc
        vec.close()
        returns += total.tolist()
        if progress is not None:
            progress.update(len(chunk))
    return returns


def method_name(context: str, integration: str, cross_weight: float = 0.0) -> str:
    """The paper's name of a variant: Dreamer-DR, cRSSM-S/D, DALI-S/D (+chi with the cross-modal loss)."""
    if context == "none":
        return "Dreamer-DR"
    name = {"oracle": "cRSSM", "learned": "DALI"}[context] + "-" + integration[0].upper()
    return name + ("-chi" if context == "learned" and cross_weight else "")


class RandomPolicy:
    """Uniform random actions in [-1, 1]: the score-0 reference of the per-context normalisation. It has the
    acting interface of `Agent` (initial_state, act) so that `episode_returns` runs it like any agent."""

    cfg = AgentConfig(context="none")  # reads no true context

    def __init__(self, action_size: int, seed: int):
        self.action_size, self.rng = action_size, np.random.default_rng(seed)

    def initial_state(self, n: int) -> None:
        return None

    def act(self, obs: dict, state: None, sample: bool = True, context: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        n = len(obs["is_first"])
        return torch.as_tensor(self.rng.uniform(-1, 1, (n, self.action_size)).astype(np.float32)), None


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
# Results files
# ----------------------------------------------------------------------------------------------------


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
    return RunResult(path, head["task"], head["setting"], head["method"], int(head["seed"]), [r["regime"] for r in rows], returns)


@dataclass(frozen=True)
class Reference:
    """Per-context reference returns of one task's evaluation grid (`reference` writes them)."""

    path: str
    task: str
    setting: str
    random: np.ndarray  # (contexts,) random_c: mean return of the uniform random policy
    expert: np.ndarray  # (contexts,) expert_c


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
    return Reference(path, task, setting, random, expert)


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
        raise SystemExit("error: the files mix settings: " + ", ".join(f"{r.path} is {r.setting}" for r in results))
    by_method: dict[str, list[RunResult]] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    for method, runs in by_method.items():
        seeds = [r.seed for r in runs]
        if len(set(seeds)) < len(seeds):
            dup = sorted(s for s in set(seeds) if seeds.count(s) > 1)
            raise SystemExit(f"error: {method} has seed {dup[0]} twice: " + ", ".join(r.path for r in runs if r.seed == dup[0]))
    counts = {m: len(runs) for m, runs in by_method.items()}
    if len(set(counts.values())) > 1:
        raise SystemExit("error: unequal seed counts per method: " + ", ".join(f"{m} {n}" for m, n in counts.items()))
    if reference is not None:
        if (reference.task, reference.setting) != (results[0].task, results[0].setting):
            raise SystemExit(f"error: reference {reference.path} is {reference.task} {reference.setting}, the results are {results[0].task} {results[0].setting}")
        random_return, expert_return = reference.random, reference.expert  # (contexts,)
    elif expert_return <= random_return:
        raise SystemExit(f"error: --expert-return {expert_return} must exceed --random-return {random_return}")
    return {m: np.stack([(r.returns.mean(1) - random_return) / (expert_return - random_return) for r in runs]) for m, runs in by_method.items()}


def aggregate(
    results: list[RunResult], reps: int = 2000, seed: int = 0, random_return: float = 0.0, expert_return: float = MAX_RETURN,
    reference: Reference | None = None,
) -> dict:  # fmt: skip
    """Every metric with CIs per regime and method, and P(X > Y) for every ordered pair of methods."""
    scores = score_matrices(results, random_return, expert_return, reference)
    regimes = np.asarray(results[0].regimes)
    rng = np.random.default_rng(seed)
    norm = f"per context, {reference.path}" if reference is not None else f"(R - {random_return:g}) / ({expert_return:g} - {random_return:g})"
    out: dict = {"task": results[0].task, "setting": results[0].setting, "seeds": len(results) // len(scores), "normalisation": norm,
                 "metrics": {}, "improvement": {}}  # fmt: skip
    for reg in REGIMES:
        cols = np.ones(len(regimes), bool) if reg == "all" else regimes == reg
        if not cols.any():
            continue
        out["metrics"][reg] = {m: {name: metric_with_ci(x[:, cols], f, reps, rng) for name, f in METRICS.items()} for m, x in scores.items()}
        out["improvement"][reg] = {
            f"{a} > {b}": improvement_with_ci(scores[a][:, cols], scores[b][:, cols], reps, rng) for a, b in itertools.permutations(scores, 2)
        }
    return out


def format_table(summary: dict) -> str:
    fmt = lambda d: f"{d['value']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"  # noqa: E731
    lines = [f"{summary['task']} {summary['setting']}, {summary['seeds']} seeds per method, 95% stratified-bootstrap CIs, "
             f"scores normalised {summary.get('normalisation', '')}"]  # fmt: skip
    lines.append(f"{'regime':<14} {'method':<12} " + " ".join(f"{n:<22}" for n in METRICS))
    for reg, methods in summary["metrics"].items():
        for m, values in methods.items():
            lines.append(f"{reg:<14} {m:<12} " + " ".join(f"{fmt(values[n]):<22}" for n in METRICS))
    for reg, pairs in summary["improvement"].items():
        for pair, value in pairs.items():
            lines.append(f"{reg:<14} P({pair}) = {fmt(value)}")
    return "\n".join(lines)


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
    reference: str = ""
    """A `reference` file: normalise per context by its random_c and expert_c instead (the DALI release's way)."""
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
    method = cmd.method or method_name(args.agent.context, args.agent.integration, args.ctx.cross_weight)
    rows = evaluate_grid(agent, args.task, args.obs, args.action_repeat, cmd.setting, cmd.episodes, cmd.seed, device, cmd.mode == "sample", cmd.batch, cmd.progress)
    head = {"task": args.task, "setting": cmd.setting, "method": method, "seed": args.seed, "env_steps": ckpt["counters"]["env_steps"]}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps({**head, **row}) + "\n" for row in rows))
    tmp.replace(out)  # a crash never leaves a half-written results file under the real name
    by_regime: dict[str, list[float]] = {}
    for row in rows:
        by_regime.setdefault(row["regime"], []).append(row["mean"])
    print(f"{method} seed {args.seed} on {args.task} {cmd.setting}: " + ", ".join(f"{r} {np.mean(v):.1f}" for r, v in by_regime.items()) + f" -> {out}")
    return rows


def aggregate_main(cmd: Aggregate) -> dict:
    if not cmd.files:
        raise SystemExit("error: give at least one results file")
    for suffix in (".json", ".png"):
        writable_output(Path(cmd.out + suffix))
    reference = read_reference(cmd.reference) if cmd.reference else None
    results = [read_results(f) for f in cmd.files]
    summary = aggregate(results, cmd.reps, cmd.seed, cmd.random_return, cmd.expert_return, reference)
    print(format_table(summary))
    Path(cmd.out + ".json").write_text(json.dumps(summary, indent=1))
    figures.zeroshot_figure(summary, cmd.out + ".png")
    if results[0].setting != "default":
        returns = {m: np.stack([r.returns.mean(1) for r in results if r.method == m]) for m in dict.fromkeys(r.method for r in results)}
        features = {n: envs.task_features(results[0].task)[n] for n in envs.varied_features(results[0].task, results[0].setting)}
        grid = [c for c, _ in envs.eval_contexts(results[0].task, results[0].setting)]
        title = f"{results[0].task}, {results[0].setting}: zero-shot return per context"
        figures.return_by_context(returns, grid, features, cmd.out + "_contexts.png", title, None if reference is None else reference.random)
    print(f"wrote {cmd.out}.json, {cmd.out}.png and {cmd.out}_contexts.png")
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


Command = Union[
    Annotated[Run, tyro.conf.subcommand("run")],
    Annotated[Aggregate, tyro.conf.subcommand("aggregate")],
    Annotated[ReferenceReturns, tyro.conf.subcommand("reference")],
]


def main(argv: list[str] | None = None):
    cmd = tyro.cli(Command, args=argv, description=__doc__)
    if isinstance(cmd, Run):
        return run(cmd)
    return aggregate_main(cmd) if isinstance(cmd, Aggregate) else reference_main(cmd)


if __name__ == "__main__":
    main()
