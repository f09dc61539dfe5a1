"""The acting-time context window of DALI's context encoder g (Röder et al., arXiv:2508.20294, Sec. 4.2): each
env's last K transitions of its current episode, from which g gives ctx_t at every policy step, and, for deep
integration, the ctx held since the last refresh step (dali.held_context has the same rule for training).
Its ctx equals the last row of ContextEncoder.segment over the same records (a test checks it).

Shapes: N envs, K window, D token size, X ctx dims.
"""

from __future__ import annotations

import torch

from context_encoder import ContextEncoder, transition_tokens


class ContextWindow:
    """Acting-time window: the last K tokens of each env's current episode, emptied at is_first. With
    `refresh` R > 0 (deep integration) it also counts each env's step n in its episode and holds the ctx
    that the deep path reads between refresh steps (`hold`)."""

    def __init__(self, encoder: ContextEncoder, n: int, device, refresh: int = 0):
        K, D = encoder.cfg.window, encoder.token_size
        self.encoder, self.refresh = encoder, refresh
        self.tokens = torch.zeros(n, K, D, device=device)  # transition tokens, oldest first
        self.valid = torch.zeros(n, K, dtype=torch.bool, device=device)
        self.prev_obs: torch.Tensor | None = None  # o_{t-1}
        self.ctx: torch.Tensor | None = None  # the latest ctx returned, (N, X)
        self.step = torch.zeros(n, dtype=torch.long, device=device)  # n: step of the newest o in its episode
        self.held: torch.Tensor | None = None  # the ctx held since the last refresh step, (N, X)

    def state_dict(self) -> dict:
        """The window's contents (tensors or None), for a checkpoint taken mid-episode."""
        state = {"tokens": self.tokens, "valid": self.valid, "prev_obs": self.prev_obs, "ctx": self.ctx}
        return {**state, "step": self.step, "held": self.held} if self.refresh else state

    def load_state_dict(self, state: dict) -> None:
        device = self.tokens.device
        self.tokens, self.valid = state["tokens"].to(device), state["valid"].to(device)
        self.prev_obs, self.ctx = (None if state[k] is None else state[k].to(device) for k in ("prev_obs", "ctx"))
        if self.refresh:
            self.step, self.held = state["step"].to(device), None if state["held"] is None else state["held"].to(device)

    def hold(self, ctx: torch.Tensor) -> torch.Tensor:
        """The deep path's ctx at the newest step n: `ctx` (N, X), the sequence context of this step
        (ctx_{n-1}; at n = 0 the empty ctx), taken where n is a multiple of R, else the value held before."""
        refresh = (self.step % self.refresh == 0)[:, None]  # (N, 1)
        self.held = ctx if self.held is None else torch.where(refresh, ctx, self.held)
        return self.held

    def update(self, obs: torch.Tensor, prev_action: torch.Tensor, is_first: torch.Tensor) -> torch.Tensor:
        """Add the transition (o_{t-1}, a_{t-1}, o_t) unless o_t starts an episode; return ctx_t (N, X).
        A window that has seen no observation yet (a fresh window, e.g. when the policy takes over from
        random prefill mid-episode) treats o_t as an episode start: it has no o_{t-1} to pair it with."""
        if self.prev_obs is None:
            self.prev_obs, is_first = obs, torch.ones_like(is_first)
        self.step = torch.where(is_first, torch.zeros_like(self.step), self.step + 1)
        token = transition_tokens(self.prev_obs, obs, prev_action, self.encoder.features)  # (N, D)
        self.tokens = torch.cat([self.tokens[:, 1:], token[:, None]], 1)
        self.valid = torch.cat([self.valid[:, 1:] & ~is_first[:, None], ~is_first[:, None]], 1)
        self.prev_obs = obs
        self.ctx = self.encoder.encode_last(self.tokens, self.valid)
        return self.ctx
