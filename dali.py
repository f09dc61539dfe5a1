"""The DALI agent: a DreamerV3 world model and actor-critic, conditioned on a context vector.

DreamerV3 (Hafner et al., arXiv:2301.04104) in two parts: the world model (world_model.py: encoder, RSSM,
decoder, reward and continue heads; Sec. 2, eq. 4-5) and the actor-critic trained on 15-step imagined
rollouts from every posterior state (actor_critic.py; Sec. 3, eq. 6-11). DALI (Röder et al.,
arXiv:2508.20294, Sec. 4.2) adds a context vector ctx; the Agent here composes the two parts, chooses
where ctx comes from and where it goes, trains the context encoder (context_encoder.py), and acts:

    --context   learned: ctx from the context encoder   oracle: the true, normalised context (the cRSSM
                baselines)   none: context-unaware (Dreamer-DR)
    --integration shallow: learned -> the posterior q(z_t | h_t, x_t, ctx_t) only (DALI-S, as the paper
                writes it; the authors' release also feeds ctx to the sequence model); oracle -> the
                encoder input, reconstructed by the decoder (cRSSM-S)
                deep: sequence model, decoder, reward, continue, actor and critic read ctx; the posterior
                reads none (DALI-D, cRSSM-D, as in the authors' configuration). A learned deep ctx is held
                (`held_context`), the true context is constant within an episode.

A deep agent's learned ctx is held, one value per R = `--ctx.refresh` steps of an episode. The paper writes
the deep RSSM with ctx at every step (h_t = f(h_{t-1}, z_{t-1}, a_{t-1}, ctx)) and leaves open which
window's ctx that is; the authors' release computes one ctx per replayed sequence, from the whole sequence
(its future included), and holds it over the sequence and over imagination. Here step n of an episode reads
the ctx of its refresh step r = R * floor(n / R), pooled from the K transitions up to o_{r-1} (at r = 0: the
"no evidence yet" ctx): the same value in training (every step of a replayed segment, each by its own episode
step), in imagination (held from the start state, as the release holds it) and when acting (the window
refreshes at the same steps). A per-step ctx (`--ctx.refresh 0`, the earlier variant: ctx_{t-1} into the
sequence model, ctx_t into the heads) moves with the state within an episode, so in training it hands the
prior a fresh view of recent observations that imagination, which holds one ctx, never has
(docs/deep_context.md has the measurements).

ctx is detached wherever the world model and the actor-critic consume it: only L_FD (and L_cross) train
the context encoder, with its own optimiser (or, with `--ctx.objective tc`, SPC's L_TC: temporal_consistency.py).
A learned-context agent never reads the true context.

Replayed batches of a learned-context agent hold P = `context_prefix` extra records before the T training
steps: P = K, so that ctx_t of the first training step pools a full window of K transitions (fewer after an
episode start); with deep integration P = K + R, so that the held ctx of the first training step, pooled at
a refresh step up to R - 1 steps earlier from transitions up to the step before it, pools K transitions too,
as when acting (P = K + 1 for the per-step variant, which reads ctx_{t-1}).

Data convention (one for replay, training and acting): record t holds o_t, the action a_{t-1} that led to
it (zeros when is_first), the reward r_t received on arriving at o_t, is_first_t, is_terminal_t and the
true context; a learned deep agent's records also hold `step`, t's step in its episode (0 when is_first).
The reward head at state s_t predicts r_t.

Shapes: B batch, T time, P context prefix, N envs when acting, F model features, A action dims, X ctx dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from actor_critic import ActorCritic, ActorCriticConfig
from context_encoder import ContextEncoder, ContextEncoderConfig, forward_dynamics_loss
from context_window import ContextWindow
from cross_modal import CrossModal, context_objective, cross_modal_context_loss
from layers import require_finite
from rssm import RSSMConfig
from temporal_consistency import TemporalConsistencyModel, temporal_consistency_loss
from world_model import Spaces, WorldModel, WorldModelConfig

ContextSource = Literal["none", "oracle", "learned"]
Integration = Literal["shallow", "deep"]


@dataclass(frozen=True)
class ContextConfig:
    """Where ctx comes from and where it goes (DALI Sec. 4.2)."""

    context: ContextSource = "learned"
    """Where ctx comes from: learned (DALI), oracle (true context: cRSSM), none (Dreamer-DR)."""
    integration: Integration = "shallow"
    """shallow: ctx into the posterior (or, oracle, the encoder); deep: sequence model, decoder, heads, actor, critic (not the posterior)."""


# One flat config, so that flags stay short (--context, --hidden: the MLPs of both parts, --model-lr, ...);
# the bases' order puts the context choice first in --help, then the world model, then the actor-critic.
@dataclass(frozen=True)
class AgentConfig(ActorCriticConfig, WorldModelConfig, ContextConfig):
    """Everything of the agent but the RSSM sizes (DreamerV3 App. B, Table B.1 defaults)."""


def holds_context(cfg: AgentConfig, ctx_cfg: ContextEncoderConfig) -> bool:
    """Whether the agent's deep path reads a held learned ctx (`held_context`): its replay records `step`."""
    return cfg.context == "learned" and cfg.integration == "deep" and ctx_cfg.refresh > 0


