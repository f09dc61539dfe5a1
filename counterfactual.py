"""What the learned context means: probes, counterfactual dreams and their physical plausibility
(DALI, Röder et al., arXiv:2508.20294, Sec. 6.3, "counterfactual consistency").

    python counterfactual.py probe --checkpoint RUN/ckpt.pt                  # which ctx dim encodes gravity?
    python counterfactual.py dream --checkpoint RUN/ckpt.pt --shifts -2 0 2  # imagine with that dim shifted
    python counterfactual.py plausibility --checkpoint RUN/ckpt.pt           # does the shift act like gravity?

Every subcommand first records policy episodes in the contexts of an evaluation grid and infers ctx_t at
every step exactly as when acting (the window of the current episode's transitions before t).

A counterfactual replaces ctx by ctx + m sigma_d e_d: dimension d shifted by m standard deviations, sigma_d
being the std of dimension d over many windows from many contexts. It is applied wherever the agent reads
ctx: a shallow (DALI-S) agent's posterior while filtering the real prefix; a deep (DALI-D) agent's sequence
model while filtering the prefix and at every imagined step (its posterior reads no ctx). The decoder of a
deep agent also reads ctx; it decodes with the unshifted ctx (--decode-shifted to change that), so that
what moves in a dream moved in the imagined dynamics. A shallow (DALI-S) agent reads ctx only in the posterior, so there the shift acts only through
the filtered start state; the paper's counterfactual analysis uses the deep variant. Every rollout of a
comparison uses the same random numbers, so m = 0 reproduces the unperturbed dream exactly. The dreams are
computed in dreams.py; the measures (probes, rank correlations with bootstrap CIs, real-env rollouts) are in
probes.py.
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

import envs
import figures
from checkpoint import load_agent, resolve_device
from dreams import ctx_sigma, dream, inferred_context, shift_deltas
from evaluate import writable_output
from probes import bootstrap_rank_corr, correlations, implied_gravity, probe_table, real_rollout
from rollout import Episodes, record

MIN_GRAVITY = 0.1  # m/s^2: a read-out below this (or negative) is run at this gravity in the real env
BALL_Z_VELOCITY = 7  # ball_in_cup features: qpos (cup x, cup z, ball x, ball z), then qvel in that order
OBS_NAMES = {"ball_in_cup": ["cup x", "cup z", "ball x", "ball z", "cup vx", "cup vz", "ball vx", "ball vz"]}

# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where the agent and its episodes come from."""

    checkpoint: str
    """A train.py checkpoint of a learned-context agent (--context learned)."""
    setting: str = ""
    """Contexts to record: this setting's evaluation grid (default: the run's training setting)."""
    episodes: int = 2
    """Episodes per context."""
    steps: int = 150
    """Policy steps recorded per episode."""
    seed: int = 200_000
    """Reset seed of the recorded episodes and of the dreams' random numbers."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available."""
    threads: int = 1
    """torch CPU threads (1 is robust beside other jobs; 0: one per core)."""


@dataclass(frozen=True)
class Probe(Source):
    """Which ctx dimension encodes which physical factor? Correlation of every dimension with every true
    context feature, and the held-out R^2 of a linear probe from ctx (test contexts: every other one)."""

    out: str = ""
    """Output JSON (default: probe.json next to the checkpoint)."""


@dataclass(frozen=True)
class Dream(Source):
    """What does the world model imagine if dimension d of ctx were shifted by m sigma_d? Plots the decoded
    features (or a GIF of decoded frames) of the original and the counterfactual rollouts side by side."""

    feature: str = "gravity"
    """The factor whose best-correlated dimension is shifted (ignored when --dim is given)."""
    dim: int = -1
    """ctx dimension to shift (-1: the one that best encodes --feature)."""
    shifts: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
    """Shifts m, in units of sigma_d."""
    horizon: int = 50
    """Imagined steps H."""
    start: int = 90
    """Real steps filtered before imagining (>= the window K gives a full context window)."""
    actions: Literal["recorded", "zero"] = "recorded"
    """Actions during imagination: the ones the policy took in reality, or zeros."""
    context_index: int = 0
    """Which recorded episode to start from (an index into the grid x episodes)."""
    decode_shifted: bool = False
    """Decode a deep agent's dream with the shifted ctx (default: the unshifted one, so that only changes of
    the imagined dynamics show)."""
    out: str = ""
    """Output prefix (default: dream next to the checkpoint): writes PREFIX.png (+ PREFIX.gif for pixels)."""


