"""L_cross, the cross-modal alignment of DALI's "-chi" variants (Röder et al., arXiv:2508.20294, Sec. 4.2).

    state term    || [h_t; z_t] - sg(W ctx_t) ||^2       trains the world model (RSSM and encoder), never g
    context term  || ctx_t - V sg([h_t; z_t]) ||^2       trains g (and V), never the world model
    g's objective L_FD + lambda * O * context term       (`context_objective`; the state term is one of the
                                                         world model's losses, world_model.py)

These are the two terms of the release's `reconstruct_wm_state_loss`, with W fixed as it is there, weighed
against L_FD per dimension as there. The context encoder g and L_FD live in context_encoder.py.

L_cross aligns ctx_t with [h_t; z_t], the world model's posterior state, as the release does (the paper's
text describes z_t alone): the DALI-chi numbers the paper reports come from the release's code, and h_t is
where the RSSM keeps what it has inferred over the episode. One difference remains: the release computes its
state in a loop of its own, one step from the stop-gradiented previous state, so the state term's gradient
reaches one GRU step back; here it is the training posterior, and the gradient runs through the unrolled
sequence like the world model's own losses.

Shapes: B batch, T training steps, X context dims, D + S*C the model state [h_t; z_t] (deterministic,
stochastic x classes), O observation (or embedding) size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from layers import linear


class CrossModal(nn.Module):
    """The two linear maps of L_cross (DALI's "-chi" variants; the release's `reconstruct_wm_state_loss`).

    W, `ctx_to_state`: ctx_t -> the model state [h_t; z_t]. The release only ever uses W ctx under a
    stop-gradient, so W never trains there and stays at its random initialisation: a fixed random projection,
    here frozen outright (no gradient, in no optimiser). V, `state_to_ctx`: [h_t; z_t] -> ctx_t, trained with g.
    """

    def __init__(self, ctx: int, state: int):
        super().__init__()
        self.ctx_to_state = linear(ctx, state).requires_grad_(False)
        self.state_to_ctx = linear(state, ctx)


def cross_modal_state_loss(cross: CrossModal, ctx: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """L_cross, the state term: || [h_t; z_t] - sg(W ctx_t) ||^2 / dim. It pulls the world model's state towards
    a fixed linear image of the context, so the state carries what ctx knows; with ctx stop-gradiented it trains
    the world model (RSSM and encoder) and never g. ctx (B, T, X), state (B, T, D + S*C) -> (B, T)."""
    return ((state - cross.ctx_to_state(ctx.detach()).detach()) ** 2).mean(-1)


def cross_modal_context_loss(cross: CrossModal, ctx: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """L_cross, the context term: || ctx_t - V sg([h_t; z_t]) ||^2 / X. It pulls ctx towards a linear read-out of
    the model state, so ctx carries what the state knows; with the state stop-gradiented it trains g and V and
    never the world model. ctx (B, T, X), state (B, T, D + S*C) -> (B, T)."""
    return ((ctx - cross.state_to_ctx(state.detach())) ** 2).mean(-1)


def context_objective(fd: torch.Tensor, cross: torch.Tensor, cross_weight: float, target_dims: int) -> torch.Tensor:
    """g's objective with L_cross (DALI-chi): L_FD + lambda * O * L_cross's context term; scalars -> scalar.
    L_FD sums its squared error over the O target dimensions (DreamerV3's convention for a decoder), the
    release averages it over them, as both do the context term over X; the factor O keeps the release's
    balance, lambda per dimension of each (its `loss_fd + lambda_cross * loss_cross`)."""
    return fd + cross_weight * target_dims * cross
