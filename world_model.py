"""The DreamerV3 world model (Hafner et al., arXiv:2301.04104, Sec. 2, eq. 4-5), with DALI's context inputs.

    encoder          e_t = enc(o_t [, ctx_t])          features: MLP on symlog(o_t); pixels: 4 stride-2 convs
    RSSM (rssm.py)   h_t, z_t                          sequence model, prior p(z_t | h_t), posterior q(z_t | h_t, e_t)
    decoder          o_t  from s_t                     features: MSE to symlog(o_t); pixels: MSE to o_t / 255 - 0.5
    reward head      r_t  from s_t                     two-hot cross-entropy to symlog(r_t), 255 bins (eq. 9-10)
    continue head    c_t  from s_t                     Bernoulli, target 1 - is_terminal_t

s_t = [h_t, z_t] is the model state that the decoder, both heads, the actor and the critic read (`feat`).
The loss (eq. 4-5) is the prediction loss (decoder, reward, continue) plus the dynamics and representation
KL terms with free bits (rssm.kl_loss), weighted 1, 1, 1, 0.5, 0.1, and one Adam optimiser with gradient
clipping trains it (App. B). `imagine` rolls the prior forward under a policy for the actor-critic
(actor_critic.py).

DALI (Röder et al., arXiv:2508.20294, Sec. 4.2) feeds a context vector ctx in; where it goes is chosen by
the caller (dali.py's Agent) through three sizes: `ctx_enc` (cRSSM-S: the true context joins the encoder's
input and the decoder reconstructs it), `ctx_post` (DALI-S: ctx_t joins the posterior's input) and
`ctx_deep` (DALI-D, cRSSM-D: the deep ctx (dali.py: a held value for DALI-D) joins the sequence model's input and s_t, so
that decoder, heads, actor and critic read it). A context-unaware world model (Dreamer-DR) takes none.
With DALI-chi (`cross_scale` > 0) the loss gains L_cross's state term, which pulls [h_t; z_t] towards a
fixed linear image of the stop-gradiented ctx_t (cross_modal.cross_modal_state_loss).

Data convention (one for replay, training and acting): record t holds o_t, the action a_{t-1} that led to
it (zeros when is_first), the reward r_t received on arriving at o_t, is_first_t and is_terminal_t. The
heads at s_t predict o_t, r_t and 1 - is_terminal_t.

Shapes: B batch, T time, H horizon, N imagination starts, E embedding, F model features (D + S*C [+ X]),
A action dims, X ctx dims, K = 255 two-hot bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cross_modal import CrossModal, cross_modal_state_loss
from layers import linear, mlp, require_finite, symlog, trunc_normal_, twohot_loss, twohot_mean
from rssm import RSSM, RSSMConfig, kl_loss


@dataclass(frozen=True)
class WorldModelConfig:
    """The world model's MLPs, loss weights and optimiser (DreamerV3 App. B, Table B.1 defaults)."""

    hidden: int = 512
    """Units of the MLPs (world model: reward and continue heads, and encoder and decoder unless
    --enc-dec-hidden is set; actor-critic: actor, critic)."""
    layers: int = 2
    """Hidden layers of those MLPs."""
    cnn_depth: int = 32
    """Channels of the first CNN layer for pixels (doubling per layer, 4 layers: 64 -> 4)."""
    enc_dec_hidden: int | None = None
    """Units of the encoder and decoder MLPs for features (None: --hidden). DreamerV3's proprio runs kept
    them at 1024 whatever the size (its size overrides missed them; docs/training.md)."""
    enc_dec_layers: int | None = None
    """Hidden layers of the encoder and decoder MLPs for features (None: --layers; DreamerV3's proprio runs: 5)."""
    free_nats: float = 1.0
    """Free bits of each KL term, summed over the latents."""
    dyn_scale: float = 0.5
    """Weight of the dynamics KL loss."""
    rep_scale: float = 0.1
    """Weight of the representation KL loss."""
    model_lr: float = 1e-4
    """World model Adam learning rate."""
    model_eps: float = 1e-8
    """World model Adam epsilon."""
    model_clip: float = 1000.0
    """World model gradient-norm clip."""


