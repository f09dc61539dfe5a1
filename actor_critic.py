"""DreamerV3's actor-critic, trained in imagination (Hafner et al., arXiv:2301.04104, Sec. 3, eq. 6-11).

    actor            a_t ~ pi(a_t | s_t) = Normal(tanh(mu), 0.9 sigmoid(x + 2) + 0.1)       (App. B)
    critic           v(s_t): symlog two-hot over 255 bins, zero-initialised output layer
    lambda-return    R_t = r_{t+1} + gamma c_{t+1} ((1 - lambda) v(s_{t+1}) + lambda R_{t+1}),  R_H = v(s_H)   (eq. 7)
    critic loss      two-hot cross-entropy to sg(R_t), + the same to the slow critic's value   (eq. 10)
    actor loss       -((R_t - v(s_t)) / S + eta H[pi(s_t)]),  S = max(1, P95(R) - P5(R))      (eq. 11)

From every posterior state of a replayed batch (or `imag_starts` of them) the world model (world_model.py)
imagines H = 15 steps under the actor; the world model and the critic are frozen while the actor's
gradient flows back through the imagined rewards and dynamics (the backprop estimator for continuous
actions, as in the 2023 code). The slow critic is an EMA of the critic (fraction 0.02 per update); the
return scale S is an EMA (0.99) of the 5th and 95th percentiles. Actor and critic have Adam optimisers of
their own (lr 3e-5, eps 1e-5, clip 100). The actor and critic read the world model's features s_t, which
hold ctx_t with DALI's deep integration (DALI, arXiv:2508.20294, Sec. 4.2).

Shapes: B batch, T time, H horizon, N = imagination starts, F model features, A action dims, X ctx dims,
K = 255 two-hot bins.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from layers import mlp, require_finite, twohot_loss, twohot_mean
from world_model import WorldModel


@dataclass(frozen=True)
class ActorCriticConfig:
    """Imagination, returns, actor, critic and their optimisers (DreamerV3 App. B, Table B.1 defaults)."""

    hidden: int = 512
    """Units of the MLPs (world model: encoder, decoder, heads; actor-critic: actor, critic)."""
    layers: int = 2
    """Hidden layers of those MLPs."""
    horizon: int = 15
    """Imagination horizon H."""
    imag_starts: int = 0
    """Imagination start states: a random subset of the B x T posteriors; 0 = all (DreamerV3)."""
    return_horizon: float = 333.0
    """Discount gamma = 1 - 1 / return_horizon."""
    lam: float = 0.95
    """lambda of the lambda-returns."""
    entropy: float = 3e-4
    """Actor entropy regulariser eta."""
    slow_critic_fraction: float = 0.02
    """EMA fraction of the slow critic update per step."""
    slow_critic_reg: float = 1.0
    """Weight of the loss pulling the critic towards the slow critic."""
    retnorm_decay: float = 0.99
    """EMA decay of the 5th/95th return percentiles."""
    ac_lr: float = 3e-5
    """Actor and critic Adam learning rate."""
    ac_eps: float = 1e-5
    """Actor and critic Adam epsilon."""
    ac_clip: float = 100.0
    """Actor and critic gradient-norm clip."""


# ----------------------------------------------------------------------------------------------------
# Pure functions: returns, weights, losses
# ----------------------------------------------------------------------------------------------------


def lambda_return(reward: torch.Tensor, disc: torch.Tensor, value: torch.Tensor, lam: float) -> torch.Tensor:
    """DreamerV3 eq. 7: R_t = r_{t+1} + gamma c_{t+1} ((1 - lam) v_{t+1} + lam R_{t+1}), R_H = v_H.
    reward, disc (= gamma * continue) of steps 1..H: (H, N); value of steps 0..H: (H+1, N) -> (H, N)."""
    assert reward.shape == disc.shape == value[1:].shape, (reward.shape, disc.shape, value.shape)
    out, last = [], value[-1]
    for t in reversed(range(reward.shape[0])):
        last = reward[t] + disc[t] * ((1 - lam) * value[t + 1] + lam * last)
        out.append(last)
    return torch.stack(out[::-1])


def clip_action(action: torch.Tensor) -> torch.Tensor:
    """DreamerV3 (2023 code, action_clip 1): scale imagined actions into [-1, 1] by a * sg(1 / max(1, |a|)),
    so the world model only sees actions of the range it was trained on, and the gradient keeps flowing."""
    return action * (1.0 / action.abs().clamp(min=1.0)).detach()


def imagination_weights(start_cont: torch.Tensor, disc: torch.Tensor) -> torch.Tensor:
    """Loss weight of imagined steps 0..H-1, the probability of still being in the episode: w_0 = c_0 (0 for a
    terminal start state), w_t = w_{t-1} gamma c_t. start_cont (N,), disc = gamma * continue of steps 1..H
    (H, N) -> (H, N), without gradient (the 2023 code's sg(cumprod(gamma c) / gamma))."""
    return torch.cumprod(torch.cat([start_cont[None], disc[:-1]]), 0).detach()


def actor_loss(ret: torch.Tensor, value: torch.Tensor, scale: torch.Tensor, entropy: torch.Tensor, weight: torch.Tensor, eta: float) -> torch.Tensor:
    """DreamerV3 eq. 11 with the backprop estimator for continuous actions: -w ((R_t - v(s_t)) / S + eta H[pi(s_t)]).
    R_t carries the gradient through the dynamics; the baseline v(s_t) keeps its gradient too, as in the 2023
    code (ImagActorCritic.loss); S is a constant (ReturnNorm). All (H, N) -> (H, N)."""
    return -weight * ((ret - value) / scale + eta * entropy)


def critic_loss(logits: torch.Tensor, ret: torch.Tensor, slow_value: torch.Tensor, weight: torch.Tensor, reg: float, bins: torch.Tensor) -> torch.Tensor:
    """DreamerV3 eq. 10: two-hot cross-entropy of the critic towards sg(R_t), plus `reg` times the same towards the
    slow critic's value (the regulariser). logits (H, N, K), ret, slow_value, weight (H, N) -> (H, N)."""
    return weight * (twohot_loss(logits, ret.detach(), bins) + reg * twohot_loss(logits, slow_value.detach(), bins))


class ReturnNorm(nn.Module):
    """DreamerV3 eq. 11: S = max(1, EMA(P95(R)) - EMA(P5(R))); advantages are divided by S."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))

    def forward(self, ret: torch.Tensor) -> torch.Tensor:
        q = torch.quantile(ret.detach().flatten().float(), torch.tensor([0.05, 0.95], device=ret.device))
        self.lo.mul_(self.decay).add_((1 - self.decay) * q[0])
        self.hi.mul_(self.decay).add_((1 - self.decay) * q[1])
        return torch.clamp(self.hi - self.lo, min=1.0)


# ----------------------------------------------------------------------------------------------------
# Networks and training
# ----------------------------------------------------------------------------------------------------


class Actor(nn.Module):
    """Continuous actions: Normal(tanh(mu), sigma), sigma = 0.9 sigmoid(x + 2) + 0.1 (DreamerV3 App. B)."""

    def __init__(self, inp: int, action: int, cfg: ActorCriticConfig):
        super().__init__()
        self.net = mlp(inp, cfg.hidden, cfg.layers, 2 * action)

    def forward(self, x: torch.Tensor) -> torch.distributions.Normal:
        mu, raw_std = self.net(x).chunk(2, -1)
        return torch.distributions.Normal(torch.tanh(mu), 0.9 * torch.sigmoid(raw_std + 2) + 0.1)


class ActorCritic(nn.Module):
    """Actor, critic, slow critic, return normaliser and the two optimisers: `loss` imagines from posterior
    states and computes eq. 10-11, `update` takes one gradient step. Inputs are the world model's features."""

    def __init__(self, cfg: ActorCriticConfig, feat: int, action: int):
        super().__init__()
        self.cfg = cfg
        self.actor = Actor(feat, action, cfg)
        self.critic = mlp(feat, cfg.hidden, cfg.layers, 255, zero_out=True)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.retnorm = ReturnNorm(cfg.retnorm_decay)
        self.register_buffer("bins", torch.linspace(-20, 20, 255))  # symlog two-hot bins of the critic
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), cfg.ac_lr, eps=cfg.ac_eps)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), cfg.ac_lr, eps=cfg.ac_eps)

    def loss(self, wm: WorldModel, post: dict, ctx: torch.Tensor | None, is_terminal: torch.Tensor) -> tuple[dict, dict]:
        """DreamerV3 eq. 6-11: imagine H steps from the posterior states `post` (B, T, ...) with ctx (B, T, X)
        held per start, then the actor and critic losses (H, N). World model and critic weights are frozen
        here: the actor's gradient flows *through* them."""
        cfg = self.cfg
        start = {k: post[k].detach().flatten(0, 1) for k in ("deter", "stoch")}  # (N, ...), N = B*T
        start_ctx = None if ctx is None else ctx.flatten(0, 1)  # (N, X)
        start_cont = 1.0 - is_terminal.flatten().float()
        if cfg.imag_starts and cfg.imag_starts < start_cont.shape[0]:
            idx = torch.randperm(start_cont.shape[0], device=start_cont.device)[: cfg.imag_starts]
            start = {k: v[idx] for k, v in start.items()}
            start_ctx = None if start_ctx is None else start_ctx[idx]
            start_cont = start_cont[idx]
        entropies = []

        def policy(state):
            # The actor reads detached states; its gradient comes back through the reparameterised action
            # and the (frozen) dynamics: DreamerV3's backprop estimator for continuous actions.
            dist = self.actor(wm.feat(state, start_ctx).detach())
            entropies.append(dist.entropy().sum(-1))
            return clip_action(dist.rsample())

        frozen = [wm, self.critic]
        for m in frozen:
            m.requires_grad_(False)
        try:
            feat, reward, cont = wm.imagine(start, policy, cfg.horizon, start_ctx)  # (H+1, N, F), (H, N), (H, N)
            value = twohot_mean(self.critic(feat), self.bins)  # (H+1, N)
        finally:
            for m in frozen:
                m.requires_grad_(True)
        gamma = 1.0 - 1.0 / cfg.return_horizon
        ret = lambda_return(reward, gamma * cont, value, cfg.lam)  # (H, N)
        weight = imagination_weights(start_cont, gamma * cont)  # (H, N)
        scale = self.retnorm(ret)
        entropy = torch.stack(entropies[:-1])  # (H, N)
        losses = {"actor": actor_loss(ret, value[:-1], scale, entropy, weight, cfg.entropy)}
        # Critic: fit the online critic's lambda-returns, regularised towards the slow critic.
        feat = feat[:-1].detach()
        slow = twohot_mean(self.slow_critic(feat), self.bins)
        losses["critic"] = critic_loss(self.critic(feat), ret, slow, weight, cfg.slow_critic_reg, self.bins)
        metrics = {"ac/return": ret.mean(), "ac/return_scale": scale, "ac/entropy": entropy.mean(), "ac/imag_reward": reward.mean()}
        return losses, metrics

    def update(self, wm: WorldModel, post: dict, ctx: torch.Tensor | None, is_terminal: torch.Tensor) -> dict:
        """One gradient step of actor and critic (`loss`), then the slow critic's EMA step. Detached metrics."""
        losses, metrics = self.loss(wm, post, ctx, is_terminal)
        require_finite({f"ac/{k}_loss": v.mean() for k, v in losses.items()})
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        (losses["actor"].mean() + losses["critic"].mean()).backward()  # disjoint parameters
        for name, opt, module in (("actor", self.actor_opt, self.actor), ("critic", self.critic_opt, self.critic)):
            metrics[f"ac/{name}_grad_norm"] = nn.utils.clip_grad_norm_(module.parameters(), self.cfg.ac_clip)
            opt.step()
            metrics[f"ac/{name}_loss"] = losses[name].detach().mean()
        with torch.no_grad():  # slow critic: EMA of the online critic
            for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
                slow.lerp_(fast, self.cfg.slow_critic_fraction)
        return {k: v.detach() for k, v in metrics.items()}
