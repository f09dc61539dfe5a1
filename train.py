"""Train a DALI / DreamerV3 agent on a contextual DMC task.

    python train.py --task walker --integration shallow                  # the defaults: see --help
    python train.py --task ball_in_cup --context none --steps 200000     # Dreamer-DR
    python train.py --task ball_in_cup --context oracle --integration deep --contexts single_0   # cRSSM-D
    python train.py --logdir runs/x --resume                             # continue a run exactly

DreamerV3's training loop (Hafner et al., arXiv:2301.04104, Sec. 2-3 and App. A): envs act with the
current policy, every record goes into a uniform replay, and the agent is updated on (B, T) sequences at a
fixed train ratio (replayed steps per policy step). Each episode draws the next training context of its
env (envs.py); DALI (arXiv:2508.20294, Sec. 6) trains on 100 contexts sampled from the training range.

Output in --logdir: args.json, metrics.jsonl (one JSON object per log line), TensorBoard events, ckpt.pt
(written atomically at episode boundaries every --save-every env steps and at the end).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import tyro
from tqdm import tqdm

import envs
from context_encoder import ContextEncoderConfig
from dali import Agent, AgentConfig, Spaces
from evaluate import episode_returns
from replay import Replay
from rssm import RSSMConfig

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class Args:
    """Training run. Model sizes come from --size; any --rssm.* / --hidden ... flag overrides the preset."""

    task: envs.Task = "walker"
    """Contextual DMC task."""
    obs: envs.ObsKind = "features"
    """Observation: proprioceptive features, or 64x64 RGB pixels."""
    contexts: envs.Setting = "double_box"
    """Training contexts: default, single_0 / single_1 (one feature varies), double_box (both vary)."""
    num_contexts: int = 100
    """Number of training contexts sampled from the training range (with --seed)."""
    steps: int = 500_000
    """Env steps to train for (action repeats and envs counted), rounded up to whole episodes."""
    seed: int = 0
    """Seed of contexts, envs, replay sampling and network initialisation."""
    logdir: str = "runs/default"
    """Where metrics and checkpoints go."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available."""
    size: Literal["cpu", "xs", "s", "m"] = "cpu"
    """Model size preset (DreamerV3's XS/S/M; `cpu` is the small default when no GPU is used)."""
    envs: int = 4
    """Parallel envs."""
    action_repeat: int = 2
    """Control steps per policy step (DreamerV3's DMC default 2; the DALI paper used 1)."""
    train_ratio: float = 512.0
    """Replayed steps per policy step: B * T / train_ratio policy steps per update (DreamerV3's 512; the
    cpu preset's default is 128, see TRAIN_RATIO)."""
    batch_size: int = 16
    """Sequences per batch B."""
    batch_length: int = 64
    """Steps per sequence T."""
    prefill: int = 2500
    """Env steps of uniform random actions before training starts."""
    replay_capacity: int = 1_000_000
    """Replay size in records (all envs together)."""
    eval_every: int = 10_000
    """Env steps between evaluations (0: never)."""
    eval_episodes: int = 4
    """Episodes per evaluation, one per eval env, on the training contexts."""
    eval_mode: Literal["sample", "mode"] = "sample"
    """Evaluation actions: sampled from the policy (the DALI paper) or its mode."""
    log_every: int = 2_000
    """Env steps between metric lines."""
    save_every: int = 20_000
    """Env steps between checkpoints (taken at the next episode boundary)."""
    resume: bool = False
    """Continue the run in --logdir from its ckpt.pt (replay, optimisers, counters, RNGs restored)."""
    threads: int = 1
    """torch CPU threads. 1 (the default) is robust when anything else runs on the machine (env workers,
    another seed): with more threads than free cores, torch's spin-waiting threads slow an update 20-70x.
    More pay only on an otherwise idle machine (docs/speed.md has the measurements);
    0 takes one per core."""
    progress: bool = True
    """Show a progress bar on stderr."""
    agent: Annotated[AgentConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=AgentConfig)
    rssm: RSSMConfig = field(default_factory=RSSMConfig)
    ctx: ContextEncoderConfig = field(default_factory=ContextEncoderConfig)


