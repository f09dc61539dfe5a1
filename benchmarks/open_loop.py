"""How well does each world model imagine? Open-loop prediction error on one shared set of real episodes.

A diagnostic for the study's agents (DALI, Röder et al., arXiv:2508.20294, Sec. 6; DreamerV3's imagination,
Hafner et al. 2023, Sec. 2): the actor learns only from imagined rollouts, so a world model whose prior
cannot roll the task forward gives the actor nothing to learn from, however small its training loss. Here
one agent's policy (--recorder) records episodes on a setting's grid; every checkpoint then filters each
episode up to each of --starts with its own posterior (its own ctx, if it has one), imagines --horizon steps
open loop with the recorded actions (dreams.dream with no ctx shift: how the actor's rollouts begin), and
decodes. The error is the RMSE between decoded and real observations per imagined step, over all episodes
and start steps. Which policy records matters: a model is best on the states its own policy visits, so
measure on each agent's data in turn.

A deep (DALI-D) agent is measured twice: with ctx held from the start step, as imagination does ("held"),
and with the ctx its sequence model and heads would read on the real steps, as in training ("real"). A
large held-vs-real gap means training gave the world model something through ctx that imagination lacks
(docs/deep_context.md). For it the script also reports how far that ctx moves within an episode (mean L2
distance between the deep path's ctx at steps t and t - 1, and t and t - 15, steps >= 64) against how far
apart its mean at the lowest and highest grid values of the interpolation range lies.

    python benchmarks/open_loop.py --recorder ~/studies/bic_gravity/DALI-S_s0/train \\
        --checkpoints ~/studies/bic_gravity/DALI-S_s0/train ~/studies/bic_dali_d/DALI-D_s0/train --out open_loop.json

Features only (an image model's error would be in pixels). Run by hand, never by CI.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import envs  # noqa: E402
from checkpoint import load_agent  # noqa: E402
from counterfactual import OBS_NAMES  # noqa: E402
from dreams import decode, deep_path_context, dream, inferred_context  # noqa: E402
from config import method_name  # noqa: E402
from rollout import record  # noqa: E402


@dataclass(frozen=True)
class Args:
    recorder: str
    """The checkpoint whose policy records the real episodes (the same episodes for every model)."""
    checkpoints: tuple[str, ...]
    """The world models to measure (train.py runs, checkpoints or pretrained agents of the recorder's task)."""
    setting: str = "single_0"
    """Contexts to record: this setting's evaluation grid."""
    episodes: int = 4
    """Episodes per context."""
    starts: tuple[int, ...] = (64, 96, 128, 160, 192)
    """Real steps filtered before imagining (>= the context window K, so ctx has a full window)."""
    horizon: int = 15
    """Imagined steps (the actor's imagination horizon H is 15)."""
    seed: int = 200_000
    """Reset seed of the recorded episodes and the dreams' random numbers."""
    out: str = ""
    """Output JSON (default: print only)."""


@torch.no_grad()
def real_context_rollout(agent, ep, ctx: torch.Tensor, start: int, horizon: int, actions: torch.Tensor, seed: int) -> torch.Tensor:
    """A deep agent's open-loop rollout in which each imagined step's sequence model and heads read the ctx
    they read on the real step (`deep_path_context`) instead of the start's held one: (E, H+1, O) decoded."""
    torch.manual_seed(seed)  # the same random numbers as `dream`
    wm, is_first = agent.wm, ep.is_first
    seq, heads = deep_path_context(agent, ctx, is_first)  # (E, T, X) each
    embed = wm.encoder(ep.x[:, : start + 1].float())
    post, _ = wm.rssm.observe(embed, ep.action[:, : start + 1], is_first[:, : start + 1], ctx_seq=seq[:, : start + 1])
    state = {k: v[:, -1] for k, v in post.items()}
    feats = [wm.feat(state, heads[:, start])]
    for k in range(horizon):
        state = wm.rssm.img_step(state, actions[:, k], seq[:, start + 1 + k])
        feats.append(wm.feat(state, heads[:, start + 1 + k]))
    return decode(agent, torch.stack(feats, 1))


def context_movement(agent, ctx: torch.Tensor, is_first: torch.Tensor, values: np.ndarray, inside: np.ndarray) -> dict:
    """How far the deep path's ctx moves within an episode (mean L2 distance between steps t and t - 1, and t
    and t - 15, steps >= K: full windows), against the L2 distance between its means over the episodes at the
    lowest and at the highest interpolation value. ctx (E, T, X), is_first (E, T), values (E,) the varied
    feature, inside (E,) whether the episode's context is an interpolation one."""
    heads = deep_path_context(agent, ctx, is_first)[1][:, agent.ctx_cfg.window :]  # (E, T', X)
    lo, hi = (values == values[inside].min()) & inside, (values == values[inside].max()) & inside
    mean = lambda m: heads[torch.as_tensor(m)].flatten(0, 1).mean(0)  # noqa: E731
    return {"step_1": float((heads[:, 1:] - heads[:, :-1]).norm(dim=-1).mean()),
            "step_15": float((heads[:, 15:] - heads[:, :-15]).norm(dim=-1).mean()),
            "lowest_vs_highest": float((mean(lo) - mean(hi)).norm()), "values": [float(values[lo][0]), float(values[hi][0])]}  # fmt: skip


def open_loop_rmse(path: str, ep, starts: tuple[int, ...], horizon: int, seed: int) -> tuple[str, np.ndarray, np.ndarray | None]:
    """A checkpoint's label, its RMSE (H+1, O) between decoded and real observations (step 0 = filtered), and
    for a deep agent the same with the real steps' ctx (else None)."""
    args, agent, _ = load_agent(path)
    E, T = ep.x.shape[:2]
    if args.agent.context == "oracle":
        raise SystemExit(f"error: {path} is a --context oracle agent; this measures learned-context and context-free models")
    ctx = inferred_context(agent, ep, "cpu") if args.agent.context == "learned" else torch.zeros(E, T, 1)  # (E, T, X); unused without one
    deep = args.agent.context == "learned" and args.agent.integration == "deep"
    index, sq, sq_real = torch.arange(E), [], []
    for start in starts:
        actions = ep.action[:, start + 1 : start + 1 + horizon]  # (E, H, A): a_t for t = start .. start+H-1
        real = ep.x[:, start : start + horizon + 1].float()
        decoded = dream(agent, ep, ctx, index, start, horizon, actions, torch.zeros(1, ctx.shape[-1]), seed)[0]  # (E, H+1, O)
        sq.append((decoded - real) ** 2)  # (E, H+1, O)
        if deep:
            sq_real.append((real_context_rollout(agent, ep, ctx, start, horizon, actions, seed) - real) ** 2)
    label = f"{method_name(args)}_s{args.seed}"
    if deep:
        label += "_per_step" if args.ctx.refresh == 0 else f"_held{args.ctx.refresh}"
    rmse = lambda s: torch.cat(s).mean(0).sqrt().numpy()  # noqa: E731
    return label, rmse(sq), (rmse(sq_real) if deep else None)


def main(a: Args) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    args, recorder, _ = load_agent(a.recorder)
    if args.obs != "features":
        raise SystemExit(f"error: {a.recorder} is a --obs {args.obs} agent; open_loop.py measures feature models")
    steps = max(a.starts) + a.horizon + 1
    if min(a.starts) < 1 or steps > 1000 // args.action_repeat:
        raise SystemExit(f"error: --starts {a.starts} with --horizon {a.horizon} must lie in [1, {1000 // args.action_repeat - a.horizon - 1}]")
    grid = envs.eval_contexts(args.task, a.setting)
    jobs = [(c, a.seed + i * a.episodes + e) for i, (c, _) in enumerate(grid) for e in range(a.episodes)]
    ep = record(recorder, args.task, args.obs, args.action_repeat, jobs, steps, "cpu")
    names = OBS_NAMES.get(args.task, [f"obs[{i}]" for i in range(ep.x.shape[-1])])
    result = {"task": args.task, "setting": a.setting, "episodes": len(jobs), "starts": a.starts, "horizon": a.horizon,
              "recorder": a.recorder, "obs": names, "rmse": {}}  # fmt: skip
    print(f"{len(jobs)} episodes of {args.task} on {a.setting}, recorded by {a.recorder}; RMSE after k imagined steps from steps {a.starts}")
    feature = envs.varied_features(args.task, a.setting)[0]  # the (first) varied feature
    values = np.array([c[feature] for c, _ in jobs])  # (E,)
    inside = np.array([regime == "interpolation" for _, regime in grid for _ in range(a.episodes)])
    for path in a.checkpoints:
        label, rmse, rmse_real = open_loop_rmse(path, ep, a.starts, a.horizon, a.seed)
        result["rmse"][label] = {"checkpoint": path, "per_step": rmse.tolist()}
        rows = [("", rmse)]
        if rmse_real is not None:
            _, agent, _ = load_agent(path)
            moves = context_movement(agent, inferred_context(agent, ep, "cpu"), ep.is_first, values, inside)
            result["rmse"][label].update({"real_ctx_per_step": rmse_real.tolist(), "ctx_movement": moves})
            rows.append((" (real ctx)", rmse_real))
            print(f"\n{label}: the deep ctx moves {moves['step_1']:.2f} per step and {moves['step_15']:.2f} over 15 steps; its means "
                  f"at {feature} {moves['values'][0]} and {moves['values'][1]} lie {moves['lowest_vs_highest']:.2f} apart")  # fmt: skip
        for suffix, r in rows:
            print(f"\n{label}{suffix}\n{'obs':>10} " + " ".join(f"k={k:<5}" for k in (1, 5, 10, a.horizon)))
            for o, name in enumerate(names):
                print(f"{name:>10} " + " ".join(f"{r[k, o]:<7.3f}" for k in (1, 5, 10, a.horizon)))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
