"""The recurrent state-space model (RSSM) of DreamerV3 (Hafner et al., arXiv:2301.04104, Sec. 2 and App. B).

    sequence model      h_t = f(h_{t-1}, z_{t-1}, a_{t-1} [, ctx_{t-1}])  deterministic state, LayerNorm GRU
    prior (dynamics)    z_t ~ p(z_t | h_t)                                 `img_step`
    posterior (repr.)   z_t ~ q(z_t | h_t, x_t [, ctx_t])                  `obs_step`

z_t is S categorical variables with C classes each, mixed with 1% uniform ("unimix") and sampled with
straight-through gradients. The model state passed around is a dict {"deter": h, "stoch": z, "logits"}.

DALI (arXiv:2508.20294, Sec. 4.2) conditions the RSSM on a context vector ctx in two places, passed as
arguments so the caller decides the integration: `ctx_seq` joins [z_{t-1}, a_{t-1}] at the sequence model
input (deep integration) and `ctx_post` joins [h_t, embed_t] at the posterior input (shallow integration).
The sequence model's context must not see o_t (the prior predicts it): the caller passes a ctx pooled before o_t there
(dali.sequence_context). With shallow integration the posterior reads ctx_t; with deep integration it
reads none (as in the authors' configuration).

Shapes: B batch, T time, H imagination horizon, S stoch groups, C classes, D deter, E embed, A action dims,
X context dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Dense, linear, trunc_normal_


@dataclass(frozen=True)
class RSSMConfig:
    """Sizes of the RSSM (DreamerV3 Table B.1; the size presets of train.py set them)."""

    deter: int = 512
    """Units of the deterministic GRU state h_t."""
    hidden: int = 512
    """Units of the hidden layers before and after the GRU."""
    stoch: int = 32
    """Number S of categorical latent variables in z_t."""
    classes: int = 32
    """Classes C per categorical variable."""
    unimix: float = 0.01
    """Fraction of uniform distribution mixed into every categorical (avoids zero-probability KL spikes)."""
    norm_eps: float = 1e-3
    """LayerNorm epsilon, as in DreamerV3."""


class RSSM(nn.Module):
    """DreamerV3's RSSM with optional context inputs `ctx_seq` (sequence model) and `ctx_post` (posterior)."""

    def __init__(self, cfg: RSSMConfig, embed: int, action: int, ctx_seq: int = 0, ctx_post: int = 0):
        super().__init__()
        self.cfg, self.action_size, self.ctx_seq_size, self.ctx_post_size = cfg, action, ctx_seq, ctx_post
        D, SC, eps = cfg.deter, cfg.stoch * cfg.classes, cfg.norm_eps
        self.img_in = Dense(SC + action + ctx_seq, cfg.hidden, eps)
        self.gru = nn.Linear(cfg.hidden + D, 3 * D, bias=False)  # reset, candidate, update gates
        trunc_normal_(self.gru.weight)
        self.gru_norm = nn.LayerNorm(3 * D, eps=eps)
        self.img_out = nn.Sequential(Dense(D, cfg.hidden, eps), linear(cfg.hidden, SC))
        self.obs_out = nn.Sequential(Dense(D + embed + ctx_post, cfg.hidden, eps), linear(cfg.hidden, SC))
        self.initial_deter = nn.Parameter(torch.zeros(D))  # learned initial state, h_0 = tanh(W)

    @property
    def feat_size(self) -> int:
        """Size of the model state fed to heads, actor and critic: [h_t, flat z_t]."""
        return self.cfg.deter + self.cfg.stoch * self.cfg.classes

    # -- distributions -------------------------------------------------------------------------------

    def _dist_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """(..., S*C) raw outputs -> (..., S, C) log-probabilities with unimix."""
        S, C, mix = self.cfg.stoch, self.cfg.classes, self.cfg.unimix
        probs = F.softmax(raw.unflatten(-1, (S, C)), -1)
        return torch.log((1 - mix) * probs + mix / C)

    @staticmethod
    def _sample(logits: torch.Tensor) -> torch.Tensor:
        """One-hot sample with straight-through gradients: (..., S, C) -> (..., S*C)."""
        probs = logits.exp()
        # Gumbel-max: argmax(log p + Gumbel noise) ~ Cat(p); much cheaper than torch.multinomial on CPU.
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0)))
        onehot = F.one_hot((logits.detach() + gumbel).argmax(-1), probs.shape[-1]).to(probs.dtype)
        return (onehot + probs - probs.detach()).flatten(-2)

    # -- steps ---------------------------------------------------------------------------------------

    def initial(self, batch: int) -> dict[str, torch.Tensor]:
        """The learned initial state for `batch` sequences; z_0 is the mode of the prior at h_0."""
        deter = torch.tanh(self.initial_deter).expand(batch, -1)
        logits = self._dist_logits(self.img_out(deter))
        stoch = F.one_hot(logits.argmax(-1), self.cfg.classes).to(deter.dtype).flatten(-2)
        return {"deter": deter, "stoch": stoch, "logits": logits}

    def _deter_step(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The LayerNorm GRU: h_t from the projected input x = img_in(z_{t-1}, a_{t-1} [, ctx]) and h_{t-1}."""
        reset, cand, update = self.gru_norm(self.gru(torch.cat([x, h], -1))).chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1)  # bias -1: keep the old state by default
        return update * cand + (1 - update) * h  # (N, D)

    def img_step(self, state: dict, action: torch.Tensor, ctx_seq: torch.Tensor | None = None) -> dict:
        """Prior step: (h_{t-1}, z_{t-1}), a_{t-1} [, ctx] -> h_t, z_t ~ p(z_t | h_t). Tensors (N, ...)."""
        x = [state["stoch"], action] + ([ctx_seq] if self.ctx_seq_size else [])
        deter = self._deter_step(self.img_in(torch.cat(x, -1)), state["deter"])
        logits = self._dist_logits(self.img_out(deter))  # (N, S, C)
        return {"deter": deter, "stoch": self._sample(logits), "logits": logits}

    def obs_step(
        self,
        state: dict,
        action: torch.Tensor,
        embed: torch.Tensor,
        is_first: torch.Tensor,
        ctx_seq: torch.Tensor | None = None,
        ctx_post: torch.Tensor | None = None,
    ) -> tuple[dict, dict]:
        """Posterior step. Where `is_first`, the state restarts from the initial state and the previous
        action is zeroed, so sequences may cross episode boundaries. Returns (posterior, prior); the prior
        holds h_t and the logits of p(z_t | h_t), not a sample (it is only scored, in the KL losses).
        `observe` computes the same over a sequence, faster; a test keeps the two equal."""
        keep = (~is_first).to(embed.dtype).unsqueeze(-1)  # (N, 1)
        init = self.initial(embed.shape[0])
        state = {k: keep * state[k] + (1 - keep) * init[k] for k in ("deter", "stoch")}
        x = [state["stoch"], keep * action] + ([ctx_seq] if self.ctx_seq_size else [])
        deter = self._deter_step(self.img_in(torch.cat(x, -1)), state["deter"])
        x = [deter, embed] + ([ctx_post] if self.ctx_post_size else [])
        logits = self._dist_logits(self.obs_out(torch.cat(x, -1)))
        post = {"deter": deter, "stoch": self._sample(logits), "logits": logits}
        return post, {"deter": deter, "logits": self._dist_logits(self.img_out(deter))}

    def observe(
        self,
        embed: torch.Tensor,
        action: torch.Tensor,
        is_first: torch.Tensor,
        state: dict | None = None,
        ctx_seq: torch.Tensor | None = None,
        ctx_post: torch.Tensor | None = None,
    ) -> tuple[dict, dict]:
        """obs_step over (B, T): embed (B, T, E), action (B, T, A) = a_{t-1}, is_first (B, T) bool.
        Returns posterior and prior dicts of (B, T, ...) tensors.

        Same maths as stepping obs_step, arranged for speed (the loop runs at batch B, where every kernel
        launch counts): the first layers of img_in and obs_out are linear in the concatenation of their
        inputs, so the parts that do not depend on the recurrence (a_{t-1}, embed_t, ctx_t) are projected for
        all T steps in one matmul before the loop; the prior's logits depend only on h_t, so they are
        computed for all steps after it."""
        B, T = embed.shape[:2]
        D = self.cfg.deter
        init = self.initial(B)  # once per sequence, not per step
        state = init if state is None else state
        keep = (~is_first).to(embed.dtype).unsqueeze(-1)  # (B, T, 1)
        # img_in: Linear(W [z; a; ctx]) = W_z z + W_a [a; ctx]; obs_out: Linear(W [h; e; ctx]) = W_h h + W_e [e; ctx]
        w_in, w_post = self.img_in[0].weight, self.obs_out[0][0].weight
        SC = self.cfg.stoch * self.cfg.classes
        seq_rest = [keep * action] + ([ctx_seq] if self.ctx_seq_size else [])
        pre_in = F.linear(torch.cat(seq_rest, -1), w_in[:, SC:])  # (B, T, hidden)
        post_rest = [embed] + ([ctx_post] if self.ctx_post_size else [])
        pre_post = F.linear(torch.cat(post_rest, -1), w_post[:, D:])  # (B, T, hidden)
        w_z, w_h = w_in[:, :SC], w_post[:, :D]
        in_norm, post_norm, post_head = self.img_in[1], self.obs_out[0][1], self.obs_out[1]  # Dense = Linear, LayerNorm, SiLU
        deter, stoch = state["deter"], state["stoch"]
        deters, stochs, logits = [], [], []
        for t in range(T):
            k = keep[:, t]
            deter = k * deter + (1 - k) * init["deter"]
            stoch = k * stoch + (1 - k) * init["stoch"]
            deter = self._deter_step(F.silu(in_norm(F.linear(stoch, w_z) + pre_in[:, t])), deter)
            logit = self._dist_logits(post_head(F.silu(post_norm(F.linear(deter, w_h) + pre_post[:, t]))))
            stoch = self._sample(logit)
            deters.append(deter)
            stochs.append(stoch)
            logits.append(logit)
        deter = torch.stack(deters, 1)  # (B, T, D)
        post = {"deter": deter, "stoch": torch.stack(stochs, 1), "logits": torch.stack(logits, 1)}
        return post, {"deter": deter, "logits": self._dist_logits(self.img_out(deter))}

    def imagine(self, start: dict, policy, horizon: int, ctx_seq: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
        """Roll the prior forward from `start` (N, ...) with actions a = policy(state).
        Returns states (H+1, N, ...) including the start, and actions (H+1, N, A) (the last one unused)."""
        state = {k: v for k, v in start.items()}
        states, actions = [state], []
        for _ in range(horizon):
            action = policy(state)
            actions.append(action)
            state = self.img_step(state, action, ctx_seq)
            states.append(state)
        actions.append(policy(state))
        return {k: torch.stack([s[k] for s in states]) for k in ("deter", "stoch")}, torch.stack(actions)

    @staticmethod
    def feat(state: dict) -> torch.Tensor:
        """[h_t, flat z_t], the input of heads, actor and critic: (..., D + S*C)."""
        return torch.cat([state["deter"], state["stoch"]], -1)


def kl_loss(post_logits: torch.Tensor, prior_logits: torch.Tensor, free: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DreamerV3 eq. 5: dynamics loss KL[sg(q) || p] and representation loss KL[q || sg(p)], each summed over
    the S latents and clipped below at `free` nats (free bits). Logits (B, T, S, C) -> two (B, T) tensors."""

    def kl(lhs, rhs):  # KL[Cat(lhs) || Cat(rhs)] summed over latents
        return (lhs.exp() * (lhs - rhs)).sum((-2, -1))

    dyn = kl(post_logits.detach(), prior_logits)
    rep = kl(post_logits, prior_logits.detach())
    return torch.clamp(dyn, min=free), torch.clamp(rep, min=free)