@dataclass(frozen=True)
class Spaces:
    """What the env gives the agent."""

    action: int
    obs: int = 0  # feature vector size, 0 for pixels
    image: tuple[int, int, int] | None = None  # (H, W, 3) for pixels
    context: int = 0  # true context dims X


def enc_dec_mlp(cfg: WorldModelConfig) -> tuple[int, int]:
    """(units, hidden layers) of the feature encoder and decoder MLPs: their own fields where set, else the
    other MLPs' (--hidden, --layers)."""
    hidden = cfg.hidden if cfg.enc_dec_hidden is None else cfg.enc_dec_hidden
    layers = cfg.layers if cfg.enc_dec_layers is None else cfg.enc_dec_layers
    return hidden, layers


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of (N, C, H, W) maps."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv(conv: nn.Module, depth: int) -> nn.Sequential:
    trunc_normal_(conv.weight)
    return nn.Sequential(conv, ChannelNorm(depth, eps=1e-3), nn.SiLU())


class Encoder(nn.Module):
    """Features: MLP on symlog(x). Pixels: 4 stride-2 convs, 64x64 -> 4x4, flattened. Out: (..., E)."""

    def __init__(self, spaces: Spaces, cfg: WorldModelConfig, ctx_in: int):
        super().__init__()
        self.pixels = spaces.image is not None
        if self.pixels:
            d = cfg.cnn_depth
            chans = [3, d, 2 * d, 4 * d, 8 * d]
            self.net = nn.Sequential(*[_conv(nn.Conv2d(i, o, 4, 2, 1, bias=False), o) for i, o in zip(chans[:-1], chans[1:])])
            self.size = 8 * d * (spaces.image[0] // 16) ** 2 + ctx_in  # ctx joins the flat CNN output
        else:
            hidden, layers = enc_dec_mlp(cfg)
            self.net = mlp(spaces.obs + ctx_in, hidden, layers)
            self.size = hidden

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

    def __init__(self, spaces: Spaces, cfg: WorldModelConfig, feat: int, ctx_out: int):
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
            self.net = mlp(feat, *enc_dec_mlp(cfg), spaces.obs + ctx_out)

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


class WorldModel(nn.Module):
    """Encoder, RSSM, decoder, reward and continue heads, and their optimiser `opt`: `loss` is DreamerV3
    eq. 4-5 on a replayed batch, `update` one gradient step, `imagine` a rollout of the prior."""

    def __init__(self, cfg: WorldModelConfig, rssm_cfg: RSSMConfig, spaces: Spaces, ctx_enc: int = 0, ctx_post: int = 0,
                 ctx_deep: int = 0, after_rssm: Callable[[WorldModel], None] | None = None, cross_scale: float = 0.0):  # fmt: skip
        """ctx_enc, ctx_post, ctx_deep: sizes of the ctx inputs (module docstring), 0 where there is none.
        `after_rssm(self)` runs once the encoder and RSSM exist, before the decoder and heads are built:
        dali.Agent builds its context encoder there, so that a seed keeps drawing the same initial weights.
        cross_scale: weight of L_cross's state term (DALI-chi; cross_modal.cross_modal_state_loss), 0: none."""
        super().__init__()
        self.cfg, self.spaces = cfg, spaces
        self.ctx_enc, self.ctx_post, self.ctx_deep = ctx_enc, ctx_post, ctx_deep
        self.encoder = Encoder(spaces, cfg, ctx_enc)
        self.rssm = RSSM(rssm_cfg, self.encoder.size, spaces.action, ctx_seq=ctx_deep, ctx_post=ctx_post)
        if after_rssm is not None:
            after_rssm(self)
        self.feat_size = self.rssm.feat_size + ctx_deep  # F: input of decoder, heads, actor, critic
        self.decoder = Decoder(spaces, cfg, self.feat_size, ctx_enc)
        self.reward_head = mlp(self.feat_size, cfg.hidden, cfg.layers, 255, zero_out=True)
        self.cont_head = mlp(self.feat_size, cfg.hidden, cfg.layers, 1)
        self.register_buffer("bins", torch.linspace(-20, 20, 255))  # symlog two-hot bins of the reward head
        self.loss_scales = {"dec": 1.0, "rew": 1.0, "cont": 1.0, "dyn": cfg.dyn_scale, "rep": cfg.rep_scale}
        if cross_scale:
            self.loss_scales["cross"] = cross_scale
        self.opt = torch.optim.Adam(self.parameters(), cfg.model_lr, eps=cfg.model_eps)

    def feat(self, state: dict, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """s_t, the input of decoder, heads, actor and critic: [h_t, z_t], with ctx_t (..., X) appended when
        deep (ignored otherwise). (..., F)."""
        feat = self.rssm.feat(state)
        return torch.cat([feat, ctx], -1) if self.ctx_deep else feat

    def loss(self, batch: dict, ctx: torch.Tensor | None = None, seq_ctx: torch.Tensor | None = None,
             embed: torch.Tensor | None = None, cross: CrossModal | None = None) -> tuple[dict, dict]:  # fmt: skip
        """DreamerV3 eq. 4-5 on a replayed batch of (B, T) records. Returns the per-(B, T) losses, keyed as
        `loss_scales`, and the posterior. ctx (B, T, X): ctx_t, read by encoder, posterior and heads as this
        model was built to; seq_ctx (B, T, X): the sequence model's (dali.sequence_context); `embed` (B, T, E):
        the encoder's output for this batch, if already computed; `cross`: L_cross's maps, for its state term."""
        obs = batch["image"] if self.spaces.image is not None else batch["obs"]
        embed = self.encoder(obs, ctx if self.ctx_enc else None) if embed is None else embed  # (B, T, E)
        seq_ctx = seq_ctx if self.ctx_deep else None
        post_ctx = ctx if self.ctx_post else None
        post, prior = self.rssm.observe(embed, batch["action"], batch["is_first"], ctx_seq=seq_ctx, ctx_post=post_ctx)
        feat = self.feat(post, ctx)  # (B, T, F)
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
        if "cross" in self.loss_scales:  # DALI-chi: [h_t; z_t] towards sg(W ctx_t)
            losses["cross"] = cross_modal_state_loss(cross, ctx, self.rssm.feat(post))
        return losses, post

    def update(self, batch: dict, ctx: torch.Tensor | None = None, seq_ctx: torch.Tensor | None = None,
               embed: torch.Tensor | None = None, cross: CrossModal | None = None) -> tuple[dict, dict]:  # fmt: skip
        """One gradient step on the weighted sum of `loss`. Returns the posterior (the imagination starts) and
        detached metrics."""
        losses, post = self.loss(batch, ctx, seq_ctx, embed, cross)
        assert losses.keys() == self.loss_scales.keys(), (losses.keys(), self.loss_scales.keys())
        for k, v in losses.items():
            assert v.shape == batch["reward"].shape, (k, v.shape)
        loss = sum(self.loss_scales[k] * v.mean() for k, v in losses.items())
        require_finite({f"wm/{k}": v.mean() for k, v in losses.items()})
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.parameters(), self.cfg.model_clip)
        self.opt.step()
        metrics = {f"wm/{k}": v.detach().mean() for k, v in losses.items()}
        metrics.update({"wm/loss": loss.detach(), "wm/grad_norm": norm})
        return post, metrics

    def imagine(self, start: dict, policy: Callable[[dict], torch.Tensor], horizon: int,
                ctx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Roll the prior H steps from `start` (N, ...) with actions a = policy(state), ctx (N, X) held at the
        start step's value (with deep integration, what the sequence model read on the training step out of
        that state). Returns the model features s_0..s_H (H+1, N, F), and the predicted rewards (H, N) and
        continuation flags (H, N; the Bernoulli's mode) of steps 1..H."""
        states, _ = self.rssm.imagine(start, policy, horizon, ctx if self.ctx_deep else None)  # (H+1, N, ...)
        feat = self.feat(states, None if ctx is None else ctx.expand(horizon + 1, -1, -1))  # (H+1, N, F)
        reward = twohot_mean(self.reward_head(feat[1:]), self.bins)  # (H, N)
        cont = (self.cont_head(feat[1:]).squeeze(-1) > 0).to(feat.dtype)  # (H, N)
        return feat, reward, cont
