"""Train a DALI / DreamerV3 agent on a contextual DMC task.

    python train.py --task walker --integration shallow                  # the defaults: see --help
    python train.py --task ball_in_cup --context none --steps 200000     # Dreamer-DR
    python train.py --task ball_in_cup --context oracle --integration deep --contexts single_0   # cRSSM-D
    python train.py --logdir runs/x --resume                             # continue a run exactly

DreamerV3's training loop (Hafner et al., arXiv:2301.04104, Sec. 2-3 and App. A): envs act with the
current policy, every record goes into a uniform replay, and the agent is updated on (B, T) sequences at a
fixed train ratio (replayed steps per policy step). Each episode draws the next training context of its
env (envs.py); DALI (arXiv:2508.20294, Sec. 6) trains on 100 contexts sampled from the training range.

Output in --logdir: args.json, code.json (the git commit of every launch: code_version.py), metrics.jsonl
(one JSON object per log line), TensorBoard events, ckpt.pt (written atomically at episode boundaries every
--save-every env steps, at a signal and at the end).

Ctrl-C (SIGINT) or SIGTERM (what SLURM sends before it kills a job) saves a checkpoint after the current
step, mid-episode too (each env's MuJoCo state and random streams, the agent's latent, previous action and
context windows, the episode counters: resuming is exact), and exits with status 128 + the signal's number.
A periodic evaluation in progress is abandoned at its next step, its random streams rewound, and redone
first thing on resume. A second signal exits at once, keeping the last checkpoint; it counts as second
even when it arrives while the first one's handler has not run yet (StopRequest), though two signals sent
so close together that the kernel merges them arrive as one. `--resume` takes the run's own configuration from its
logdir: only the flags in config.RESUMABLE (steps, threads, logging, evaluation, device) may change.
One train.py works in a logdir at a time: it holds logdir/train.lock (dir_lock.py) while it runs, and a
second one on the same logdir exits at once, naming the holder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tyro
from tqdm import tqdm

import code_version
import dir_lock
import envs
from checkpoint import CHECKPOINT_VERSION, build_agent, load_checkpoint, plain_numpy_state, resolve_device, save_checkpoint, saved_args
from config import SIZES, Args, check_args, peek, preset
from dali import holds_context
from layers import require_finite
from rollout import Interrupted, episode_returns
from replay import Replay
from run_log import Logger, prepare_logdir
from stop_request import StopRequest
from vector_env import VectorEnv

# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def checked_update(agent, batch: dict, update: int, env_steps: int, ckpt_path: Path) -> dict[str, torch.Tensor]:
    """agent.update, stopping the run with an error that names the update and the values when a loss (checked
    before its backward pass: layers.require_finite) or a gradient norm becomes NaN or infinite, rather than
    training on. Nothing is saved: the last good checkpoint stays as it was."""
    kept = f"the last good checkpoint, {ckpt_path}, is kept" if ckpt_path.exists() else "no checkpoint was saved yet"
    try:
        metrics = agent.update(batch)
        require_finite(metrics)  # gradient norms and the rest (one host sync)
    except FloatingPointError as e:
        raise SystemExit(f"error: {e} at update {update} (env step {env_steps}); stopped before training on; {kept}") from None
    return metrics


def to_torch(batch: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def lock_logdir(logdir: Path) -> int:
    """Hold logdir/train.lock for this process (closing the returned fd releases it): two train.py on one
    logdir would interleave metrics.jsonl and race on ckpt.pt."""
    try:
        return dir_lock.acquire(logdir / "train.lock")
    except dir_lock.DirLocked as held:
        raise SystemExit(f"error: {logdir} is in use by another train.py: {held}. One train.py works in a logdir at a "
                         "time: wait for it to end (Ctrl-C or SIGTERM saves it, and --resume continues it), or choose "
                         "another --logdir.") from None  # fmt: skip


def main(args: Args) -> dict:
    check_args(args)
    resolve_device(args.device)  # fails before anything is written
    logdir = Path(args.logdir)
    lock = lock_logdir(logdir)  # before the checkpoint is read: another train.py may be writing it
    try:
        return train(args, logdir)
    finally:
        os.close(lock)


def train(args: Args, logdir: Path) -> dict:
    """The run in `logdir`, which this process has locked (main)."""
    ckpt_path = logdir / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, args) if args.resume else None
    eval_due = ckpt is not None and (ckpt.get("acting") or {}).get("eval_due", False)  # a signal abandoned its last evaluation
    if ckpt is not None and ckpt["counters"]["env_steps"] >= args.steps and not eval_due:
        print(f"{logdir}: already trained for {ckpt['counters']['env_steps']} env steps >= --steps {args.steps}; nothing to do "
              "(pass a larger --steps to continue)")  # fmt: skip
        return ckpt["counters"]
    prepare_logdir(logdir, ckpt)
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    if note := code_version.record_launch(logdir, ckpt["counters"]["env_steps"] if ckpt else 0):  # logdir/code.json
        print(note)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    contexts = envs.train_contexts(args.task, args.contexts, args.num_contexts, args.seed)
    vec = VectorEnv([envs.make_env(args.task, args.obs, contexts, args.seed + i, args.action_repeat) for i in range(args.envs)])
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
    counts_steps = holds_context(args.agent, args.ctx)  # DALI-D: records hold their step in the episode
    if counts_steps:
        spec["step"] = ((), np.int32)
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

    acting = None if ckpt is None else ckpt.get("acting")  # absent in checkpoints written before mid-episode saving
    if acting is None:  # a fresh run, or a checkpoint taken at an episode boundary by older code
        obs, info = vec.reset()
        true_context = info["context_vector"]  # (N, X): stored in the replay; read by the oracle baselines alone
        state = agent.initial_state(args.envs)
        prev_action = np.zeros((args.envs, vec.action_size), np.float32)
        reward, is_terminal = np.zeros(args.envs, np.float32), np.zeros(args.envs, bool)
        ep_return, ep_step = np.zeros(args.envs), np.zeros(args.envs, np.int32)
        at_boundary = True  # all envs start episodes together and DMC episodes have a fixed length
    else:  # continue the episodes where the checkpoint left them
        for env, env_state in zip(vec.envs, acting["envs"]):
            env.set_state(env_state)
        obs = {k: v.numpy() for k, v in acting["obs"].items()}
        true_context, prev_action, reward, is_terminal, ep_return = (acting[k].numpy() for k in ("true_context", "prev_action", "reward", "is_terminal", "ep_return"))
        ep_step = acting["ep_step"].numpy() if counts_steps else np.zeros(args.envs, np.int32)
        state = agent.load_state(acting["agent"], args.envs)
        at_boundary = acting["at_boundary"]
    steps_per_vec = args.envs * args.action_repeat
    updates_per_policy_step = args.train_ratio / (args.batch_size * args.batch_length)
    logger = Logger(logdir, c["env_steps"])
    if acting is not None:
        logger.pending = {k: list(v) for k, v in acting["pending"].items()}  # metrics since the last log line
    progress = tqdm(total=args.steps, initial=min(c["env_steps"], args.steps), unit="step", disable=not args.progress, dynamic_ncols=True)
    t_last, steps_last = time.time(), c["env_steps"]

    def checkpoint() -> None:
        rng = {
            "action": action_rng.bit_generator.state,
            "python": random.getstate(),
            "numpy": plain_numpy_state(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "envs": [env.rng_state() for env in vec.envs],
        }
        optimizers = {name: opt.state_dict() for name, opt in agent.optimizers.items()}
        payload = {"version": CHECKPOINT_VERSION, "args": dataclasses.asdict(args), "agent": agent.state_dict(), "optimizers": optimizers}
        arrays = {"true_context": true_context, "prev_action": prev_action, "reward": reward, "is_terminal": is_terminal, "ep_return": ep_return}
        acting = {
            "envs": [env.get_state() for env in vec.envs],
            "obs": {k: torch.from_numpy(np.array(v)) for k, v in obs.items()},
            **{k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
            "agent": agent.state_dict_of(state),
            "at_boundary": at_boundary,
            "pending": {k: [v if torch.is_tensor(v) else float(v) for v in vs] for k, vs in logger.pending.items()},
            **({"eval_due": True} if eval_due else {}),  # only then: checkpoints stay as older code wrote them
        }
        if counts_steps:
            acting["ep_step"] = torch.from_numpy(ep_step.copy())
        save_checkpoint(ckpt_path, {**payload, "replay": replay.state_dict(), "counters": dict(c), "rng": rng, "acting": acting})

    def evaluate_log_save() -> bool:
        """The end of a loop step: evaluate, log, checkpoint, each when due. False when a signal abandoned the
        evaluation: its random streams are rewound, and the resumed run starts with this again (eval_due)."""
        nonlocal eval_due, t_last, steps_last
        if eval_due or (args.eval_every and c["env_steps"] - c["last_eval"] >= args.eval_every and c["env_steps"] >= args.prefill):
            jobs = [(contexts[(c["episodes"] + i) % len(contexts)], args.seed + 10_000 + c["episodes"] + i) for i in range(args.eval_episodes)]
            streams = random.getstate(), np.random.get_state(), torch.get_rng_state()  # the policy samples from torch's
            try:
                returns = episode_returns(agent, args.task, args.obs, args.action_repeat, jobs, device, args.eval_mode == "sample",
                                          args.eval_episodes, stop=lambda: bool(stop.signum))  # fmt: skip
            except Interrupted:
                random.setstate(streams[0])
                np.random.set_state(streams[1])
                torch.set_rng_state(streams[2])
                eval_due = True
                return False
            eval_due = False
            c["last_eval"] = c["env_steps"]
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
        return True

    def say(line: str) -> None:
        (progress.write if args.progress else print)(line)

    stop = StopRequest()
    if eval_due:
        evaluate_log_save()  # finish the step the checkpoint was taken in, as the uninterrupted run did
    if c["env_steps"] < args.prefill:
        say(f"prefill: uniform random actions until env step {args.prefill} fill the replay; learning starts then "
            f"(one line every {args.log_every} env steps)")  # fmt: skip
    while not (c["env_steps"] >= args.steps and at_boundary) and not stop.signum:
        # Store record t = (o_t, a_{t-1}, r_t, is_first_t, is_terminal_t, ctx_t) of every env.
        for i in range(args.envs):
            replay.add(i, {obs_key: obs[obs_key][i], "action": prev_action[i], "reward": reward[i], "is_first": obs["is_first"][i],
                           "is_terminal": is_terminal[i], "context": true_context[i], **({"step": ep_step[i]} if counts_steps else {})})  # fmt: skip
        # Act
        if c["env_steps"] < args.prefill:
            action = action_rng.uniform(-1, 1, (args.envs, vec.action_size)).astype(np.float32)
        else:
            oracle = torch.as_tensor(true_context, device=device) if args.agent.context == "oracle" else None
            action_t, state = agent.act(to_torch(obs, device), state, context=oracle)
            action = action_t.cpu().numpy()
        obs, reward, term, trunc, info = vec.step(action)
        ep_return += reward
        c["env_steps"] += steps_per_vec
        progress.update(steps_per_vec)
        # Episode ends: store the last record of the old episode; the new one starts with a_{-1} = 0, r = 0.
        for i, final in info["final_obs"].items():
            replay.add(i, {obs_key: final[obs_key], "action": action[i], "reward": reward[i], "is_first": False,
                           "is_terminal": term[i], "context": info["final_context_vector"][i], **({"step": ep_step[i] + 1} if counts_steps else {})})  # fmt: skip
            logger.add({"episode/return": ep_return[i], "episode/length": envs.EPISODE_STEPS // args.action_repeat})
            progress.set_postfix(ret=f"{ep_return[i]:.1f}")
            ep_return[i] = 0.0
            c["episodes"] += 1
        done = obs["is_first"]
        true_context = info["context_vector"]
        prev_action = np.where(done[:, None], 0.0, action).astype(np.float32)
        reward = np.where(done, 0.0, reward).astype(np.float32)
        is_terminal = np.where(done, False, term)
        ep_step = np.where(done, 0, ep_step + 1).astype(np.int32)
        at_boundary = bool(done.all())
        # Train at the train ratio
        length = agent.context_prefix + args.batch_length  # learned context: P records of history first
        if c["env_steps"] >= args.prefill and replay.ready(length):
            policy_steps = (c["env_steps"] - args.prefill) // args.action_repeat
            while c["updates"] < policy_steps * updates_per_policy_step:
                batch = to_torch(replay.sample(args.batch_size, length), device)
                metrics = checked_update(agent, batch, c["updates"] + 1, c["env_steps"], ckpt_path)
                logger.add(metrics)
                c["updates"] += 1
                if c["updates"] == 1:
                    losses = ", ".join(f"{k} {float(metrics[k]):.3g}" for k in ("wm/loss", "ctx/fd_loss", "ac/actor_loss", "ac/critic_loss") if k in metrics)
                    say(f"learning started at env step {c['env_steps']}: first update {losses}; "
                        f"{updates_per_policy_step:.3g} updates per policy step from now on")  # fmt: skip
        # Evaluate, log, checkpoint
        if not evaluate_log_save():
            break
    if stop.signum:  # the metrics since the last log line stay pending in the checkpoint: the resumed run logs them
        if c["last_save"] != c["env_steps"]:  # not already saved at this very step
            checkpoint()
    else:
        if logger.pending:
            logger.write(c["env_steps"], progress if args.progress else None)
        checkpoint()  # the final state, nothing pending
    progress.close()
    logger.close()
    vec.close()
    stop.restore()
    if stop.signum:
        print(f"{signal.Signals(stop.signum).name}: saved {ckpt_path} at {c['env_steps']} env steps; continue with --resume", file=sys.stderr)
        raise SystemExit(128 + stop.signum)
    return c


def cli(argv: list[str] | None = None) -> Args:
    """Parse flags on top of the --size and --task preset (peeked first, so explicit flags override it)."""
    argv = sys.argv[1:] if argv is None else argv
    size, task = peek(argv, "--size", Args.size), peek(argv, "--task", Args.task)
    if size not in SIZES:
        raise SystemExit(f"error: unknown --size {size!r}; choose one of {list(SIZES)}")
    if task not in envs.TASKS:
        raise SystemExit(f"error: unknown --task {task!r}; choose one of {list(envs.TASKS)}")
    args = tyro.cli(Args, default=preset(size, task), args=argv, description=__doc__)
    if args.resume:  # the run's own configuration is the base; main() rejects changes outside RESUMABLE
        base = dataclasses.replace(saved_args(args.logdir), logdir=args.logdir, resume=True)
        args = tyro.cli(Args, default=base, args=argv, description=__doc__)
    return args


if __name__ == "__main__":
    main(cli())
