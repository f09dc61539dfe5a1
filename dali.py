"""The DALI agent: a DreamerV3 world model and actor-critic, conditioned on a context vector.

DreamerV3 (Hafner et al., arXiv:2301.04104): world model = encoder, RSSM (rssm.py), decoder, reward and
continue heads, trained on replayed sequences (Sec. 2, eq. 4-5); actor and critic trained on 15-step
imagined rollouts from every posterior state (Sec. 3, eq. 6-11). DALI (Röder et al., arXiv:2508.20294,
Sec. 4.2) adds a context vector ctx and two ways to feed it:

    --context   learned: ctx from the context encoder (context_encoder.py)   oracle: the true, normalised
                context (the cRSSM baselines)   none: context-unaware (Dreamer-DR)
    --integration shallow: learned -> the posterior q(z | h, x, ctx) only (DALI-S); oracle -> the encoder
                input, reconstructed by the decoder (cRSSM-S)
                deep: sequence model, reward, continue, decoder, actor and critic (DALI-D, cRSSM-D)

ctx is detached wherever the world model and the actor-critic consume it: only L_FD (and L_cross) train
the context encoder, with its own optimiser. A learned-context agent never reads the true context.

Replayed batches of a learned-context agent hold K = `context_prefix` extra records before the T training
steps, so that ctx_t of the first training step already sees a full window (fewer at an episode start).

Data convention (one for replay, training and acting): record t holds o_t, the action a_{t-1} that led to
it (zeros when is_first), the reward r_t received on arriving at o_t, is_first_t, is_terminal_t and the
true context. The reward head at state s_t predicts r_t.

Shapes: B batch, T time, H horizon, N = imagination starts, F model features, A action dims, X ctx dims,
K = 255 two-hot bins.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from context_encoder import ContextEncoder, ContextEncoderConfig, ContextWindow, CrossModal, cross_modal_loss, forward_dynamics_loss
from layers import linear, mlp, symexp, symlog, trunc_normal_
from rssm import RSSM, RSSMConfig, kl_loss

ContextSource = Literal["none", "oracle", "learned"]
Integration = Literal["shallow", "deep"]


@dataclass(frozen=True)
class AgentConfig:
    """Everything of the agent but the RSSM sizes (DreamerV3 App. B, Table B.1 defaults)."""

    context: ContextSource = "learned"
    """Where ctx comes from: learned (DALI), oracle (true context: cRSSM), none (Dreamer-DR)."""
    integration: Integration = "shallow"
    """shallow: ctx into the posterior (or, oracle, the encoder); deep: ctx into every predictor too."""
    hidden: int = 512
    """Units of the MLPs (encoder, decoder, heads, actor, critic)."""
    layers: int = 2
    """Hidden layers of those MLPs."""
    cnn_depth: int = 32
    """Channels of the first CNN layer for pixels (doubling per layer, 4 layers: 64 -> 4)."""
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
    free_nats: float = 1.0
    """Free bits of each KL term, summed over the latents."""
    dyn_scale: float = 0.5
    """Weight of the dynamics KL loss."""
    rep_scale: float = 0.1
    """Weight of the representation KL loss."""
    slow_critic_fraction: float = 0.02
    """EMA fraction of the slow critic update per step."""
    slow_critic_reg: float = 1.0
    """Weight of the loss pulling the critic towards the slow critic."""
    retnorm_decay: float = 0.99
    """EMA decay of the 5th/95th return percentiles."""
    model_lr: float = 1e-4
    """World model Adam learning rate."""
    model_eps: float = 1e-8
    """World model Adam epsilon."""
    model_clip: float = 1000.0
    """World model gradient-norm clip."""
    ac_lr: float = 3e-5
    """Actor and critic Adam learning rate."""
    ac_eps: float = 1e-5
    """Actor and critic Adam epsilon."""
    ac_clip: float = 100.0
    """Actor and critic gradient-norm clip."""


@dataclass(frozen=True)
class Spaces:
    """What the env gives the agent."""

    action: int
    obs: int = 0  # feature vector size, 0 for pixels
    image: tuple[int, int, int] | None = None  # (H, W, 3) for pixels
    context: int = 0  # true context dims X


# ----------------------------------------------------------------------------------------------------
# Pure functions: transforms, distributions, returns, losses
# ----------------------------------------------------------------------------------------------------


def twohot(x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Two-hot encoding of x (...) over sorted `bins` (K,): weights on the two nearest bins -> (..., K)."""
    x = x.clamp(bins[0], bins[-1])
    above = torch.searchsorted(bins, x.contiguous(), right=True).clamp(1, len(bins) - 1)  # index of upper bin
    lo, hi = bins[above - 1], bins[above]
    w_hi = (x - lo) / (hi - lo)
    out = torch.zeros(*x.shape, len(bins), dtype=x.dtype, device=x.device)
    out.scatter_(-1, (above - 1).unsqueeze(-1), (1 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, above.unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def twohot_mean(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Expected value of a symlog two-hot distribution: (..., K) -> (...)."""
    return symexp((F.softmax(logits, -1) * bins).sum(-1))


def twohot_loss(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """DreamerV3 eq. 9-10: cross-entropy of twohot(symlog(target)) under the predicted bins: (...)."""
    return -(twohot(symlog(target), bins) * F.log_softmax(logits, -1)).sum(-1)


def lambda_return(reward: torch.Tensor, disc: torch.Tensor, value: torch.Tensor, lam: float) -> torch.Tensor:
    """DreamerV3 eq. 7: R_t = r_{t+1} + gamma c_{t+1} ((1 - lam) v_{t+1} + lam R_{t+1}), R_H = v_H.
    reward, disc (= gamma * continue) of steps 1..H: (H, N); value of steps 0..H: (H+1, N) -> (H, N)."""
    assert reward.shape == disc.shape == value[1:].shape, (reward.shape, disc.shape, value.shape)
    out, last = [], value[-1]
    for t in reversed(range(reward.shape[0])):
        last = reward[t] + disc[t] * ((1 - lam) * value[t + 1] + lam * last)
        out.append(last)
    return torch.stack(out[::-1])


def sequence_context(ctx: torch.Tensor, is_first: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
    """The context the sequence model reads on its step into h_t: ctx_{t-1}, pooled from transitions up to
    o_{t-1}, so that the prior p(z_t | h_t) never sees o_t; at an episode start ctx_t (no transition yet).
    Imagination from s_t then feeds ctx_t into the step to h_{t+1}, exactly what training did.
    ctx (B, T, X) holds ctx_t, is_first (B, T), before (B, X) the ctx of the step before the first
    (None: ctx_0 stands in, right when step 0 starts an episode or ctx is constant within one) -> (B, T, X)."""
    previous = torch.cat([(ctx[:, :1] if before is None else before[:, None]), ctx[:, :-1]], 1)
    return torch.where(is_first[..., None], ctx, previous)


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
# Networks
# ----------------------------------------------------------------------------------------------------


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of (N, C, H, W) maps."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv(conv: nn.Module, depth: int) -> nn.Sequential:
    trunc_normal_(conv.weight)
    return nn.Sequential(conv, ChannelNorm(depth, eps=1e-3), nn.SiLU())


class Encoder(nn.Module):
    """Features: MLP on symlog(x). Pixels: 4 stride-2 convs, 64x64 -> 4x4, flattened. Out: (..., E)."""

    def __init__(self, spaces: Spaces, cfg: AgentConfig, ctx_in: int):
        super().__init__()
        self.pixels = spaces.image is not None
        if self.pixels:
            d = cfg.cnn_depth
            chans = [3, d, 2 * d, 4 * d, 8 * d]
            self.net = nn.Sequential(*[_conv(nn.Conv2d(i, o, 4, 2, 1, bias=False), o) for i, o in zip(chans[:-1], chans[1:])])
            self.size = 8 * d * (spaces.image[0] // 16) ** 2 + ctx_in  # ctx joins the flat CNN output
        else:
            self.net = mlp(spaces.obs + ctx_in, cfg.hidden, cfg.layers)
            self.size = cfg.hidden

    def forward(self, obs: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        if self.pixels:
            lead = obs.shape[:-3]
            x = obs.reshape(-1, *obs.shape[-3:]).permute(0, 3, 1, 2).float() / 255 - 0.5  # (N, 3, 64, 64)
            x = self.net(x).reshape(*lead, -1)
            return x if ctx is None else torch.cat([x, ctx], -1)
        x = symlog(obs) if ctx is None else torch.cat([symlog(obs), ctx], -1)
        return self.net(x)


class Decoder(nn.Module):
    """Reconstructs the observation from model features: features in symlog space, pixels in [-0.5, 0.5]
    (DreamerV3 eq. 4's prediction loss). With `ctx_out` it also reconstructs the true context (cRSSM-S)."""

    def __init__(self, spaces: Spaces, cfg: AgentConfig, feat: int, ctx_out: int):
        super().__init__()
        self.pixels, self.ctx_out = spaces.image is not None, ctx_out
        if self.pixels:
            d, self.minres = cfg.cnn_depth, spaces.image[0] // 16
            self.inp = linear(feat, 8 * d * self.minres**2)
            chans = [8 * d, 4 * d, 2 * d, d]
            ups = [_conv(nn.ConvTranspose2d(i, o, 4, 2, 1, bias=False), o) for i, o in zip(chans[:-1], chans[1:])]
            last = nn.ConvTranspose2d(d, 3, 4, 2, 1)
            trunc_normal_(last.weight)
            self.net = nn.Sequential(*ups, last)
            self.ctx_head = mlp(feat, cfg.hidden, cfg.layers, ctx_out) if ctx_out else None
        else:
            self.net = mlp(feat, cfg.hidden, cfg.layers, spaces.obs + ctx_out)

    def loss(self, feat: torch.Tensor, obs: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        """Summed squared error per step: feat (B, T, F), obs (B, T, ...) -> (B, T)."""
        if not self.pixels:
            target = symlog(obs) if ctx is None else torch.cat([symlog(obs), ctx], -1)
            return ((self.net(feat) - target) ** 2).sum(-1)
        B, T = feat.shape[:2]
        x = self.inp(feat).reshape(B * T, -1, self.minres, self.minres)
        pred = self.net(x).permute(0, 2, 3, 1).reshape(obs.shape)  # (B, T, 64, 64, 3)
        loss = ((pred - (obs.float() / 255 - 0.5)) ** 2).sum((-3, -2, -1))
        if self.ctx_head is not None:
            loss = loss + ((self.ctx_head(feat) - ctx) ** 2).sum(-1)
        return loss


class Actor(nn.Module):
    """Continuous actions: Normal(tanh(mu), sigma), sigma = 0.9 sigmoid(x + 2) + 0.1 (DreamerV3 App. B)."""

    def __init__(self, inp: int, action: int, cfg: AgentConfig):
        super().__init__()
        self.net = mlp(inp, cfg.hidden, cfg.layers, 2 * action)

    def forward(self, x: torch.Tensor) -> torch.distributions.Normal:
        mu, raw_std = self.net(x).chunk(2, -1)
        return torch.distributions.Normal(torch.tanh(mu), 0.9 * torch.sigmoid(raw_std + 2) + 0.1)


# ----------------------------------------------------------------------------------------------------
# The agent
# ----------------------------------------------------------------------------------------------------


class Agent(nn.Module):
    """World model + actor + critic. `update(batch)` does one training step; `act(obs, state)` acts."""

    def __init__(self, cfg: AgentConfig, rssm_cfg: RSSMConfig, spaces: Spaces, ctx_cfg: ContextEncoderConfig = ContextEncoderConfig()):
        super().__init__()
        if cfg.context == "oracle" and spaces.context == 0:
            raise ValueError("--context oracle needs the env's true context, but spaces.context is 0")
        self.cfg, self.spaces, self.ctx_cfg = cfg, spaces, ctx_cfg
        learned = cfg.context == "learned"
        X = {"none": 0, "oracle": spaces.context, "learned": ctx_cfg.dim}[cfg.context]
        self.ctx_enc = X if (cfg.context == "oracle" and cfg.integration == "shallow") else 0  # cRSSM-S
        self.ctx_post = X if (learned and cfg.integration == "shallow") else 0  # DALI-S
        self.ctx_deep = X if cfg.integration == "deep" else 0  # DALI-D, cRSSM-D: sequence model and predictors
        self.encoder = Encoder(spaces, cfg, self.ctx_enc)
        self.rssm = RSSM(rssm_cfg, self.encoder.size, spaces.action, ctx_seq=self.ctx_deep, ctx_post=self.ctx_post)
        self.context_prefix = ctx_cfg.window if learned else 0
        if learned:  # tokens from features, or from the world model's (detached) pixel embeddings
            token_obs = spaces.obs if spaces.image is None else self.encoder.size
            self.ctx_encoder = ContextEncoder(ctx_cfg, token_obs, spaces.action, features=spaces.image is None)
            self.cross = CrossModal(ctx_cfg.dim, rssm_cfg.deter + rssm_cfg.stoch * rssm_cfg.classes) if ctx_cfg.cross_weight else None
            ctx_params = list(self.ctx_encoder.parameters()) + (list(self.cross.parameters()) if self.cross else [])
            self.ctx_opt = torch.optim.Adam(ctx_params, ctx_cfg.lr)
        F_ = self.rssm.feat_size + self.ctx_deep  # input of decoder, heads, actor, critic
        self.decoder = Decoder(spaces, cfg, F_, self.ctx_enc)
        self.reward_head = mlp(F_, cfg.hidden, cfg.layers, 255, zero_out=True)
        self.cont_head = mlp(F_, cfg.hidden, cfg.layers, 1)
        self.actor = Actor(F_, spaces.action, cfg)
        self.critic = mlp(F_, cfg.hidden, cfg.layers, 255, zero_out=True)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.retnorm = ReturnNorm(cfg.retnorm_decay)
        self.register_buffer("bins", torch.linspace(-20, 20, 255))
        self.loss_scales = {"dec": 1.0, "rew": 1.0, "cont": 1.0, "dyn": cfg.dyn_scale, "rep": cfg.rep_scale}
        self.world_model = nn.ModuleList([self.encoder, self.rssm, self.decoder, self.reward_head, self.cont_head])
        self.model_opt = torch.optim.Adam(self.world_model.parameters(), cfg.model_lr, eps=cfg.model_eps)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), cfg.ac_lr, eps=cfg.ac_eps)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), cfg.ac_lr, eps=cfg.ac_eps)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimiser, by name (checkpoints save and restore exactly these)."""
        opts = {"model": self.model_opt, "actor": self.actor_opt, "critic": self.critic_opt}
        return {**opts, "ctx": self.ctx_opt} if self.cfg.context == "learned" else opts

    # -- context wiring ------------------------------------------------------------------------------

    def context(self, batch: dict, embed: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
        """ctx_t for the last T steps of `batch` (B, K + T, ...): (B, T, X) detached, or None for a
        context-unaware agent; the sequence model's context (`sequence_context`, (B, T, X)); and, for a
        learned context, the not-yet-detached pieces its losses need.
        Pixels: tokens are the encoder's embeddings; `embed` (B, T, E), the world model's embeddings of the
        last T frames, saves encoding those frames twice."""
        P = self.context_prefix
        if self.cfg.context == "oracle":  # constant within an episode: ctx_{t-1} = ctx_t
            ctx = batch["context"][:, P:].float().detach()
            return ctx, sequence_context(ctx, batch["is_first"][:, P:]), {}
        if self.cfg.context == "none":
            return None, None, {}
        if self.spaces.image is None:
            x = batch["obs"].float()
        else:
            with torch.no_grad():  # tokens and targets are detached embeddings: L_FD never trains the encoder
                x = self.encoder(batch["image"] if embed is None else batch["image"][:, :P])
            if embed is not None:
                x = torch.cat([x, embed.detach()], 1)  # (B, K + T, E)
        ctx, valid = self.ctx_encoder.segment(x, batch["action"], batch["is_first"])  # (B, K+T, X), (B, K+T-1)
        now = ctx[:, P:].detach()  # (B, T, X)
        seq = sequence_context(now, batch["is_first"][:, P:], ctx[:, P - 1].detach())  # P = K >= 1
        return now, seq, {"x": x, "ctx": ctx, "valid": valid}

    def _with_ctx(self, feat: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        """Input of decoder, heads, actor and critic: [feat, ctx] when deep, else feat."""
        return torch.cat([feat, ctx], -1) if self.ctx_deep else feat

    # -- training ------------------------------------------------------------------------------------

    def world_model_loss(self, batch: dict, ctx: torch.Tensor | None, seq_ctx: torch.Tensor | None = None,
                         embed: torch.Tensor | None = None) -> tuple[dict, dict]:  # fmt: skip
        """DreamerV3 eq. 4-5 on a replayed batch of (B, T) (no context prefix). Returns per-(B, T) losses
        and the posterior. ctx (B, T, X) = ctx_t for posterior and heads; seq_ctx = the sequence model's
        (`sequence_context`); `embed`: the encoder's output for this batch, if already computed."""
        obs = batch["image"] if self.spaces.image is not None else batch["obs"]
        embed = self.encoder(obs, ctx if self.ctx_enc else None) if embed is None else embed  # (B, T, E)
        seq_ctx = seq_ctx if self.ctx_deep else None
        post_ctx = ctx if self.ctx_post else None
        post, prior = self.rssm.observe(embed, batch["action"], batch["is_first"], ctx_seq=seq_ctx, ctx_post=post_ctx)
        feat = self._with_ctx(self.rssm.feat(post), ctx)  # (B, T, F)
        dyn, rep = kl_loss(post["logits"], prior["logits"], self.cfg.free_nats)
        losses = {
            "dec": self.decoder.loss(feat, obs, ctx if self.ctx_enc else None),
            "rew": twohot_loss(self.reward_head(feat), batch["reward"].float(), self.bins),
            "cont": F.binary_cross_entropy_with_logits(
                self.cont_head(feat).squeeze(-1), 1.0 - batch["is_terminal"].float(), reduction="none"
            ),
            "dyn": dyn,
            "rep": rep,
        }
        return losses, post

    def imagine_and_act(self, post: dict, ctx: torch.Tensor | None, is_terminal: torch.Tensor) -> tuple[dict, dict]:
        """DreamerV3 eq. 6-11: imagine H steps from posterior states, then actor and critic losses.
        World model and critic weights are frozen here: the actor's gradient flows *through* them."""
        cfg = self.cfg
        start = {k: post[k].detach().flatten(0, 1) for k in ("deter", "stoch")}  # (N, ...), N = B*T
        start_ctx = None if ctx is None else ctx.flatten(0, 1)
        start_cont = 1.0 - is_terminal.flatten().float()
        if cfg.imag_starts and cfg.imag_starts < start_cont.shape[0]:
            idx = torch.randperm(start_cont.shape[0], device=start_cont.device)[: cfg.imag_starts]
            start = {k: v[idx] for k, v in start.items()}
            start_ctx = None if start_ctx is None else start_ctx[idx]
            start_cont = start_cont[idx]
        head_ctx = start_ctx if self.ctx_deep else None
        entropies = []

        def policy(state):
            # The actor reads detached states; its gradient comes back through the reparameterised action
            # and the (frozen) dynamics: DreamerV3's backprop estimator for continuous actions.
            dist = self.actor(self._with_ctx(self.rssm.feat(state).detach(), head_ctx))
            entropies.append(dist.entropy().sum(-1))
            return clip_action(dist.rsample())

        frozen = [self.world_model, self.critic]
        for m in frozen:
            m.requires_grad_(False)
        try:
            states, _ = self.rssm.imagine(start, policy, cfg.horizon, head_ctx)  # (H+1, N, ...)
            feat = self._with_ctx(self.rssm.feat(states), None if head_ctx is None else head_ctx.expand(cfg.horizon + 1, -1, -1))
            reward = twohot_mean(self.reward_head(feat[1:]), self.bins)  # (H, N)
            cont = (self.cont_head(feat[1:]).squeeze(-1) > 0).to(feat.dtype)  # (H, N): the Bernoulli's mode
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

    def update(self, batch: dict) -> dict[str, torch.Tensor]:
        """One gradient step of world model, actor and critic on a batch of (B, T) sequences.
        Returns detached scalar metrics (no host sync: call .item() only when logging).
        A learned-context agent's batch is (B, K + T): K records of history before the T training steps."""
        full, batch = batch, {k: v[:, self.context_prefix :] for k, v in batch.items()}
        embed = None
        if self.cfg.context == "learned" and self.spaces.image is not None:  # one CNN pass over the T frames
            embed = self.encoder(batch["image"])  # (B, T, E)
        ctx, seq_ctx, pieces = self.context(full, embed)
        # World model
        losses, post = self.world_model_loss(batch, ctx, seq_ctx, embed)
        assert losses.keys() == self.loss_scales.keys(), (losses.keys(), self.loss_scales.keys())
        for k, v in losses.items():
            assert v.shape == batch["reward"].shape, (k, v.shape)
        model_loss = sum(self.loss_scales[k] * v.mean() for k, v in losses.items())
        self.model_opt.zero_grad(set_to_none=True)
        model_loss.backward()
        model_norm = nn.utils.clip_grad_norm_(self.world_model.parameters(), self.cfg.model_clip)
        self.model_opt.step()
        metrics = {f"wm/{k}": v.detach().mean() for k, v in losses.items()}
        metrics.update({"wm/loss": model_loss.detach(), "wm/grad_norm": model_norm})
        # Context encoder: trained by L_FD (+ L_cross) alone
        if pieces:
            metrics.update(self.update_context_encoder(full, pieces, self.rssm.feat(post)))
        # Imagination, actor and critic
        ac_losses, ac_metrics = self.imagine_and_act(post, ctx, batch["is_terminal"])
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        (ac_losses["actor"].mean() + ac_losses["critic"].mean()).backward()  # disjoint parameters
        for name, opt, module in (("actor", self.actor_opt, self.actor), ("critic", self.critic_opt, self.critic)):
            metrics[f"ac/{name}_grad_norm"] = nn.utils.clip_grad_norm_(module.parameters(), self.cfg.ac_clip)
            opt.step()
            metrics[f"ac/{name}_loss"] = ac_losses[name].detach().mean()
        with torch.no_grad():  # slow critic: EMA of the online critic
            for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
                slow.lerp_(fast, self.cfg.slow_critic_fraction)
        metrics.update(ac_metrics)
        return {k: v.detach() for k, v in metrics.items()}

    def update_context_encoder(self, batch: dict, pieces: dict, state: torch.Tensor) -> dict:
        """DALI eq. 3: L_FD over the T training steps (each ctx_t with its full window), + lambda L_cross
        towards the posterior model state [h_t; z_t] `state` (B, T, D + S*C)."""
        P, x, ctx = self.context_prefix, pieces["x"], pieces["ctx"]
        # step t predicts o_{t+1} from (o_t, a_t, ctx_t); a_t is stored with record t+1
        fd = forward_dynamics_loss(self.ctx_encoder, x[:, P:-1], x[:, P + 1 :], batch["action"][:, P + 1 :], ctx[:, P:-1], pieces["valid"][:, P:])
        loss = fd.sum() / pieces["valid"][:, P:].sum().clamp(min=1)
        metrics = {"ctx/fd_loss": loss.detach()}
        if self.cross is not None:
            cross = cross_modal_loss(self.cross, ctx[:, P:], state).mean()
            loss = loss + self.ctx_cfg.cross_weight * cross
            metrics["ctx/cross_loss"] = cross.detach()
        self.ctx_opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.ctx_opt.param_groups for p in g["params"]]
        metrics["ctx/grad_norm"] = nn.utils.clip_grad_norm_(params, self.ctx_cfg.clip)
        self.ctx_opt.step()
        metrics["ctx/norm"] = ctx[:, P:].detach().norm(dim=-1).mean()
        return metrics

    # -- acting --------------------------------------------------------------------------------------

    def initial_state(self, n: int) -> tuple:
        """Acting state for n envs: (latent, previous action, context window or None)."""
        device = self.bins.device
        window = ContextWindow(self.ctx_encoder, n, device) if self.cfg.context == "learned" else None
        return self.rssm.initial(n), torch.zeros(n, self.spaces.action, device=device), window

    @torch.inference_mode()
    def act(self, obs: dict, state: tuple, sample: bool = True, context: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        """One policy step for a batch of envs. obs: tensors (N, ...) with "is_first"; returns actions
        (N, A) in [-1, 1] and the next state. The action is a_t, stored as the next record's a_{t-1}.
        A learned ctx_t comes from this env's window of the current episode's transitions up to o_t.
        `context` (N, X), the true normalised context, is read by the oracle baselines alone."""
        latent, prev_action, window = state
        x = obs["image"] if self.spaces.image is not None else obs["obs"].float()
        if self.cfg.context == "oracle":
            if context is None:
                raise ValueError("a --context oracle agent acts on the true context: pass act(..., context=...)")
            ctx = seq_ctx = context.float()  # constant within an episode: ctx_{t-1} = ctx_t
            embed = self.encoder(x, ctx if self.ctx_enc else None)
        else:
            embed = self.encoder(x)
            ctx = seq_ctx = None
            if self.cfg.context == "learned":  # tokens from features, or from pixel embeddings
                previous = window.ctx  # ctx_{t-1}, None before the window's first step (an episode start)
                ctx = window.update(x if self.spaces.image is None else embed, prev_action, obs["is_first"])
                seq_ctx = ctx if previous is None else torch.where(obs["is_first"][:, None], ctx, previous)
        seq_ctx, post_ctx = (seq_ctx if self.ctx_deep else None), (ctx if self.ctx_post else None)
        latent, _ = self.rssm.obs_step(latent, prev_action, embed, obs["is_first"], seq_ctx, post_ctx)
        dist = self.actor(self._with_ctx(self.rssm.feat(latent), ctx))
        action = (dist.sample() if sample else dist.mean).clamp(-1, 1)
        return action, (latent, action, window)
