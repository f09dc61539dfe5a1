"""Acting without learning, in fixed contexts: the episodes that zero-shot evaluation scores (DALI,
arXiv:2508.20294, Sec. 6), train.py's periodic evaluation, the uniform random policy that defines score 0,
the policy episodes the counterfactual analysis records (Sec. 6.3), and the episodes film.py films.

Every episode starts from a fresh agent state (latent, previous action, empty context window): the agent
infers the context from scratch, and nothing is learned between episodes. Envs of one batch act in
lockstep; DMC episodes have a fixed length, so the episodes of a batch end together.

Shapes: N envs in lockstep, T steps, O features, A action dims, X context dims, H x W frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import envs
from dali import Agent, AgentConfig
from vector_env import VectorEnv


class RandomPolicy:
    """Uniform random actions in [-1, 1]: the score-0 reference of the per-context normalisation. It has the
    acting interface of `Agent` (initial_state, act), so the loops below run it like any agent."""

    cfg = AgentConfig(context="none")  # reads no true context

    def __init__(self, action_size: int, seed: int):
        self.action_size, self.rng = action_size, np.random.default_rng(seed)

    def initial_state(self, n: int) -> None:
        return None

    def act(self, obs: dict, state: None, sample: bool = True, context: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        n = len(obs["is_first"])
        return torch.as_tensor(self.rng.uniform(-1, 1, (n, self.action_size)).astype(np.float32)), None


class Interrupted(Exception):
    """`stop` asked play / episode_returns to give up before the episodes ended (train.py: a signal)."""


def play(
    agent: Agent | RandomPolicy,
    vec: VectorEnv,
    sample: bool,
    device,
    on_state: Callable[[], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """One episode in every env of `vec`, from a fresh agent state: the returns (N,). `on_state` runs on every
    state the agents act on, the first included (e.g. to render it); `stop`, before every step: when it says
    True, Interrupted is raised."""
    o, info = vec.reset()
    if on_state is not None:
        on_state()
    state = agent.initial_state(vec.num_envs)
    total, done = np.zeros(vec.num_envs), np.zeros(vec.num_envs, bool)
    while not done.all():  # the VectorEnv auto-resets finished envs; their later rewards are ignored
        if stop is not None and stop():
            raise Interrupted
        oracle = torch.as_tensor(info["context_vector"], device=device) if agent.cfg.context == "oracle" else None
        action, state = agent.act({k: torch.as_tensor(v, device=device) for k, v in o.items()}, state, sample=sample, context=oracle)
        o, reward, term, trunc, info = vec.step(action.cpu().numpy())
        total += reward * ~done
        done |= term | trunc
        if on_state is not None and not done.all():
            on_state()
    return total


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
    stop: Callable[[], bool] | None = None,
) -> list[float]:
    """Return of one episode per (context, reset seed) job, `batch` envs acting in lockstep with the
    current policy (no learning). Every episode starts with a fresh agent state. `stop` is checked before
    every step (play): when it says True, Interrupted is raised."""
    returns: list[float] = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        vec = VectorEnv([envs.make_env(task, obs, [context], seed, action_repeat) for context, seed in chunk])
        try:
            returns += play(agent, vec, sample, device, stop=stop).tolist()
        finally:
            vec.close()
        if progress is not None:
            progress.update(len(chunk))
    return returns


@dataclass
class Episodes:
    """Policy episodes, (E, T, ...) in the replay convention of dali.py (record t: o_t, a_{t-1})."""

    x: torch.Tensor  # (E, T, O) features, or (E, T, 64, 64, 3) uint8 images
    action: torch.Tensor  # (E, T, A): a_{t-1}, zeros at t = 0
    is_first: torch.Tensor  # (E, T) bool
    true_context: np.ndarray  # (E, X) normalised true context
    contexts: list[dict]  # (E,) the true context of each episode
    physics: np.ndarray  # (E, T, P) MuJoCo state (qpos, qvel, act) at each step


def record(agent: Agent, task: str, obs: str, action_repeat: int, jobs: list[tuple[dict, int]], steps: int, device) -> Episodes:
    """The first `steps` policy steps of one episode per (context, seed) job, actions sampled from the policy."""
    vec = VectorEnv([envs.make_env(task, obs, [c], seed, action_repeat) for c, seed in jobs])
    o, info = vec.reset()
    key = "obs" if obs == "features" else "image"
    state = agent.initial_state(vec.num_envs)
    xs, actions, physics = [], [torch.zeros(vec.num_envs, vec.action_size)], []
    for t in range(steps):
        xs.append(torch.as_tensor(o[key]))
        physics.append(np.stack([env.physics.get_state() for env in vec.envs]))
        action, state = agent.act({k: torch.as_tensor(v, device=device) for k, v in o.items()}, state)
        if t < steps - 1:
            actions.append(action.cpu())
            o, *_ = vec.step(action.cpu().numpy())
    vec.close()
    is_first = torch.zeros(vec.num_envs, steps, dtype=torch.bool)
    is_first[:, 0] = True
    true = np.stack([envs.normalize_context(task, c) for c, _ in jobs])
    return Episodes(torch.stack(xs, 1), torch.stack(actions, 1), is_first, true, [c for c, _ in jobs], np.stack(physics, 1))
