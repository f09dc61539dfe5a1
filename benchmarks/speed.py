"""How close a full agent update comes to this CPU's matmul limit, and how fast the acting loop runs.

    python benchmarks/speed.py                        # cpu and xs presets, features and pixels
    python benchmarks/speed.py --sizes cpu xs s --threads 2
    python benchmarks/speed.py --sizes cpu --obs features --flags "" imag-starts=128 "rssm.classes=4 imag-starts=128"

In one run it measures:
  1. fp32 matmul throughput at the shapes the update uses (the observe loop runs at batch B = 16 rows,
     imagination at N start states, the heads at B * T rows) and at 1024-row operands;
  2. the floating-point operations of a full update (torch.utils.flop_counter; matmuls and convolutions);
  3. the time of a full update (world model + context encoder + imagination + actor + critic: forward,
     backward, optimiser) per size preset and input, split into phases, and the achieved GFLOP/s as a
     fraction of the measured 1024-row matmul throughput;
  4. the acting loop (batched policy + env step, 4 envs) in env steps/s.
Run by hand (never by CI); the figures are in docs/speed.md.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
from vector_env import VectorEnv  # noqa: E402
import train  # noqa: E402
from dali import Agent  # noqa: E402


@dataclass(frozen=True)
class Args:
    sizes: tuple[str, ...] = ("cpu", "xs")
    """Size presets to time (train.SIZES)."""
    obs: tuple[str, ...] = ("features", "pixels")
    """Inputs to time."""
    context: str = "learned"
    """Context source of the timed agent (learned includes the context encoder's update)."""
    threads: int = 2
    """torch threads."""
    reps: int = 5
    """Timed updates per configuration (after 2 warm-up updates)."""
    task: str = "ball_in_cup"
    """Task whose observation and action sizes are used."""
    flags: tuple[str, ...] = ("",)
    """Variants to time one after another in this run, each a space-separated string of train.py flags
    written without their leading dashes, e.g. --flags "" imag-starts=128 (the preset, then the preset
    with 128 imagination starts)."""
    acting: bool = True
    """Also time the acting loop."""


def matmul_gflops(m: int, k: int, n: int, seconds: float = 0.5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def fake_batch(agent: Agent, B: int, T: int) -> dict[str, torch.Tensor]:
    """A replayed batch of the right shapes (the values do not change the cost)."""
    L, sp = agent.context_prefix + T, agent.spaces
    batch = {
        "action": torch.rand(B, L, sp.action) * 2 - 1,
        "reward": torch.rand(B, L),
        "is_first": torch.zeros(B, L, dtype=torch.bool),
        "is_terminal": torch.zeros(B, L, dtype=torch.bool),
        "context": torch.zeros(B, L, sp.context),
    }
    if sp.image is None:
        batch["obs"] = torch.randn(B, L, sp.obs)
    else:
        batch["image"] = torch.randint(0, 255, (B, L, *sp.image), dtype=torch.uint8)
    batch["is_first"][:, 0] = True
    return batch


def phases(agent: Agent, batch: dict) -> dict[str, float]:
    """Agent.update, step by step with a clock between the phases (same work, same order)."""
    t = {}
    clock = time.perf_counter
    t0 = clock()
    ctx, seq_ctx, pieces = agent.context(batch)
    t["context fwd"] = clock() - t0
    full, b = batch, {k: v[:, agent.context_prefix :] for k, v in batch.items()}
    t0 = clock()
    obs = b["image"] if agent.spaces.image is not None else b["obs"]
    wm, ac = agent.wm, agent.ac
    embed = wm.encoder(obs, ctx if agent.ctx_enc else None)
    t["encoder fwd"] = clock() - t0
    t0 = clock()
    with torch.no_grad():  # the observe loop alone (timed apart, then the loss runs it again)
        wm.rssm.observe(embed, b["action"], b["is_first"], ctx_seq=seq_ctx if agent.ctx_deep else None, ctx_post=ctx if agent.ctx_post else None)
    t["observe fwd (no grad)"] = clock() - t0
    t0 = clock()
    losses, post = wm.loss(b, ctx, seq_ctx)
    loss = sum(wm.loss_scales[k] * v.mean() for k, v in losses.items())
    t["world model fwd"] = clock() - t0
    t0 = clock()
    wm.opt.zero_grad(set_to_none=True)
    loss.backward()
    t["world model bwd"] = clock() - t0
    t0 = clock()
    torch.nn.utils.clip_grad_norm_(wm.parameters(), agent.cfg.model_clip)
    wm.opt.step()
    t["world model opt"] = clock() - t0
    if pieces:
        t0 = clock()
        agent.update_context_encoder(full, pieces, wm.rssm.feat(post))
        t["context encoder fwd+bwd+opt"] = clock() - t0
    t0 = clock()
    ac_losses, _ = ac.loss(wm, post, ctx, b["is_terminal"])
    t["imagination + actor-critic fwd"] = clock() - t0
    t0 = clock()
    ac.actor_opt.zero_grad(set_to_none=True)
    ac.critic_opt.zero_grad(set_to_none=True)
    (ac_losses["actor"].mean() + ac_losses["critic"].mean()).backward()
    t["actor-critic bwd"] = clock() - t0
    t0 = clock()
    for opt, module in ((ac.actor_opt, ac.actor), (ac.critic_opt, ac.critic)):
        torch.nn.utils.clip_grad_norm_(module.parameters(), agent.cfg.ac_clip)
        opt.step()
    t["actor-critic opt"] = clock() - t0
    return t


def build(size: str, obs: str, args: Args, flags: str = "") -> tuple[Agent, train.Args]:
    run = train.cli(["--size", size, "--task", args.task, "--obs", obs, "--context", args.context, *("--" + flag for flag in flags.split())])
    return train.build_agent(run, envs.make_env(args.task, obs), "cpu"), run


def time_update(size: str, obs: str, args: Args, peak: float, flags: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    agent, run = build(size, obs, args, flags)
    batch = fake_batch(agent, run.batch_size, run.batch_length)
    for _ in range(2):
        agent.update(batch)
    with FlopCounterMode(display=False) as counter:
        agent.update(batch)
    flops = counter.get_total_flops()
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        agent.update(batch)
        times.append(time.perf_counter() - start)
    sec = float(np.median(times))
    split = [phases(agent, batch) for _ in range(2)]
    split = {k: float(np.median([s[k] for s in split])) for k in split[0]}
    gf = flops / sec / 1e9
    print(f"\n{size} {obs} {flags!r}: {sec:.3f} s/update (median of {args.reps}), {flops / 1e9:.1f} GFLOP, {gf:.1f} GFLOP/s = {gf / peak:.0%} of matmul peak")
    for k, v in split.items():
        print(f"    {k:<32} {v:7.3f} s")


def time_acting(obs: str, args: Args, steps: int = 400, num_envs: int = 4) -> float:
    agent, run = build("cpu", obs, args)
    vec = VectorEnv([envs.make_env(args.task, obs, None, i, run.action_repeat) for i in range(num_envs)])
    o, _ = vec.reset()
    state = agent.initial_state(num_envs)
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        action, state = agent.act({k: torch.as_tensor(v) for k, v in o.items()}, state)
        o, *_ = vec.step(action.numpy())
    rate = (steps // num_envs) * num_envs * run.action_repeat / (time.perf_counter() - start)
    vec.close()
    return rate


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, task {args.task}, context {args.context}, flags {args.flags!r}")
    print("\nmatmul throughput (fp32):")
    shapes = {"1024 x 1024 x 1024": (1024, 1024, 1024), "observe loop GRU (16 x 512 -> 768)": (16, 512, 768),
              "imagination GRU (256 x 512 -> 768)": (256, 512, 768), "heads (1024 x 512 -> 255)": (1024, 512, 255)}  # fmt: skip
    peak = 0.0
    for name, (m, k, n) in shapes.items():
        g = matmul_gflops(m, k, n)
        peak = max(peak, g)
        print(f"    {name:<40} {g:7.1f} GFLOP/s")
    for size in args.sizes:
        for obs in args.obs:
            for flags in args.flags:
                time_update(size, obs, args, peak, flags)
    print("\nacting loop (cpu preset, 4 envs, sampled actions):")
    for obs in args.obs if args.acting else ():
        print(f"    {obs:<9} {time_acting(obs, args):7.0f} env steps/s")


if __name__ == "__main__":
    main(tyro.cli(Args))
