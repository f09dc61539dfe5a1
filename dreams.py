"""Counterfactual imagination (DALI, Röder et al., arXiv:2508.20294, Sec. 6.3): the context a trained agent
infers on recorded episodes, its spread, and dreams in which that context is shifted.

A counterfactual replaces ctx by ctx + m sigma_d e_d: dimension d shifted by m standard deviations sigma_d
(over many windows of many contexts). The shift applies wherever the agent reads ctx: a shallow (DALI-S)
agent's posterior while filtering the real prefix; a deep (DALI-D) agent's sequence model while filtering
and at every imagined step. counterfactual.py asks its questions with these dreams.

Shapes: E episodes, T steps, N chosen episodes, H horizon, M shifts, X ctx dims, A action dims.
"""

from __future__ import annotations

import torch

from dali import Agent, episode_steps, held_context, sequence_context
from layers import symexp
from rollout import Episodes


@torch.no_grad()
def inferred_context(agent: Agent, ep: Episodes, device) -> torch.Tensor:
    """ctx_t at every step, as when acting (a test asserts the two agree): (E, T, X)."""
    x = ep.x.to(device)
    tokens = x.float() if agent.spaces.image is None else agent.wm.encoder(x)
    ctx, _ = agent.ctx_encoder.segment(tokens, ep.action.to(device), ep.is_first.to(device))
    return ctx


def ctx_sigma(ctx: torch.Tensor, start: int) -> torch.Tensor:
    """sigma_d: the std of each ctx dimension over all windows (steps >= start) of all episodes: (X,)."""
    return ctx[:, start:].flatten(0, 1).std(0)


# ----------------------------------------------------------------------------------------------------
# Counterfactual dreams
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def dream(agent: Agent, ep: Episodes, ctx: torch.Tensor, index: torch.Tensor, start: int, horizon: int, actions: torch.Tensor,
          deltas: torch.Tensor, seed: int, decode_shifted: bool = False) -> torch.Tensor:  # fmt: skip
    """For every ctx change in `deltas` (M, X): filter episodes `index` (N,) up to step `start` with ctx + delta,
    then imagine `horizon` steps with `actions` (N, H, A) (a_t for t = start .. start+H-1), with ctx + delta
    in the sequence model in deep mode. The decoder of a deep agent reads ctx directly, so by default it
    decodes with the unshifted ctx: what changes in the dream then changed in the imagined dynamics, not in
    the decoder's input (`decode_shifted` decodes with ctx + delta). Every delta reuses the same random
    numbers (seed), so a zero delta reproduces the unperturbed dream exactly.
    Returns the decoded observations (M, N, H + 1, ...): features in env units, or images in [0, 1]."""
    return torch.stack([_dream_one(agent, ep, ctx, index, start, horizon, actions, delta, seed, decode_shifted) for delta in deltas])


def _dream_one(agent: Agent, ep: Episodes, ctx, index, start, horizon, actions, delta, seed, decode_shifted) -> torch.Tensor:
    torch.manual_seed(seed)  # common random numbers across counterfactuals
    wm, device = agent.wm, ctx.device
    x = ep.x[index, : start + 1].to(device)
    shifted = ctx[index, : start + 1] + delta  # (N, start+1, X)
    embed = wm.encoder(x.float() if agent.spaces.image is None else x)
    deep, post_ctx = agent.ctx_deep > 0, agent.ctx_post > 0
    is_first = ep.is_first[index, : start + 1].to(device)
    seq_ctx = shifted_heads = heads_ctx = None
    if deep:  # what the sequence model and the heads read in training, shifted; the decoder's, unshifted
        seq_ctx, shifted_heads = deep_path_context(agent, shifted, is_first)
        heads_ctx = deep_path_context(agent, ctx[index, : start + 1], is_first)[1]
    post, _ = wm.rssm.observe(embed, ep.action[index, : start + 1].to(device), is_first, ctx_seq=seq_ctx, ctx_post=shifted if post_ctx else None)
    state = {k: v[:, -1] for k, v in post.items()}
    step_ctx = shifted_heads[:, -1] if deep else None  # held for the whole dream, as WorldModel.imagine holds the start's
    decode_ctx = None if not deep else (step_ctx if decode_shifted else heads_ctx[:, -1])
    feats = [wm.feat(state, decode_ctx)]
    for t in range(horizon):
        state = wm.rssm.img_step(state, actions[:, t].to(device), step_ctx)
        feats.append(wm.feat(state, decode_ctx))
    return decode(agent, torch.stack(feats, 1))  # (N, H+1, F) -> observations


def decode(agent: Agent, feat: torch.Tensor) -> torch.Tensor:
    """Decoded observations of model features (N, L, F): features in env units, or images in [0, 1]."""
    decoder = agent.wm.decoder
    if agent.spaces.image is None:
        return symexp(decoder.net(feat)[..., : agent.spaces.obs])
    N, L = feat.shape[:2]
    img = decoder.net(decoder.inp(feat).reshape(N * L, -1, decoder.minres, decoder.minres))
    return (img.permute(0, 2, 3, 1).reshape(N, L, *agent.spaces.image) + 0.5).clamp(0, 1)


def deep_path_context(agent: Agent, ctx: torch.Tensor, is_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a deep agent's sequence model and heads read at every step of recorded episodes (as in training),
    from its per-step ctx (E, T, X): held values (`held_context`), or ctx_{t-1} and ctx_t (the per-step
    variant). The episodes start at step 0. Returns (sequence model's, heads') (E, T, X) each."""
    seq = sequence_context(ctx, is_first)
    if not agent.holds_context:
        return seq, ctx
    held = held_context(seq, episode_steps(is_first), agent.ctx_cfg.refresh)
    return held, held


def shift_deltas(shifts, dim: int, sigma: torch.Tensor, X: int) -> torch.Tensor:
    """(M, X): m sigma_d on dimension d, zero elsewhere, one row per shift m."""
    deltas = torch.zeros(len(shifts), X, device=sigma.device)
    deltas[:, dim] = torch.tensor(shifts, device=sigma.device) * sigma[dim]
    return deltas