def context_prefix(cfg: AgentConfig, ctx_cfg: ContextEncoderConfig) -> int:
    """History records P before the T training steps of a replayed batch: K for a learned context, so that ctx_t
    of the first step pools K transitions; with deep integration K + R (held: the first step's refresh step
    lies up to R - 1 records earlier and reads the ctx of the record before it) or K + 1 (per-step: ctx_{t-1}),
    so that the deep path's ctx pools K transitions there too, as when acting; 0 otherwise."""
    if cfg.context != "learned":
        return 0
    if cfg.integration == "shallow":
        return ctx_cfg.window
    return ctx_cfg.window + (ctx_cfg.refresh if ctx_cfg.refresh > 0 else 1)


def sequence_context(ctx: torch.Tensor, is_first: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
    """The context the sequence model reads on its step into h_t: ctx_{t-1}, pooled from transitions up to
    o_{t-1}, so that the prior p(z_t | h_t) never sees o_t; at an episode start ctx_t (no transition yet).
    Imagination from s_t then feeds ctx_t into the step to h_{t+1}, exactly what training did.
    ctx (B, T, X) holds ctx_t, is_first (B, T), before (B, X) the ctx of the step before the first
    (None: ctx_0 stands in, right when step 0 starts an episode or ctx is constant within one) -> (B, T, X)."""
    previous = torch.cat([(ctx[:, :1] if before is None else before[:, None]), ctx[:, :-1]], 1)
    return torch.where(is_first[..., None], ctx, previous)


def episode_steps(is_first: torch.Tensor, first: int | torch.Tensor = 0) -> torch.Tensor:
    """The step n_t of each record in its episode, as `step` records it: 0 at is_first, counting on from
    `first` (the first record's step, (B,) or a number) before the segment's first episode start.
    is_first (B, L) -> (B, L) long."""
    L = is_first.shape[1]
    t = torch.arange(L, device=is_first.device).expand_as(is_first)
    last_start = torch.cummax(torch.where(is_first, t, torch.full_like(t, -1)), 1).values  # (B, L), -1: none yet
    first = torch.as_tensor(first, device=is_first.device).reshape(-1, 1)
    return torch.where(last_start >= 0, t - last_start, t + first)


def held_context(seq_ctx: torch.Tensor, step: torch.Tensor, refresh: int) -> torch.Tensor:
    """DALI-D's learned ctx, held for R = `refresh` steps: record t, at step n_t of its episode, reads the
    sequence context of its refresh step r = t - (n_t mod R), i.e. ctx_{r-1} (pooled from transitions up to
    o_{r-1}; at an episode start the empty ctx). Nothing at or after o_r enters, so neither the prior at any
    step of the interval nor a rollout imagined from it sees an observation that imagination would lack.
    seq_ctx (B, L, X) from `sequence_context`, step (B, L) -> (B, L, X); rows whose refresh step lies before
    the segment are clamped to its first record (the caller drops them: the context prefix is K + R)."""
    L = step.shape[1]
    r = torch.arange(L, device=step.device) - (step.long() % refresh)  # (B, L)
    return seq_ctx.gather(1, r.clamp(min=0)[..., None].expand(-1, -1, seq_ctx.shape[-1]))


class Agent(nn.Module):
    """World model `wm` + actor-critic `ac` + the context wiring. `update(batch)` does one training step;
    `act(obs, state)` acts. Attribute names follow the metric namespaces (wm/, ac/, ctx/)."""

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
        self.context_prefix = context_prefix(cfg, ctx_cfg)
        self.holds_context = holds_context(cfg, ctx_cfg)

        def build_context_encoder(wm: WorldModel) -> None:
            # Built between the world model's RSSM and its heads: the order in which the modules have always
            # drawn their initial weights, so that a seed gives the same agent as before the split.
            token_obs = spaces.obs if spaces.image is None else wm.encoder.size  # pixels: (detached) embeddings
            self.ctx_encoder = ContextEncoder(ctx_cfg, token_obs, spaces.action, features=spaces.image is None)
            self.cross = CrossModal(ctx_cfg.dim, rssm_cfg.deter + rssm_cfg.stoch * rssm_cfg.classes) if ctx_cfg.cross_weight else None

        cross_scale = ctx_cfg.cross_weight if learned else 0.0  # L_cross's state term trains the world model
        self.wm = WorldModel(cfg, rssm_cfg, spaces, self.ctx_enc, self.ctx_post, self.ctx_deep, build_context_encoder if learned else None, cross_scale)
        self.ac = ActorCritic(cfg, self.wm.feat_size, spaces.action)
        self.tc = None  # L_TC's model (--ctx.objective tc), built last: g, world model and actor-critic start as with L_FD
        if learned and ctx_cfg.objective == "tc":
            if ctx_cfg.cross_weight:
                raise ValueError(f"--ctx.cross-weight {ctx_cfg.cross_weight} needs --ctx.objective fd (L_cross is weighed against L_FD)")
            enc = self.ctx_encoder
            self.tc = TemporalConsistencyModel(enc.obs_size, spaces.action, ctx_cfg.dim, ctx_cfg.tc_groups, ctx_cfg.tc_units, enc.features)
        if learned:  # g, and f and L_cross's V (its W is fixed) or L_TC's encoder and transition model (its target is an EMA)
            cross_params = [p for p in self.cross.parameters() if p.requires_grad] if self.cross else []
            ctx_params = list(self.ctx_encoder.parameters()) + cross_params
            if self.tc is not None:
                ctx_params = [p for n, p in self.ctx_encoder.named_parameters() if not n.startswith("forward_model.")]
                ctx_params += [p for p in self.tc.parameters() if p.requires_grad]
            self.ctx_opt = torch.optim.Adam(ctx_params, ctx_cfg.lr)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimiser, by name (checkpoints save and restore exactly these)."""
        opts = {"model": self.wm.opt, "actor": self.ac.actor_opt, "critic": self.ac.critic_opt}
        return {**opts, "ctx": self.ctx_opt} if self.cfg.context == "learned" else opts

    # -- context wiring ------------------------------------------------------------------------------

    def context(self, batch: dict, embed: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
        """ctx_t for the last T steps of `batch` (B, P + T, ...): (B, T, X) detached, or None for a
        context-unaware agent; the sequence model's context (`sequence_context`, (B, T, X)); and, for a
        learned context, the not-yet-detached pieces its losses need. A held deep ctx (`held_context`, from
        the records' `step`) is both the heads' and the sequence model's.
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
                x = self.wm.encoder(batch["image"] if embed is None else batch["image"][:, :P])
            if embed is not None:
                x = torch.cat([x, embed.detach()], 1)  # (B, P + T, E)
        ctx, valid = self.ctx_encoder.segment(x, batch["action"], batch["is_first"])  # (B, P+T, X), (B, P+T-1)
        pieces = {"x": x, "ctx": ctx, "valid": valid}
        if self.holds_context:  # DALI-D: heads and sequence model read one held value
            held = held_context(sequence_context(ctx, batch["is_first"]), batch["step"], self.ctx_cfg.refresh)[:, P:].detach()
            return held, held, pieces
        now = ctx[:, P:].detach()  # (B, T, X)
        seq = sequence_context(now, batch["is_first"][:, P:], ctx[:, P - 1].detach())  # P >= K >= 1
        return now, seq, pieces

    # -- training ------------------------------------------------------------------------------------

    def update(self, batch: dict) -> dict[str, torch.Tensor]:
        """One gradient step of world model, context encoder, actor and critic on a batch of (B, P + T)
        sequences: P = `context_prefix` records of history before the T training steps.
        Returns detached scalar metrics (no host sync: call .item() only when logging)."""
        full, batch = batch, {k: v[:, self.context_prefix :] for k, v in batch.items()}
        embed = None
        if self.cfg.context == "learned" and self.spaces.image is not None:  # one CNN pass over the T frames
            embed = self.wm.encoder(batch["image"])  # (B, T, E)
        ctx, seq_ctx, pieces = self.context(full, embed)
        # World model
        post, metrics = self.wm.update(batch, ctx, seq_ctx, embed, self.cross if self.cfg.context == "learned" else None)
        # Context encoder: trained by L_FD (+ L_cross) alone
        if pieces:
            metrics.update(self.update_context_encoder(full, pieces, self.wm.rssm.feat(post)))
        # Imagination, actor and critic
        metrics.update(self.ac.update(self.wm, post, ctx, batch["is_terminal"]))
        return {k: v.detach() for k, v in metrics.items()}

    def update_context_encoder(self, batch: dict, pieces: dict, state: torch.Tensor) -> dict:
        """DALI eq. 3: L_FD over the T training steps (each ctx_t with its full window), + lambda O times L_cross's
        context term (`context_objective`) towards the posterior model state [h_t; z_t] `state` (B, T, D + S*C); its state term is a
        world-model loss (`WorldModel.loss`)."""
        if self.tc is not None:
            return self.update_context_encoder_tc(batch, pieces)
        P, x, ctx = self.context_prefix, pieces["x"], pieces["ctx"]
        # step t predicts o_{t+1} from (o_t, a_t, ctx_t); a_t is stored with record t+1
        fd = forward_dynamics_loss(self.ctx_encoder, x[:, P:-1], x[:, P + 1 :], batch["action"][:, P + 1 :], ctx[:, P:-1], pieces["valid"][:, P:])
        loss = fd.sum() / pieces["valid"][:, P:].sum().clamp(min=1)
        metrics = {"ctx/fd_loss": loss.detach()}
        if self.cross is not None:
            cross = cross_modal_context_loss(self.cross, ctx[:, P:], state).mean()
            loss = context_objective(loss, cross, self.ctx_cfg.cross_weight, x.shape[-1])
            metrics["ctx/cross_loss"], metrics["ctx/loss"] = cross.detach(), loss.detach()
        require_finite({"ctx/fd_loss": metrics["ctx/fd_loss"], **({"ctx/cross_loss": metrics["ctx/cross_loss"]} if self.cross is not None else {})})
        self.ctx_opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.ctx_opt.param_groups for p in g["params"]]
        metrics["ctx/grad_norm"] = nn.utils.clip_grad_norm_(params, self.ctx_cfg.clip)
        self.ctx_opt.step()
        metrics["ctx/norm"] = ctx[:, P:].detach().norm(dim=-1).mean()
        return metrics

    def update_context_encoder_tc(self, batch: dict, pieces: dict) -> dict:
        """`--ctx.objective tc`: SPC's L_TC (temporal_consistency.py) over H-step rollouts from every training step
        t but the last (each ctx_t with its full window), training g, L_TC's encoder and transition model; then
        the EMA of its target encoder."""
        P, x, ctx = self.context_prefix, pieces["x"], pieces["ctx"]
        valid = pieces["valid"][:, P:]  # (B, T - 1): o_{t+1} continues o_t's episode
        tc = temporal_consistency_loss(self.tc, x[:, P:], batch["action"][:, P + 1 :], ctx[:, P:-1], valid, self.ctx_cfg.tc_horizon, self.ctx_cfg.tc_rho)
        loss = tc.sum() / valid.sum().clamp(min=1)  # over the rollouts whose first step is valid
        metrics = {"ctx/tc_loss": loss.detach()}
        require_finite(metrics)
        self.ctx_opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.ctx_opt.param_groups for p in g["params"]]
        metrics["ctx/grad_norm"] = nn.utils.clip_grad_norm_(params, self.ctx_cfg.clip)
        self.ctx_opt.step()
        self.tc.update_target(self.ctx_cfg.tc_tau)
        metrics["ctx/norm"] = ctx[:, P:].detach().norm(dim=-1).mean()
        return metrics

    # -- acting --------------------------------------------------------------------------------------

    def initial_state(self, n: int) -> tuple:
        """Acting state for n envs: (latent, previous action, context window or None)."""
        device = self.wm.bins.device
        refresh = self.ctx_cfg.refresh if self.holds_context else 0
        window = ContextWindow(self.ctx_encoder, n, device, refresh) if self.cfg.context == "learned" else None
        return self.wm.rssm.initial(n), torch.zeros(n, self.spaces.action, device=device), window

    def state_dict_of(self, state: tuple) -> dict:
        """The acting state (latent, previous action, context window or None) as tensors, for a checkpoint."""
        latent, prev_action, window = state
        return {"latent": dict(latent), "prev_action": prev_action, "window": None if window is None else window.state_dict()}

    def load_state(self, saved: dict, n: int) -> tuple:
        """The inverse of `state_dict_of`, for n envs, on this agent's device."""
        _, _, window = self.initial_state(n)
        if window is not None:
            window.load_state_dict(saved["window"])
        device = self.wm.bins.device
        return {k: v.to(device) for k, v in saved["latent"].items()}, saved["prev_action"].to(device), window

    @torch.inference_mode()
    def act(self, obs: dict, state: tuple, sample: bool = True, context: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        """One policy step for a batch of envs. obs: tensors (N, ...) with "is_first"; returns actions
        (N, A) in [-1, 1] and the next state. The action is a_t, stored as the next record's a_{t-1}.
        A learned ctx_t comes from this env's window of the current episode's transitions up to o_t.
        `context` (N, X), the true normalised context, is read by the oracle baselines alone."""
        latent, prev_action, window = state
        wm = self.wm
        x = obs["image"] if self.spaces.image is not None else obs["obs"].float()
        if self.cfg.context == "oracle":
            if context is None:
                raise ValueError("a --context oracle agent acts on the true context: pass act(..., context=...)")
            ctx = seq_ctx = context.float()  # constant within an episode: ctx_{t-1} = ctx_t
            embed = wm.encoder(x, ctx if self.ctx_enc else None)
        else:
            embed = wm.encoder(x)
            ctx = seq_ctx = None
            if self.cfg.context == "learned":  # tokens from features, or from pixel embeddings
                previous = window.ctx  # ctx_{t-1}, None before the window's first step (an episode start)
                ctx = window.update(x if self.spaces.image is None else embed, prev_action, obs["is_first"])
                seq_ctx = ctx if previous is None else torch.where(obs["is_first"][:, None], ctx, previous)
                if self.holds_context:  # DALI-D: the value of the last refresh step, as in training
                    ctx = seq_ctx = window.hold(seq_ctx)
        seq_ctx, post_ctx = (seq_ctx if self.ctx_deep else None), (ctx if self.ctx_post else None)
        latent, _ = wm.rssm.obs_step(latent, prev_action, embed, obs["is_first"], seq_ctx, post_ctx)
        dist = self.ac.actor(wm.feat(latent, ctx))
        action = (dist.sample() if sample else dist.mean).clamp(-1, 1)
        return action, (latent, action, window)
