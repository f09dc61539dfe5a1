"""Several contextual DMC envs stepped as one batch, with DreamerV3's auto-reset convention (the acting side of
DreamerV3's training loop, arXiv:2301.04104 App. A; DALI Sec. 6 trains on 4 such envs, each cycling its own
training contexts).

    vec = VectorEnv([envs.make_env(task, obs, contexts, seed + i) for i in range(N)])
    obs, info = vec.reset()                                   # obs[k]: (N, ...), obs["is_first"] (N,)
    obs, reward, terminated, truncated, info = vec.step(actions)   # actions (N, A)

The envs step one after another, in this process.
"""

from __future__ import annotations

import numpy as np

from envs import ContextualDMC


class VectorEnv:
    """Several envs stepped as one batch. Observations are stacked on a leading N axis.

    An env whose episode ended is reset inside `step`: the returned observation is then the first one of
    its new episode and `is_first[i]` is True (DreamerV3's convention), with the last observation of the
    old episode in `info["final_obs"][i]` and its normalised context in `info["final_context_vector"][i]`.
    `info["context_vector"]` (N, X) is the normalised true context of each returned observation.
    """

    def __init__(self, envs: list[ContextualDMC]):
        if not envs:
            raise ValueError("VectorEnv needs at least one env")
        self.envs = envs
        self.num_envs = len(envs)
        self.action_size = envs[0].action_size

    def reset(self, seed: int | None = None) -> tuple[dict, dict]:
        results = [env.reset(seed=None if seed is None else seed + i) for i, env in enumerate(self.envs)]
        obs = self._stack([o for o, _ in results])
        obs["is_first"] = np.ones(self.num_envs, bool)
        infos = [info for _, info in results]
        return obs, {"context": [i["context"] for i in infos], "context_vector": np.stack([i["context_vector"] for i in infos])}

    def step(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs, self.action_size):
            raise ValueError(f"actions shape {actions.shape}: expected ({self.num_envs}, {self.action_size})")
        obs_list, rewards, terms, truncs, contexts, final, final_context = [], [], [], [], [], {}, {}
        is_first = np.zeros(self.num_envs, bool)
        for i, (env, action) in enumerate(zip(self.envs, actions)):
            o, r, term, trunc, info = env.step(action)
            if term or trunc:
                final[i], final_context[i] = o, info["context_vector"]
                o, info = env.reset()
                is_first[i] = True
            contexts.append(info["context_vector"])
            obs_list.append(o)
            rewards.append(r)
            terms.append(term)
            truncs.append(trunc)
        obs = self._stack(obs_list)
        obs["is_first"] = is_first
        info = {"context_vector": np.stack(contexts), "final_obs": final, "final_context_vector": final_context}
        return obs, np.asarray(rewards, np.float32), np.asarray(terms), np.asarray(truncs), info

    @staticmethod
    def _stack(obs_list: list[dict]) -> dict[str, np.ndarray]:
        return {k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]}

    def close(self) -> None:
        for env in self.envs:
            env.close()
