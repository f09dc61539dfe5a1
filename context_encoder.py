"""The DALI context encoder g and its forward-dynamics loss (Röder et al., arXiv:2508.20294, Sec. 4.2).

    ctx_t = g(o_{t-K:t}, a_{t-K:t-1})                       the context vector, inferred from the K most
                                                            recent transitions of the current episode
    L_FD  = || o_{t+1} - f(o_t, a_t, ctx_t) ||^2             eq. 3: trains g (and f), nothing else does
    L_cross (optional, "DALI-chi")                          aligns ctx_t with the world model's state: cross_modal.py
    L_TC (`--ctx.objective tc`, instead of L_FD)            SPC's latent temporal consistency: temporal_consistency.py

Token j is the transition (o_j, a_j, o_{j+1}); it exists only if o_{j+1} is in the same episode as o_j.
g is a one-layer transformer encoder over [CLS; window tokens] pooled at CLS: tokens -> linear ->
LayerNorm -> token MLP; a learned CLS query attends (4 heads, learned bias per relative position) to the
window's tokens; MLP; LayerNorm; linear -> ctx. With one layer the CLS output depends on the tokens only
through that attention, so the window of *every* step t -- tokens t-K .. t-1 of t's own episode, never o_{t+1}
or the previous episode -- is one row of a *banded, causal* attention mask, and all ctx_t of a replayed
segment come out of one pass. Acting runs the same function over a per-env buffer of the last K tokens
(`context_window.ContextWindow`). Short windows are masked, not zero-padded; with no transition yet, ctx_t is a learned
"no evidence yet" vector.

Why CLS pooling and not the output at the newest token: that output carries the newest transition itself
through the residual path, so ctx would vary step by step with the state. Measured on ball_in_cup random-
policy data, 100 s of training: linear probe R^2 for gravity 0.52 (newest-token readout), 0.96 (CLS
pooling); 0.88 without the token MLP (benchmarks/context_probe.py has the current numbers).

Features: tokens are [symlog o_j, a_j, symlog o_{j+1}, symlog(o_{j+1} - o_j)]; f's targets are symlog
o_{t+1}. Pixels: o is the world model's embedding, detached (targets too).

Shapes: B batch, L segment length (K history + T training steps), K window, O observation (or embedding)
size, A action dims, X context dims, U units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from layers import Dense, linear, symlog


@dataclass(frozen=True)
class ContextEncoderConfig:
    """The context encoder g, the forward model f and their optimiser (DALI Sec. 4.2, App. B)."""

    window: int = 64
    """K: transitions in a context window."""
    dim: int = 8
    """X: size of the context vector ctx."""
    units: int = 128
    """Transformer width."""
    heads: int = 4
    """Attention heads."""
    fd_units: int = 128
    """Units of the 2 hidden layers of the forward model f."""
    cross_weight: float = 0.0
    """Weight lambda_cross of L_cross (0: plain DALI; > 0: the paper's DALI-chi variant)."""
    lr: float = 1e-3
    """Adam learning rate of g and f (their own optimiser; 1e-3 reached probe R^2 0.95 where 3e-4 reached
    0.75 in the same 70 s on ball_in_cup)."""
    clip: float = 100.0
    """Gradient-norm clip of g and f."""
    refresh: int = 16
    """Deep integration (DALI-D) only: R, the policy steps one ctx is held. The deep path reads, at step n of
    an episode, the ctx of the last refresh step r = R * floor(n / R), pooled from transitions up to
    o_{r-1} (at r = 0: the "no evidence yet" ctx), in training, imagination and acting alike (dali.py:
    `held_context`). 16 = H + 1: an imagined rollout spans the states of one held interval. 0: the
    per-step variant (ctx_{t-1} into the sequence model, ctx_t into the heads at every step), which gives
    training a fresh observation channel that imagination lacks (docs/deep_context.md)."""
    objective: Literal["fd", "tc"] = "fd"
    """What trains g: fd, DALI's forward-dynamics loss L_FD (eq. 3, with f); tc, SPC's latent temporal
    consistency L_TC (temporal_consistency.py; f is then built but unused)."""
    tc_horizon: int = 5
    """H: open-loop steps of the L_TC rollout (SPC's default)."""
    tc_rho: float = 0.99
    """rho: weight rho^(k-1) of rollout step k in L_TC (SPC's default)."""
    tc_tau: float = 0.005
    """tau: EMA rate of L_TC's target observation encoder (SPC's default)."""
    tc_groups: int = 32
    """G: FSQ code groups of L_TC's observation encoder, each 2 channels of levels (5, 3) (SPC: 512)."""
    tc_units: int = 128
    """Units of L_TC's observation encoder (1 hidden layer) and transition model (2) (SPC: 512)."""


def transition_tokens(obs: torch.Tensor, next_obs: torch.Tensor, action: torch.Tensor, features: bool) -> torch.Tensor:
    """Token inputs of transitions (o_j, a_j, o_{j+1}): (..., O), (..., O), (..., A) -> (..., D_token)."""
    if features:
        return torch.cat([symlog(obs), action, symlog(next_obs), symlog(next_obs - obs)], -1)
    return torch.cat([obs, action, next_obs], -1)


class ContextEncoder(nn.Module):
    """g: the K most recent transitions -> ctx, and the forward model f used to train it."""

    def __init__(self, cfg: ContextEncoderConfig, obs: int, action: int, features: bool = True):
        super().__init__()
        self.cfg, self.obs_size, self.action_size, self.features = cfg, obs, action, features
        self.token_size = (3 * obs if features else 2 * obs) + action
        U = cfg.units
        self.embed = nn.Sequential(linear(self.token_size, U), nn.LayerNorm(U, eps=1e-3))
        self.token_mlp = _ffn(U)
        self.query = nn.Parameter(0.02 * torch.randn(U))  # the CLS token
        self.position = nn.Parameter(torch.zeros(cfg.heads, cfg.window))  # learned bias per head and offset
        self.attention = nn.MultiheadAttention(U, cfg.heads, batch_first=True)
        self.mlp = _ffn(U)
        self.out = nn.Sequential(nn.LayerNorm(U, eps=1e-3), linear(U, cfg.dim))
        self.empty = nn.Parameter(torch.zeros(cfg.dim))  # ctx before the first transition of an episode
        # The forward model f(o_t, a_t, ctx_t) -> o_{t+1}, residual in symlog space for features.
        self.forward_model = nn.Sequential(Dense(obs + action + cfg.dim, cfg.fd_units), Dense(cfg.fd_units, cfg.fd_units), linear(cfg.fd_units, obs))

    def attention_mask(self, valid: torch.Tensor, episode: torch.Tensor) -> torch.Tensor:
        """Additive mask (B * heads, L, L): the CLS query of row i (the window ending at token i) may attend
        to token j iff i - K < j <= i, j is a valid transition and both lie in the same episode; plus the
        learned bias of the offset i - j."""
        B, L = valid.shape
        K = self.cfg.window
        offset = torch.arange(L, device=valid.device)[:, None] - torch.arange(L, device=valid.device)[None, :]  # i - j
        band = (offset >= 0) & (offset < K)  # (L, L)
        allowed = band & valid[:, None, :] & (episode[:, :, None] == episode[:, None, :])  # (B, L, L)
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=valid.device)  # invalid queries: no NaN; discarded
        bias = self.position[:, offset.clamp(0, K - 1)]  # (heads, L, L)
        mask = torch.where(allowed[:, None], bias[None], torch.tensor(float("-inf"), device=valid.device))
        return mask.flatten(0, 1)  # (B * heads, L, L)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token layers: (..., D_token) -> (..., U)."""
        x = self.embed(tokens)
        return x + self.token_mlp(x)

    def _readout(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(pooled + self.mlp(pooled))  # (..., X)

    def encode(self, tokens: torch.Tensor, valid: torch.Tensor, episode: torch.Tensor) -> torch.Tensor:
        """Context of the window ending at each token: tokens (B, L, D_token), valid (B, L), episode ids
        (B, L) -> (B, L, X). Row j pools the valid same-episode tokens j-K+1 .. j; if token j itself is
        invalid (o_{j+1} starts an episode), the window is empty and the row is `empty`."""
        x = self.embed_tokens(tokens)  # (B, L, U)
        query = self.query.expand_as(x)  # one CLS query per window
        pooled, _ = self.attention(query, x, x, attn_mask=self.attention_mask(valid, episode), need_weights=False)
        ctx = self._readout(pooled)  # (B, L, X)
        return torch.where(valid[..., None], ctx, self.empty.expand_as(ctx))

    def encode_last(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The context of one window per row, all of whose tokens lie in one episode: tokens (N, K, D_token)
        oldest first, valid (N, K) -> (N, X). Equals the last row of `encode` (a test checks it) at 1/K of
        its attention cost: acting needs only the newest window. Tokens are embedded with the current
        weights at every call, since training updates g between acting steps."""
        N, K = valid.shape
        x = self.embed_tokens(tokens)  # (N, K, U)
        allowed = valid.clone()
        allowed[:, -1] = True  # an invalid newest token means an empty window: no NaN, replaced below
        bias = self.position[:, :K].flip(-1)  # (heads, K): offsets K-1 .. 0
        mask = torch.where(allowed[:, None], bias[None], torch.tensor(float("-inf"), device=x.device))  # (N, heads, K)
        query = self.query.expand(N, 1, -1)
        pooled, _ = self.attention(query, x, x, attn_mask=mask.reshape(N * self.cfg.heads, 1, K), need_weights=False)
        ctx = self._readout(pooled[:, 0])  # (N, X)
        return torch.where(valid[:, -1:], ctx, self.empty.expand_as(ctx))

    def segment(self, obs: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx_t for every step of replayed segments in one pass.

        obs (B, L, O) with o_t, action (B, L, A) holding a_{t-1} (the replay convention of dali.py),
        is_first (B, L). Returns ctx (B, L, X), where ctx_t uses transitions strictly before t (its window is
        cut at the segment start: use the last L - K steps for full windows), and the token validity (B, L-1):
        token j = (o_j, a_j, o_{j+1}) is valid iff o_{j+1} continues o_j's episode.
        """
        B, L = obs.shape[:2]
        tokens = transition_tokens(obs[:, :-1], obs[:, 1:], action[:, 1:], self.features)  # (B, L-1, D)
        valid = ~is_first[:, 1:]  # (B, L-1)
        episode = torch.cumsum(is_first.long(), 1)[:, :-1]  # (B, L-1): episode of token j = episode of o_j
        summary = self.encode(tokens, valid, episode)  # (B, L-1, X); token j -> ctx_{j+1}
        first = self.empty.expand(B, 1, -1)  # ctx_0 of the segment: no transition seen
        return torch.cat([first, summary], 1), valid

    def predict_next(self, obs: torch.Tensor, action: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """f(o_t, a_t, ctx_t): the predicted (symlog) next observation, (..., O), as o_t plus a change."""
        x = symlog(obs) if self.features else obs
        return x + self.forward_model(torch.cat([x, action, ctx], -1))


def _ffn(units: int) -> nn.Sequential:
    """The transformer's pre-norm feed-forward block (used with a residual connection)."""
    return nn.Sequential(nn.LayerNorm(units, eps=1e-3), nn.Linear(units, 2 * units), nn.GELU(), nn.Linear(2 * units, units))


def forward_dynamics_loss(encoder: ContextEncoder, obs, next_obs, action, ctx, valid) -> torch.Tensor:
    """DALI eq. 3, L_FD = ||o_{t+1} - f(o_t, a_t, ctx_t)||^2 (symlog targets for features, detached
    embeddings for pixels), zero where o_{t+1} starts a new episode. (B, T, ...) -> (B, T)."""
    target = symlog(next_obs) if encoder.features else next_obs.detach()
    error = ((encoder.predict_next(obs, action, ctx) - target) ** 2).sum(-1)
    return error * valid.to(error.dtype)
