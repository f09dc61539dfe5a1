"""What the physics allows: the return a sampling planner with the true simulator reaches, per context of a
ball_in_cup evaluation grid (docs/results.md, "The whole ball_in_cup protocol").

    python benchmarks/planner_ceiling.py --distances 0.225 0.45 0.48 0.51 0.54 0.57 0.6 --episodes 2

The zero-shot tables normalise every context by an expert return of 1000, as the DALI release does. When every
agent scores 0 in a context (the longest strings of `single_1`), that is either the agents' failure or a context
nobody can solve; this planner tells the two apart. It is an oracle: it copies the simulator's exact state and
searches action sequences in it, so its return is a lower bound on what the physics allows, not a method.

The planner: receding-horizon cross-entropy search (CEM) over open-loop action sequences. Every `--replan`
seconds it rolls out `--population` sequences of `--horizon` seconds from the env's current MuJoCo state
(mujoco.rollout, in C), keeps the `--elites` best, refits a per-step Gaussian, `--iterations` times (fewer once
the current plan holds the ball in the cup for the whole horizon), then acts the mean's first `--replan` seconds
in the real env (its action repeat; the return reported is the env's own). Candidates are smooth: Gaussian
noise at knots every `--knot` agent steps, linear in between, added to the mean; actions are held for one agent
step (action repeat x 10 physics steps). A sequence's score is the task's reward (control steps with the ball
in the cup, as dm_control's `in_target` computes it, from the rolled-out states) plus two shaping terms that
guide the search before any candidate catches the ball: the ball's largest mechanical energy (pumping a swing
or jerking the string raises it step by step; without it the search only lifts the ball and never catches it
at string 0.45, where the agents do) and minus its smallest distance "from above" to the target. The shaping
never enters the reported return. Episodes start from the zero-shot evaluation's reset seeds (`evaluate.py run`:
seed + context index x 10 + episode), so they start where the agents' episodes started. Before planning, the
script checks that its reward from qpos equals the env's on every step of a random-action episode.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mujoco
import mujoco.rollout
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import envs  # noqa: E402

EVAL_EPISODES = 10  # episodes per context of the zero-shot evaluation (evaluate.py run), for its reset seeds
STATE = mujoco.mjtState.mjSTATE_FULLPHYSICS  # time, qpos, qvel, act, ...: what mujoco.rollout starts from


@dataclass(frozen=True)
class Args:
    setting: envs.Setting = "single_1"
    """ball_in_cup evaluation grid whose contexts are planned in (contexts.eval_contexts)."""
    distances: tuple[float, ...] = ()
    """Only the grid's contexts with these string lengths (empty: every context of the grid)."""
    gravities: tuple[float, ...] = ()
    """Only the grid's contexts with these gravities (empty: every context)."""
    episodes: int = 2
    """Episodes per context (reset seeds as the zero-shot evaluation's first episodes)."""
    seed: int = 100_000
    """Base reset seed of the zero-shot evaluation (evaluate.py run --seed)."""
    action_repeat: int = 2
    """The agents' action repeat: the planner's actions are held as long as theirs."""
    horizon: float = 4.0
    """Seconds each candidate sequence is rolled out."""
    replan: float = 1.0
    """Seconds of the best plan acted before searching again."""
    population: int = 128
    """Sequences rolled out per CEM iteration."""
    elites: int = 16
    """Best sequences the Gaussian is refitted to."""
    iterations: int = 8
    """CEM iterations per search."""
    shaping: float = 0.5
    """Weight of the shaping term in a sequence's score: minus the ball's smallest "distance from above" to the
    target over the horizon (m): |dx| plus how far the ball is below the target."""
    beside: float = 0.25
    """Weight of |dx| against the height below the target in the shaping's distance (a swing goes sideways)."""
    energy: float = 0.1
    """Weight of the ball's largest mechanical energy (J/kg) over the horizon in the score."""
    knot: int = 4
    """Agent steps between the search's noise knots (linear in between): smooth, swinging candidates."""
    max_seconds: float = 20.0
    """Stop an episode after this many seconds of env time (20: the whole episode)."""
    out: str = "docs/results/bic_string/planner_ceiling.json"
    """Output JSON file (one entry per context)."""


class CupGeometry:
    """Ball and target positions (x, z) from MuJoCo qpos (cup_x, cup_z, ball_x, ball_z), as dm_control's
    ball_in_cup `in_target` reads them: the ball is in when |ball - target| < target half-size - ball radius."""

    def __init__(self, model: mujoco.MjModel):
        cup, ball = model.body("cup").id, model.body("ball").id
        self.target0 = (model.body_pos[cup] + model.site("target").pos)[[0, 2]]  # (2,) at qpos 0
        self.ball0 = (model.body_pos[ball] + model.site("ball").pos)[[0, 2]]
        self.slack = model.site("target").size[[0, 2]] - model.geom("ball").size[0]  # (2,)
        self.qpos = [model.joint(n).qposadr[0] for n in ("cup_x", "cup_z", "ball_x", "ball_z")]  # qvel alike (slides)

    def ball_to_target(self, qpos: np.ndarray) -> np.ndarray:
        """(..., nq) -> (..., 2) target minus ball."""
        target = self.target0 + qpos[..., self.qpos[0:2]]
        ball = self.ball0 + qpos[..., self.qpos[2:4]]
        return target - ball

    def ball_energy(self, qpos: np.ndarray, qvel: np.ndarray, g: float) -> np.ndarray:
        """(..., nq), (..., nv) -> (...) the ball's mechanical energy per unit mass (J/kg), its height measured from
        the target at rest: 0.5 |v_ball|^2 + g (z_ball - z_target0). Pumping a swing or jerking the string raises it.
        (Measured in the cup's frame instead, it is dominated by the light cup's own jerks and the search stalls.)"""
        v = qvel[..., self.qpos[2:4]]
        height = self.ball0[1] + qpos[..., self.qpos[3]] - self.target0[1]  # z_ball above the resting target
        return 0.5 * (v**2).sum(-1) + g * height

    def in_target(self, qpos: np.ndarray) -> np.ndarray:
        return np.all(np.abs(self.ball_to_target(qpos)) < self.slack, axis=-1)