@dataclass(frozen=True)
class Plausibility(Source):
    """Does shifting the gravity dimension change imagined physics the way gravity does? For ball_in_cup,
    per shift m: the gravity a linear probe reads from the shifted ctx; the ball's mean vertical
    acceleration in the decoded dream and in the real env run from the same states at that gravity; and
    the gravity the dream looks like (the real rollout over a grid of gravities closest to the decoded ball
    trajectory). Plausible: the dream's gravity rises with the gravity read (rank correlation near 1).
    Rank correlations come with 95% bootstrap CIs over the start states. The real-env correlation checks the
    physics and the linear read-out, not the model."""

    shifts: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
    """Shifts m, in units of sigma_d."""
    horizon: int = 15
    """Imagined steps H."""
    start: int = 100
    """Real steps filtered before imagining."""
    starts: int = 0
    """Start states (recorded episodes) averaged over; 0: all. Fewer than ~20 gives noisy means."""
    actions: Literal["recorded", "zero"] = "recorded"
    """Actions during imagination and in the real env."""
    decode_shifted: bool = False
    """Decode a deep agent's dream with the shifted ctx (default: the unshifted one, so that only changes of
    the imagined dynamics show)."""
    out: str = ""
    """Output JSON (default: plausibility.json next to the checkpoint)."""


