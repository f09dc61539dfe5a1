"""Env steps/s of the contextual DMC tasks (envs.py): features and pixels, 4 envs stepped as one batch with
random actions, a new context every episode. Run by hand: python benchmarks/env_speed.py"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
from vector_env import VectorEnv  # noqa: E402


def main(policy_steps: int = 1000, num_envs: int = 4, action_repeat: int = 2) -> None:
    print(f"{'task':<12} {'obs':<9} {'env steps/s':>12} {'policy steps/s':>15}   ({num_envs} envs, action repeat {action_repeat})")
    for task in envs.TASKS:
        contexts = envs.train_contexts(task, "double_box", n=100, seed=0)
        for obs in ("features", "pixels"):
            vec = VectorEnv([envs.make_env(task, obs, contexts, seed=i, action_repeat=action_repeat) for i in range(num_envs)])
            vec.reset()
            rng = np.random.default_rng(0)
            start = time.perf_counter()
            for _ in range(policy_steps // num_envs):
                vec.step(rng.uniform(-1, 1, (num_envs, vec.action_size)))
            rate = (policy_steps // num_envs) * num_envs / (time.perf_counter() - start)
            print(f"{task:<12} {obs:<9} {rate * action_repeat:>12,.0f} {rate:>15,.0f}")
            vec.close()


if __name__ == "__main__":
    main()
