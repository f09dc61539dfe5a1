"""How close a full agent update comes to the matmul limit of this CPU (or a GPU), and how fast the acting loop runs.

    python benchmarks/speed.py                        # cpu and xs presets, features and pixels
    python benchmarks/speed.py --sizes cpu xs s --threads 2
    python benchmarks/speed.py --sizes cpu --obs features --flags "" imag-starts=128 "rssm.classes=4 imag-starts=128"
    python benchmarks/speed.py --task walker --sizes cpu xs s --obs features --threads 1 --reps 3 --cost-per-preset
    python benchmarks/speed.py --device cuda --task walker --sizes cpu xs s --obs features --cost-per-preset   # on a GPU

In one run it measures:
  1. fp32 matmul throughput at the shapes the update uses (the observe loop runs at batch B = 16 rows,
     imagination at N start states, the heads at B * T rows) and at 1024-row operands;
  2. the floating-point operations of a full update (torch.utils.flop_counter; matmuls and convolutions);
  3. the time of a full update (world model + context encoder + imagination + actor + critic: forward,
     backward, optimiser) per size preset and input, split into phases, and the achieved GFLOP/s as a
     fraction of the measured 1024-row matmul throughput;
  4. the acting loop (batched policy + env step, 4 envs) in env steps/s.
With --cost-per-preset it also prints, per preset, what the README's main command (train.py --task walker
--integration shallow --size <preset>, 500k env steps) costs: trained parameters, GFLOP per update, the
measured seconds per update, its number of updates at the preset's train ratio (train.py's semantics:
(steps - prefill) / action repeat policy steps, x ratio / (B x T) updates each), the acting time (training
env steps plus the default evaluation's, at the preset's measured acting rate), and the hours on this CPU;
and, for one GPU, an estimate (not a measurement) from the update's operator count and FLOPs under the
assumptions of --gpu-op-us and --gpu-tflops. With --device cuda everything above runs on the GPU (agent,
batch, matmuls, acting; the clock waits for the GPU before each reading), so the table's measured seconds
are the GPU's and the estimate stands beside them.
Run by hand (never by CI); the figures are in docs/speed.md.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
from vector_env import VectorEnv  # noqa: E402
import checkpoint  # noqa: E402
import config  # noqa: E402
import train  # noqa: E402
from dali import Agent  # noqa: E402


@dataclass(frozen=True)
class Args:
    sizes: tuple[str, ...] = ("cpu", "xs")
    """Size presets to time (config.SIZES)."""
    obs: tuple[str, ...] = ("features", "pixels")
    """Inputs to time."""
    context: str = "learned"
    """Context source of the timed agent (learned includes the context encoder's update)."""
    threads: int = 2
    """torch threads."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the agent, its batch, the matmuls and acting run."""
    reps: int = 5
    """Timed updates per configuration (after --warmup updates and the two that count FLOPs and operators)."""
    warmup: int = 2
    """Untimed updates before the counted and timed ones."""
    phases: bool = True
    """Also time the update's phases (two more updates)."""
    task: str = "ball_in_cup"
    """Task whose observation and action sizes are used."""
    flags: tuple[str, ...] = ("",)
    """Variants to time one after another in this run, each a space-separated string of train.py flags
    written without their leading dashes, e.g. --flags "" imag-starts=128 (the preset, then the preset
    with 128 imagination starts)."""
    acting: bool = True
    """Also time the acting loop."""
    cost_per_preset: bool = False
    """Print the main command's cost per preset (parameters, GFLOP, s / update, updates, hours; docs/speed.md#cost-per-preset)."""
    main_steps: int = 500_000
    """Env steps of the main command, for --cost-per-preset."""
    gpu_op_us: float = 10.0
    """GPU estimate: microseconds per tensor operator in eager PyTorch (dispatch and kernel launch, which bound
    the small sequential steps of the RSSM); an assumption, not a measurement."""
    gpu_tflops: float = 20.0
    """GPU estimate: sustained fp32 TFLOP/s of the update's arithmetic (about 30% of an H100/H200's fp32 peak);
    an assumption, not a measurement."""


def synced_clock(device: str) -> float:
    """time.perf_counter once the device has finished the work queued so far (CUDA runs asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_gflops(m: int, k: int, n: int, device: str, seconds: float = 0.5) -> float:
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    for _ in range(3):
        a @ b
    count, start = 0, synced_clock(device)
    while synced_clock(device) - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (synced_clock(device) - start) / 1e9


def fake_batch(agent: Agent, B: int, T: int, device: str) -> dict[str, torch.Tensor]:
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
    return {k: v.to(device) for k, v in batch.items()}


def phases(agent: Agent, batch: dict, device: str) -> dict[str, float]:
    """Agent.update, step by step with a clock between the phases (same work, same order)."""
    t = {}
    clock = lambda: synced_clock(device)  # noqa: E731
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


def build(size: str, obs: str, args: Args, flags: str = "") -> tuple[Agent, config.Args]:
    run = train.cli(["--size", size, "--task", args.task, "--obs", obs, "--context", args.context, *("--" + flag for flag in flags.split())])
    return checkpoint.build_agent(run, envs.make_env(args.task, obs), args.device), run


def count_ops(fn) -> int:
    """Tensor operators (aten calls: each one or more kernel launches on a GPU) that fn() dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def time_update(size: str, obs: str, args: Args, peak: float, flags: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    agent, run = build(size, obs, args, flags)
    batch = fake_batch(agent, run.batch_size, run.batch_length, args.device)
    for _ in range(args.warmup):
        agent.update(batch)
    with FlopCounterMode(display=False) as counter:
        agent.update(batch)
    flops = counter.get_total_flops()
    ops = count_ops(lambda: agent.update(batch))
    times = []
    for _ in range(args.reps):
        start = synced_clock(args.device)
        agent.update(batch)
        times.append(synced_clock(args.device) - start)
    sec = float(np.median(times))
    split = [phases(agent, batch, args.device) for _ in range(2 if args.phases else 0)]
    split = {k: float(np.median([s[k] for s in split])) for k in split[0]} if split else {}
    gf = flops / sec / 1e9
    print(f"\n{size} {obs} {flags!r}: {sec:.3f} s/update (median of {args.reps}: {', '.join(f'{x:.3f}' for x in times)}), "
          f"{flops / 1e9:.1f} GFLOP, {gf:.1f} GFLOP/s = {gf / peak:.0%} of matmul peak, {ops} tensor operators")  # fmt: skip
    for k, v in split.items():
        print(f"    {k:<32} {v:7.3f} s")
    params = sum(p.numel() for p in agent.parameters() if p.requires_grad)
    return {"size": size, "obs": obs, "flags": flags, "run": run, "sec": sec, "flops": flops, "ops": ops, "params": params}


def main_command_updates(run: config.Args, steps: int) -> int:
    """Updates train.py makes in `steps` env steps: policy steps after the prefill x ratio / (B x T), rounded up."""
    policy_steps = (steps - run.prefill) // run.action_repeat
    return math.ceil(policy_steps * run.train_ratio / (run.batch_size * run.batch_length))


def cost_table(rows: list[dict], args: Args) -> None:
    """The main command's cost per preset (docs/speed.md#cost-per-preset)."""
    print(f"\ncost of the main command per preset ({args.main_steps:,} env steps on {args.task}, context {args.context}):")
    print(f"| preset | parameters | GFLOP / update | s / update (measured, {args.device}) | updates | acting h | hours, measured {args.device} | GPU estimate: s / update | hours, one GPU (estimate) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        run = r["run"]
        updates = main_command_updates(run, args.main_steps)
        evals = args.main_steps // run.eval_every * run.eval_episodes * envs.EPISODE_STEPS if run.eval_every else 0
        acting_h = (args.main_steps + evals) / time_acting(r["obs"], args, size=r["size"], flags=r["flags"]) / 3600
        gpu_sec = max(r["ops"] * args.gpu_op_us * 1e-6, r["flops"] / (args.gpu_tflops * 1e12))
        print(f"| {r['size']} | {r['params']:,} | {r['flops'] / 1e9:.0f} | {r['sec']:.2f} | {updates:,} | {acting_h:.2f} | "
              f"{updates * r['sec'] / 3600 + acting_h:.1f} | {gpu_sec:.3f} | {updates * gpu_sec / 3600:.1f} + acting |")  # fmt: skip


def time_acting(obs: str, args: Args, steps: int = 400, num_envs: int = 4, size: str = "cpu", flags: str = "") -> float:
    agent, run = build(size, obs, args, flags)
    vec = VectorEnv([envs.make_env(args.task, obs, None, i, run.action_repeat) for i in range(num_envs)])
    o, _ = vec.reset()
    state = agent.initial_state(num_envs)
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        action, state = agent.act(train.to_torch(o, args.device), state)
        o, *_ = vec.step(action.cpu().numpy())
    rate = (steps // num_envs) * num_envs * run.action_repeat / (time.perf_counter() - start)
    vec.close()
    return rate


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    checkpoint.resolve_device(args.device)  # a clear error where cuda is asked for but missing
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}, {args.threads} threads, task {args.task}, context {args.context}, flags {args.flags!r}")
    print(f"\nmatmul throughput (fp32, {args.device}):")
    shapes = {"1024 x 1024 x 1024": (1024, 1024, 1024), "observe loop GRU (16 x 512 -> 768)": (16, 512, 768),
              "imagination GRU (256 x 512 -> 768)": (256, 512, 768), "heads (1024 x 512 -> 255)": (1024, 512, 255)}  # fmt: skip
    peak = 0.0
    for name, (m, k, n) in shapes.items():
        g = matmul_gflops(m, k, n, args.device)
        peak = max(peak, g)
        print(f"    {name:<40} {g:7.1f} GFLOP/s")
    rows = [time_update(size, obs, args, peak, flags) for size in args.sizes for obs in args.obs for flags in args.flags]
    if args.cost_per_preset:
        cost_table(rows, args)
    print("\nacting loop (cpu preset, 4 envs, sampled actions):")
    for obs in args.obs if args.acting else ():
        print(f"    {obs:<9} {time_acting(obs, args):7.0f} env steps/s")


if __name__ == "__main__":
    main(tyro.cli(Args))