# Size presets: RSSM sizes and MLP widths (DreamerV3 2023 Table B.1; `cpu` is smaller for 2-core machines).
SIZES: dict[str, tuple[RSSMConfig, dict]] = {
    # cpu: chosen by wall-clock time to ball_in_cup >= 900 (README, Speed): 256 of the 1,024 imagination starts
    "cpu": (RSSMConfig(deter=256, hidden=128, stoch=32, classes=8), dict(hidden=128, layers=1, cnn_depth=16, imag_starts=256)),
    "xs": (RSSMConfig(deter=256, hidden=256), dict(hidden=256, layers=1, cnn_depth=24)),
    "s": (RSSMConfig(deter=512, hidden=512), dict(hidden=512, layers=2, cnn_depth=32)),
    "m": (RSSMConfig(deter=1024, hidden=640), dict(hidden=640, layers=3, cnn_depth=48)),
}

# Train ratio per preset where it differs from DreamerV3's 512. The cpu preset trains at 128: measured on
# ball_in_cup (features, default context), ratio 128 first evaluated >= 900 at 140k env steps (8.6k updates);
# ratio 64 had not learned to catch at 65k; 512 costs 4x the updates per env step (README, issue 6).
TRAIN_RATIO = {"cpu": 128.0}

# Fields that may change on --resume; every other field must equal the checkpoint's.
RESUMABLE = {"steps", "logdir", "device", "resume", "threads", "progress", "eval_every", "log_every", "save_every", "eval_episodes", "eval_mode"}


def preset(size: str) -> Args:
    """Default Args for a size preset (the base that command-line flags override)."""
    rssm, agent = SIZES[size]
    return Args(size=size, rssm=rssm, agent=AgentConfig(**agent), train_ratio=TRAIN_RATIO.get(size, Args.train_ratio))


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, args: Args | None = None) -> dict:
    """Load ckpt.pt with clear errors for a missing, corrupt or incompatible file."""
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {path}")
    try:
        # weights_only: a checkpoint holds tensors and plain types only, so loading one never runs its code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(
            f"error: checkpoint {path} holds objects other than tensors and plain types (refused: loading them could run code): {e}"
        ) from None
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise SystemExit(f"error: checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise SystemExit(f"error: {path} is not a checkpoint of this train.py (version {CHECKPOINT_VERSION})")
    if args is not None:
        saved, new = _flatten(ckpt["args"]), _flatten(dataclasses.asdict(args))
        for k in sorted(saved.keys() | new.keys()):
            if k.split(".")[0] not in RESUMABLE and saved.get(k) != new.get(k):
                raise SystemExit(f"error: checkpoint {path} was trained with {k}={saved.get(k)!r}, this run asks {k}={new.get(k)!r}")
    return ckpt


def _plain_numpy_state(state: tuple) -> tuple:
    """np.random.get_state() with its key array as a list of ints (weights_only checkpoints)."""
    name, keys, pos, has_gauss, gauss = state
    return (name, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def args_from_dict(d: dict) -> Args:
    """Rebuild Args saved in a checkpoint or args.json (for evaluate.py and counterfactual.py)."""
    return Args(**{**d, "agent": AgentConfig(**d["agent"]), "rssm": RSSMConfig(**d["rssm"]), "ctx": ContextEncoderConfig(**d["ctx"])})


def build_agent(args: Args, env: envs.ContextualDMC, device: str | torch.device = "cpu") -> Agent:
    spaces = Spaces(
        action=env.action_size,
        obs=env.obs_size if args.obs == "features" else 0,
        image=env.image_shape if args.obs == "pixels" else None,
        context=len(env.features),
    )
    return Agent(args.agent, args.rssm, spaces, args.ctx).to(device)


def load_agent(path: Path, device: str | torch.device = "cpu") -> tuple[Args, Agent, dict]:
    """The saved args, the trained agent (eval mode) and the raw checkpoint of a train.py run."""
    ckpt = load_checkpoint(path)
    args = args_from_dict(ckpt["args"])
    env = envs.make_env(args.task, args.obs, [envs.default_context(args.task)], 0, args.action_repeat)
    agent = build_agent(args, env, device)
    agent.load_state_dict(ckpt["agent"])
    env.close()
    return args, agent.eval(), ckpt


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def check_args(args: Args) -> None:
    """Reject flag combinations that cannot work, naming the bad value."""
    problems = []
    if args.contexts == "default" and args.agent.context == "oracle":
        problems.append("--context oracle with --contexts default: the true context never changes, so it carries no information")
    for name in ("steps", "envs", "batch_size", "batch_length", "action_repeat", "replay_capacity"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.train_ratio <= 0:
        problems.append(f"--train-ratio {args.train_ratio}: must be > 0")
    if args.replay_capacity // args.envs < args.batch_length + args.ctx.window:
        problems.append(f"--replay-capacity {args.replay_capacity}: must hold --batch-length + --ctx.window records per env")
    if args.ctx.window < 1 or args.ctx.dim < 1:
        problems.append(f"--ctx.window {args.ctx.window}, --ctx.dim {args.ctx.dim}: both must be >= 1")
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))


def to_torch(batch: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


class Logger:
    """stdout line + metrics.jsonl + TensorBoard; metric tensors are averaged and synced only here."""

    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir))
        self.file = open(logdir / "metrics.jsonl", "a")
        self.pending: dict[str, list] = {}

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.pending.setdefault(k, []).append(v)

    def write(self, step: int, progress: tqdm | None) -> None:
        row = {"step": step}
        for k, vs in sorted(self.pending.items()):
            row[k] = float(torch.stack(vs).float().mean()) if torch.is_tensor(vs[0]) else float(np.mean(vs))
            self.writer.add_scalar(k, row[k], step)
        self.pending.clear()
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        keys = ["episode/return", "eval/return", "wm/loss", "ac/return", "perf/fps", "perf/updates"]
        line = f"step {step:>8d} | " + " | ".join(f"{k} {row[k]:.3g}" for k in keys if k in row)
        (progress.write if progress is not None else print)(line)

    def close(self) -> None:
        self.writer.close()
        self.file.close()