def load(src: Source) -> tuple:
    """Agent, saved args, device, recorded episodes, their inferred ctx and the probe steps."""
    if src.threads < 0:
        raise SystemExit(f"error: --threads {src.threads}: must be >= 0 (0: one per core)")
    if src.threads:
        torch.set_num_threads(src.threads)
    torch.manual_seed(src.seed)  # the policy's sampled actions while recording
    device = resolve_device(src.device)
    args, agent, _ = load_agent(src.checkpoint, device)
    if args.agent.context != "learned":
        raise SystemExit(f"error: {src.checkpoint} is a --context {args.agent.context} agent; counterfactual.py needs --context learned")
    setting = src.setting or args.contexts
    if setting not in ("single_0", "single_1", "double_box"):
        raise SystemExit(f"error: setting {setting!r} does not vary the context; pass --setting single_0, single_1 or double_box")
    if src.steps < 2 or src.episodes < 1:
        raise SystemExit(f"error: --steps {src.steps} (>= 2) and --episodes {src.episodes} (>= 1)")
    grid = envs.eval_contexts(args.task, setting)
    _check_shift_flags(src, args, len(grid) * src.episodes)  # before recording, which takes a while
    jobs = [(c, src.seed + i * src.episodes + e) for i, (c, _) in enumerate(grid) for e in range(src.episodes)]
    ep = record(agent, args.task, args.obs, args.action_repeat, jobs, src.steps, device)
    ctx = inferred_context(agent, ep, device)
    first = min(args.ctx.window, src.steps // 2)  # probe steps: full windows where the episode allows
    return agent, args, device, ep, ctx, first


def out_path(src: Source, given: str, name: str) -> Path:
    """--out, or NAME next to the checkpoint; its folder is created and checked writable before any work."""
    return writable_output(Path(given) if given else Path(src.checkpoint).parent / name)


def probe_main(cmd: Probe) -> dict:
    path = out_path(cmd, cmd.out, "probe.json")
    agent, args, _, ep, ctx, first = load(cmd)
    names = list(envs.task_features(args.task))
    probe_steps = ctx[:, first :: max(1, (cmd.steps - first) // 16)].cpu().numpy()  # (E, P, X), ~16 per episode
    held_out = (np.arange(len(ep.contexts)) // cmd.episodes) % 2 == 1  # every other context is held out
    features = envs.task_features(args.task)
    inside = np.array([all(features[n].inside(c[n]) for n in names) for c in ep.contexts])
    table = probe_table(probe_steps, ep.true_context, held_out, names, inside)
    table["sigma"] = ctx_sigma(ctx, first).tolist()
    X = ctx.shape[-1]
    print(f"{'dim':>4} " + " ".join(f"corr({n})".rjust(22) for n in names))
    for d in range(X):
        print(f"{d:>4} " + " ".join(f"{float('nan') if table['corr'][d][f] is None else table['corr'][d][f]:22.3f}" for f in range(len(names))))
    print("held-out linear probe R^2, whole grid: " + ", ".join(f"{n} {v:.3f}" for n, v in table["r2_linear"].items() if v is not None))
    if "r2_linear_train_range" in table:
        print("held-out linear probe R^2, inside the training range: "
              + ", ".join(f"{n} {v:.3f}" for n, v in table["r2_linear_train_range"].items() if v is not None))  # fmt: skip
    print("best dimension: " + ", ".join(f"{n} -> ctx[{d}]" for n, d in table["best_dim"].items()))
    path.write_text(json.dumps(table, indent=1))
    print(f"wrote {path}")
    return table


def _check_shift_flags(cmd: Source, args, episodes: int) -> None:
    """Flags of dream / plausibility that can be checked before recording."""
    if not isinstance(cmd, (Dream, Plausibility)):
        return
    names = list(envs.task_features(args.task))
    feature = getattr(cmd, "feature", "gravity")
    if feature not in names:
        raise SystemExit(f"error: --feature {feature!r} is not a context feature of {args.task}; choose one of {names}")
    dim = getattr(cmd, "dim", -1)
    if dim >= args.ctx.dim or dim < -1:
        raise SystemExit(f"error: --dim {dim} outside the {args.ctx.dim} ctx dimensions (0 .. {args.ctx.dim - 1}, or -1: the best one)")
    if not 0 <= getattr(cmd, "context_index", 0) < episodes:
        raise SystemExit(f"error: --context-index {cmd.context_index} outside the {episodes} recorded episodes")
    if cmd.start >= cmd.steps or cmd.start < 1:
        raise SystemExit(f"error: --start {cmd.start} must lie in [1, --steps {cmd.steps})")
    if cmd.start + cmd.horizon >= cmd.steps:  # recorded actions and the real continuation end at step steps - 1
        raise SystemExit(f"error: --start {cmd.start} + --horizon {cmd.horizon} must stay below the {cmd.steps} recorded steps (raise --steps)")


def _shift_setup(cmd, args, ep, ctx, first, feature: str, dim: int):
    """The dimension to shift (by correlation over all recorded windows) and sigma."""
    names = list(envs.task_features(args.task))
    _, best = correlations(ctx[:, first:].cpu().numpy(), ep.true_context, names)
    if dim < 0:
        if feature not in best:
            raise SystemExit(f"error: {feature!r} does not vary in the recorded setting; choose one of {list(best)}")
        dim = best[feature]
    return dim, ctx_sigma(ctx, first)


def _actions(cmd, ep: Episodes, index: torch.Tensor) -> torch.Tensor:
    """(N, H, A): a_t for t = start .. start + H - 1 (stored at t + 1), or zeros."""
    if cmd.actions == "zero":
        return torch.zeros(len(index), cmd.horizon, ep.action.shape[-1])
    return ep.action[index, cmd.start + 1 : cmd.start + 1 + cmd.horizon]


def dream_main(cmd: Dream) -> dict:
    prefix = out_path(cmd, cmd.out, "dream")
    agent, args, device, ep, ctx, first = load(cmd)
    dim, sigma = _shift_setup(cmd, args, ep, ctx, first, cmd.feature, cmd.dim)
    index = torch.tensor([cmd.context_index])
    deltas = shift_deltas(cmd.shifts, dim, sigma, ctx.shape[-1])
    decoded = dream(agent, ep, ctx, index, cmd.start, cmd.horizon, _actions(cmd, ep, index), deltas, cmd.seed, cmd.decode_shifted)[:, 0].cpu().numpy()
    real = ep.x[cmd.context_index, cmd.start : cmd.start + cmd.horizon + 1].numpy()
    title = f"{args.task} {ep.contexts[cmd.context_index]}: ctx[{dim}] + m sigma ({cmd.actions} actions)"
    if agent.spaces.image is None:
        figures.dream_figure(decoded, real, cmd.shifts, title, str(prefix) + ".png", OBS_NAMES.get(args.task))
    else:
        figures.dream_gif(decoded, real, str(prefix) + ".gif")
    print(f"shifted ctx[{dim}] (sigma {sigma[dim]:.3f}) by m in {list(cmd.shifts)}; wrote {prefix}.{'png' if agent.spaces.image is None else 'gif'}")
    return {"dim": dim, "sigma": float(sigma[dim]), "decoded": decoded}


def plausibility_main(cmd: Plausibility) -> dict:
    path = out_path(cmd, cmd.out, "plausibility.json")
    agent, args, device, ep, ctx, first = load(cmd)
    if args.task != "ball_in_cup" or args.obs != "features":
        raise SystemExit(f"error: plausibility measures the ball's acceleration: it needs ball_in_cup with features, not {args.task} {args.obs}")
    dim, sigma = _shift_setup(cmd, args, ep, ctx, first, "gravity", -1)
    # A linear read-out of gravity from ctx (fitted on every recorded window) maps each shifted ctx to the
    # gravity the shift stands for: the real env is then run at that gravity.
    X, probe_x = ctx.shape[-1], ctx[:, first:].cpu().numpy()
    gravity_true = np.asarray([c["gravity"] for c in ep.contexts])
    fit = lambda x: np.concatenate([x, np.ones((len(x), 1))], 1)  # noqa: E731
    w = np.linalg.lstsq(fit(probe_x.reshape(-1, X)), np.repeat(gravity_true, probe_x.shape[1]), rcond=None)[0]
    rng = np.random.default_rng(cmd.seed)
    n_starts = len(ep.contexts) if cmd.starts <= 0 else min(cmd.starts, len(ep.contexts))
    chosen = torch.as_tensor(np.sort(rng.choice(len(ep.contexts), size=n_starts, replace=False)))
    M, N = len(cmd.shifts), len(chosen)
    deltas = shift_deltas(cmd.shifts, dim, sigma, X)
    actions = _actions(cmd, ep, chosen)  # (N, H, A)
    decoded = dream(agent, ep, ctx, chosen, cmd.start, cmd.horizon, actions, deltas, cmd.seed, cmd.decode_shifted).cpu().numpy()  # (M, N, H+1, O)
    env = envs.make_env(args.task, "features", None, 0, args.action_repeat)
    dt = env.control_timestep * args.action_repeat
    accel = lambda traj: np.diff(traj[..., BALL_Z_VELOCITY], axis=-1).mean(-1) / dt  # noqa: E731  mean over the horizon
    imagined = accel(decoded)  # (M, N)
    start_ctx = (ctx[chosen, cmd.start][None] + deltas[:, None]).cpu().numpy()  # (M, N, X)
    gravity = np.clip(fit(start_ctx.reshape(M * N, X)) @ w, MIN_GRAVITY, None).reshape(M, N)  # the gravity each shifted ctx reads as
    real = np.zeros((M, N))
    for m in range(M):
        for n, e in enumerate(chosen.tolist()):
            context = {**ep.contexts[e], "gravity": float(gravity[m, n])}
            real[m, n] = accel(real_rollout(env, context, ep.physics[e, cmd.start], actions[n].numpy()))
    grid = np.asarray(sorted(set(envs.CONTEXT_FEATURES[args.task]["gravity"].interpolation + envs.CONTEXT_FEATURES[args.task]["gravity"].extrapolation)))
    implied = implied_gravity(decoded, env, [ep.contexts[e] for e in chosen.tolist()], ep.physics[chosen.numpy(), cmd.start], actions.numpy(), grid)
    corr = {name: bootstrap_rank_corr(gravity, y, seed=cmd.seed) for name, y in (("imagined", imagined), ("real", real), ("implied", implied))}
    g_mean, a_imag, a_real, g_implied = gravity.mean(1), imagined.mean(1), real.mean(1), implied.mean(1)
    result = {
        "dim": dim, "sigma": float(sigma[dim]), "shifts": list(cmd.shifts), "starts": N, "decode_shifted": cmd.decode_shifted,
        "gravity": g_mean.tolist(), "imagined_acceleration": a_imag.tolist(), "real_acceleration": a_real.tolist(),
        "implied_gravity": g_implied.tolist(),
        **{f"rank_corr_{k}": v[0] for k, v in corr.items()}, **{f"rank_corr_{k}_ci95": [v[1], v[2]] for k, v in corr.items()},
    }  # fmt: skip
    print(f"ctx[{dim}] shifted by m sigma (sigma {sigma[dim]:.3f}); means over {N} start states, {cmd.horizon} steps, {cmd.actions} actions, "
          f"decoded with the {'shifted' if cmd.decode_shifted else 'unshifted'} ctx")  # fmt: skip
    print(f"{'m':>6} {'gravity read':>13} {'ball accel, dream':>18} {'ball accel, real env':>21} {'gravity the dream looks like':>29}")
    for m, g, ai, ar, gi in zip(cmd.shifts, g_mean, a_imag, a_real, g_implied):
        print(f"{m:>6g} {g:>13.2f} {ai:>18.2f} {ar:>21.2f} {gi:>29.2f}")
    fmt = lambda k: f"{corr[k][0]:.2f} [{corr[k][1]:.2f}, {corr[k][2]:.2f}]"  # noqa: E731
    print(f"rank correlation with the gravity read (95% CI over start states): ball acceleration in the dream {fmt('imagined')}; "
          f"gravity the dream looks like {fmt('implied')} (plausible: near 1). In the real env {fmt('real')}: a check of "
          "the physics and the read-out, not evidence about the model.")  # fmt: skip
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


Command = Union[
    Annotated[Probe, tyro.conf.subcommand("probe")],
    Annotated[Dream, tyro.conf.subcommand("dream")],
    Annotated[Plausibility, tyro.conf.subcommand("plausibility")],
]


def main(argv: list[str] | None = None):
    cmd = tyro.cli(Command, args=argv, description=__doc__)
    return {Probe: probe_main, Dream: dream_main, Plausibility: plausibility_main}[type(cmd)](cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