def check_geometry(context: dict, steps: int = 1000) -> None:
    """The search's reward must be the env's: random actions, one control step at a time, in a context where the
    ball often lands in the cup; every step's in_target from qpos must equal the env's reward."""
    env = envs.make_env("ball_in_cup", "features", [context], seed=0, action_repeat=1)
    env.reset()
    geometry, rng, caught = CupGeometry(env.physics.model.ptr), np.random.default_rng(0), 0
    for t in range(steps):
        _, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
        mine = float(geometry.in_target(env.physics.data.qpos.copy()))
        assert mine == reward, f"step {t}: in_target from qpos {mine}, env reward {reward} ({context})"
        caught += reward > 0
        if terminated or truncated:
            break
    assert caught > 0, f"the check never saw the ball in the cup ({context}): it proves nothing"
    env.close()


def plan_episode(args: Args, context: dict, reset_seed: int) -> tuple[float, int | None]:
    """One episode acted by the planner: (the env's return, the first agent step with reward, or None)."""
    env = envs.make_env("ball_in_cup", "features", [context], reset_seed, args.action_repeat)
    env.reset()
    model, data = env.physics.model.ptr, env.physics.data.ptr
    geometry = CupGeometry(model)
    substeps = env._env._n_sub_steps * args.action_repeat  # physics steps per agent step
    per_control = env._env._n_sub_steps  # physics steps per control step (the reward's clock)
    agent_dt = model.opt.timestep * substeps
    horizon, replan = round(args.horizon / agent_dt), round(args.replan / agent_dt)  # in agent steps
    rng = np.random.default_rng(reset_seed)
    knot_count = horizon // args.knot + 2
    steps, knot_at = np.arange(horizon), np.arange(knot_count) * args.knot
    thread_data = [mujoco.MjData(model)]
    mean, std = np.zeros((horizon, model.nu)), np.full((horizon, model.nu), 0.8)
    state = np.empty(mujoco.mj_stateSize(model, STATE))
    total, first_reward, step, done = 0.0, None, 0, False
    while not done and step * agent_dt < args.max_seconds:
        mujoco.mj_getState(model, data, state, STATE)
        for _ in range(args.iterations):
            knots = rng.standard_normal((args.population, knot_count, model.nu))  # (N, K, A)
            noise = np.stack([np.stack([np.interp(steps, knot_at, k[:, a]) for a in range(model.nu)], -1) for k in knots])
            plans = np.clip(mean + std * noise, -1, 1)  # (N, H, A)
            plans[0] = np.clip(mean, -1, 1)
            ctrl = np.repeat(plans, substeps, axis=1)  # (N, H * substeps, A)
            states, _ = mujoco.rollout.rollout(model, thread_data, state[None], ctrl)  # (N, H * substeps, S)
            qpos = states[:, per_control - 1 :: per_control, 1 : 1 + model.nq]  # (N, control steps, nq)
            gap = geometry.ball_to_target(qpos)  # (N, steps, 2) target minus ball
            from_above = args.beside * np.abs(gap[..., 0]) + np.maximum(gap[..., 1], 0.0)  # ball beside or below the target: > 0
            qvel = states[:, per_control - 1 :: per_control, 1 + model.nq : 1 + 2 * model.nq]
            energy = geometry.ball_energy(qpos, qvel, -model.opt.gravity[2])  # (N, steps)
            score = geometry.in_target(qpos).sum(1) - args.shaping * from_above.min(1) + args.energy * energy.max(1)
            if geometry.in_target(qpos[0]).all():  # the current plan keeps the ball in for the whole horizon
                break
            elite = plans[np.argsort(-score)[: args.elites]]
            mean, std = elite.mean(0), np.maximum(elite.std(0), 0.05)
        for a in np.clip(mean[:replan], -1, 1):
            _, reward, terminated, truncated, _ = env.step(a.astype(np.float32))
            total += reward
            if reward > 0 and first_reward is None:
                first_reward = step
            step += 1
            done = terminated or truncated
            if done:
                break
        mean = np.concatenate([mean[replan:], np.zeros((replan, model.nu))])  # warm start: the rest of the plan
        std = np.concatenate([np.maximum(std[replan:], 0.3), np.full((replan, model.nu), 0.8)])
    env.close()
    return total, first_reward


def main(args: Args) -> list[dict]:
    check_geometry({"gravity": 9.81, "distance": 0.06})  # a short string: the ball is in the cup on many steps
    grid = envs.eval_contexts("ball_in_cup", args.setting)
    rows = []
    for i, (context, regime) in enumerate(grid):
        if args.distances and not any(np.isclose(context["distance"], d) for d in args.distances):
            continue
        if args.gravities and not any(np.isclose(context["gravity"], g) for g in args.gravities):
            continue
        start = time.time()
        episodes = [plan_episode(args, context, args.seed + i * EVAL_EPISODES + e) for e in range(args.episodes)]
        returns = [r for r, _ in episodes]
        rows.append({"context": context, "regime": regime, "returns": returns, "first_reward_step": [f for _, f in episodes],
                     "mean": float(np.mean(returns)), "seconds": round(time.time() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/planner_ceiling.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps({"command": command, "args": vars(args), "contexts": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