def main(args: Args) -> dict:
    check_args(args)
    logdir = Path(args.logdir)
    ckpt_path = logdir / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, args) if args.resume else None
    if not args.resume and ckpt_path.exists():
        raise SystemExit(f"error: {ckpt_path} exists; pass --resume to continue it or choose another --logdir")
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    contexts = envs.train_contexts(args.task, args.contexts, args.num_contexts, args.seed)
    vec = envs.VectorEnv([envs.make_env(args.task, args.obs, contexts, args.seed + i, args.action_repeat) for i in range(args.envs)])
    agent = build_agent(args, vec.envs[0], device)
    obs_key, obs_shape = ("obs", (vec.envs[0].obs_size,)) if args.obs == "features" else ("image", vec.envs[0].image_shape)
    spec = {
        obs_key: (obs_shape, np.float32 if args.obs == "features" else np.uint8),
        "action": ((vec.action_size,), np.float32),
        "reward": ((), np.float32),
        "is_first": ((), bool),
        "is_terminal": ((), bool),
        "context": ((len(vec.envs[0].features),), np.float32),
    }
    replay = Replay(args.replay_capacity, args.envs, spec, args.seed)
    action_rng = np.random.default_rng(args.seed)
    c = {"env_steps": 0, "updates": 0, "episodes": 0, "last_eval": 0, "last_save": 0, "last_log": 0, "seconds": 0.0}
    if ckpt is not None:
        agent.load_state_dict(ckpt["agent"])
        for name, opt in agent.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        replay.load_state_dict(ckpt["replay"])
        c = {"seconds": 0.0, **ckpt["counters"]}  # "seconds" is absent from checkpoints written before it was added
        action_rng.bit_generator.state = ckpt["rng"]["action"]
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(tuple(ckpt["rng"]["numpy"]))
        torch.set_rng_state(ckpt["rng"]["torch"])
        for env, state in zip(vec.envs, ckpt["rng"]["envs"]):
            env.set_rng_state(state)  # the envs replay the reset that followed the checkpoint's episode end

    obs, _ = vec.reset()
    state = agent.initial_state(args.envs)
    prev_action = np.zeros((args.envs, vec.action_size), np.float32)
    reward, is_terminal = np.zeros(args.envs, np.float32), np.zeros(args.envs, bool)
    ep_return = np.zeros(args.envs)
    steps_per_vec = args.envs * args.action_repeat
    updates_per_policy_step = args.train_ratio / (args.batch_size * args.batch_length)
    logger = Logger(logdir)
    progress = tqdm(total=args.steps, initial=min(c["env_steps"], args.steps), unit="step", disable=not args.progress, dynamic_ncols=True)
    t_last, steps_last = time.time(), c["env_steps"]

    def checkpoint() -> None:
        rng = {
            "action": action_rng.bit_generator.state,
            "python": random.getstate(),
            "numpy": _plain_numpy_state(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "envs": [env.rng_state() for env in vec.envs],
        }
        optimizers = {name: opt.state_dict() for name, opt in agent.optimizers.items()}
        payload = {"version": CHECKPOINT_VERSION, "args": dataclasses.asdict(args), "agent": agent.state_dict(), "optimizers": optimizers}
        save_checkpoint(ckpt_path, {**payload, "replay": replay.state_dict(), "counters": dict(c), "rng": rng})

    at_boundary = True  # all envs start episodes together and DMC episodes have a fixed length
    while not (c["env_steps"] >= args.steps and at_boundary):
        # Store record t = (o_t, a_{t-1}, r_t, is_first_t, is_terminal_t, ctx_t) of every env.
        for i in range(args.envs):
            replay.add(i, {obs_key: obs[obs_key][i], "action": prev_action[i], "reward": reward[i], "is_first": obs["is_first"][i],
                           "is_terminal": is_terminal[i], "context": obs["context"][i]})  # fmt: skip
        # Act
        if c["env_steps"] < args.prefill:
            action = action_rng.uniform(-1, 1, (args.envs, vec.action_size)).astype(np.float32)
        else:
            action_t, state = agent.act(to_torch(obs, device), state)
            action = action_t.cpu().numpy()
        obs, reward, term, trunc, info = vec.step(action)
        ep_return += reward
        c["env_steps"] += steps_per_vec
        progress.update(steps_per_vec)
        # Episode ends: store the last record of the old episode; the new one starts with a_{-1} = 0, r = 0.
        for i, final in info["final_obs"].items():
            replay.add(i, {obs_key: final[obs_key], "action": action[i], "reward": reward[i], "is_first": False,
                           "is_terminal": term[i], "context": final["context"]})  # fmt: skip
            logger.add({"episode/return": ep_return[i], "episode/length": envs.EPISODE_STEPS // args.action_repeat})
            progress.set_postfix(ret=f"{ep_return[i]:.1f}")
            ep_return[i] = 0.0
            c["episodes"] += 1
        done = obs["is_first"]
        prev_action = np.where(done[:, None], 0.0, action).astype(np.float32)
        reward = np.where(done, 0.0, reward).astype(np.float32)
        is_terminal = np.where(done, False, term)
        at_boundary = bool(done.all())
        # Train at the train ratio
        length = agent.context_prefix + args.batch_length  # learned context: K records of history first
        if c["env_steps"] >= args.prefill and replay.ready(length):
            policy_steps = (c["env_steps"] - args.prefill) // args.action_repeat
            while c["updates"] < policy_steps * updates_per_policy_step:
                batch = to_torch(replay.sample(args.batch_size, length), device)
                logger.add(agent.update(batch))
                c["updates"] += 1
        # Evaluate, log, checkpoint
        if args.eval_every and c["env_steps"] - c["last_eval"] >= args.eval_every and c["env_steps"] >= args.prefill:
            c["last_eval"] = c["env_steps"]
            jobs = [(contexts[(c["episodes"] + i) % len(contexts)], args.seed + 10_000 + c["episodes"] + i) for i in range(args.eval_episodes)]
            returns = episode_returns(agent, args.task, args.obs, args.action_repeat, jobs, device, args.eval_mode == "sample", args.eval_episodes)
            logger.add({"eval/return": float(np.mean(returns))})
        if c["env_steps"] - c["last_log"] >= args.log_every:
            now = time.time()
            c["seconds"] += now - t_last  # wall-clock of this run summed over resumes (evaluation included)
            perf = {"perf/fps": (c["env_steps"] - steps_last) / (now - t_last), "perf/updates": c["updates"], "perf/replay": len(replay)}
            logger.add({**perf, "perf/hours": c["seconds"] / 3600})
            t_last, steps_last, c["last_log"] = now, c["env_steps"], c["env_steps"]
            logger.write(c["env_steps"], progress if args.progress else None)
        if at_boundary and c["env_steps"] - c["last_save"] >= args.save_every:
            c["last_save"] = c["env_steps"]
            checkpoint()
    if c["last_save"] != c["env_steps"]:  # not already saved at this very step
        checkpoint()
    if logger.pending:
        logger.write(c["env_steps"], progress if args.progress else None)
    progress.close()
    logger.close()
    vec.close()
    return c


def cli(argv: list[str] | None = None) -> Args:
    """Parse flags on top of the --size preset (peeked first, so explicit flags override its values)."""
    argv = sys.argv[1:] if argv is None else argv
    size = "cpu"
    for i, a in enumerate(argv):
        if a == "--size" and i + 1 < len(argv):
            size = argv[i + 1]
        elif a.startswith("--size="):
            size = a.split("=", 1)[1]
    if size not in SIZES:
        raise SystemExit(f"error: unknown --size {size!r}; choose one of {list(SIZES)}")
    return tyro.cli(Args, default=preset(size), args=argv, description=__doc__)


if __name__ == "__main__":
    main(cli())
