"""Uniform replay of fixed-length sequences (DreamerV3, arXiv:2301.04104, Sec. 2 and App. A).

One ring buffer per env keeps each env's records in order, so a sampled (B, T) sequence is T consecutive
records of one env; it may cross an episode boundary, marked by is_first, where the RSSM restarts its
state. A learned-context agent samples P + T records: P = dali.context_prefix records of history (the
context window K, or K + 1 with deep integration) before the T training steps.
Record t holds o_t, a_{t-1}, r_t, is_first_t, is_terminal_t and the true context (dali.py's convention).
"""

from __future__ import annotations

import numpy as np
import torch


class Replay:
    """Uniform replay of fixed-length sequences. One ring buffer per env keeps each env's records in order;
    sampled sequences may cross episode boundaries, marked by is_first (DreamerV3)."""

    def __init__(self, capacity: int, num_envs: int, spec: dict[str, tuple[tuple, np.dtype]], seed: int):
        self.cap = max(1, capacity // num_envs)
        self.data = {k: np.zeros((num_envs, self.cap, *shape), dtype) for k, (shape, dtype) in spec.items()}
        self.count = np.zeros(num_envs, np.int64)  # records ever added per env
        self.rng = np.random.default_rng(seed)

    def add(self, env: int, record: dict[str, np.ndarray]) -> None:
        i = self.count[env] % self.cap
        for k, v in record.items():
            self.data[k][env, i] = v
        self.count[env] += 1

    def ready(self, length: int) -> bool:
        """Whether some env holds a full sequence of `length` records."""
        return bool((np.minimum(self.count, self.cap) >= length).any())

    def __len__(self) -> int:
        return int(np.minimum(self.count, self.cap).sum())

    def sample(self, batch: int, length: int) -> dict[str, np.ndarray]:
        """(B, T) sequences, uniform over all valid start positions of all envs."""
        stored = np.minimum(self.count, self.cap)
        starts = np.maximum(stored - length + 1, 0)  # valid starts per env
        if starts.sum() == 0:
            raise RuntimeError(f"replay holds no sequence of length {length} yet")
        env = self.rng.choice(len(starts), size=batch, p=starts / starts.sum())
        offset = self.rng.integers(0, starts[env])  # chronological index of the first step
        oldest = self.count[env] - stored[env]
        index = (oldest[:, None] + offset[:, None] + np.arange(length)) % self.cap  # (B, T)
        return {k: v[env[:, None], index] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        """Tensors and plain types only, so that checkpoints load with torch.load(weights_only=True)."""
        filled = int(min(self.count.max(), self.cap))  # the preallocated tail is empty: do not save it
        data = {k: torch.from_numpy(v[:, :filled].copy()) for k, v in self.data.items()}
        return {"data": data, "count": torch.from_numpy(self.count.copy()), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["data"].items():
            self.data[k][:, : v.shape[1]] = v.numpy()
        self.count[:] = state["count"].numpy()
        self.rng.bit_generator.state = state["rng"]
