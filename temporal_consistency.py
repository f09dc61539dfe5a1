"""Latent temporal consistency (TC): a second way to train the context encoder g, `--ctx.objective tc`, after
SPC (Nakhaei, Scannell, Luck, Pajarinen, "Contextual Latent World Models for Offline Meta Reinforcement
Learning", arXiv:2603.02935; code MohammadrezaNakhaei/SPC, its `discrete_ce` world model).

DALI trains g by predicting the next observation (L_FD, context_encoder.py). SPC trains it through a
context-conditioned latent world model: observations are encoded to discrete codes, a transition model that
reads the context predicts the codes of the next H observations, and the classification loss flows into g.

    c_t          = FSQ(e(o_t))                                   online observation encoder e, finite scalar
                                                                 quantisation (straight-through rounding)
    y_{t+k}      = index(FSQ(e_bar(o_{t+k})))                    target code indices from the EMA encoder
                                                                 e_bar <- (1 - tau) e_bar + tau e, no gradient
    l_{t+k}      = d(c^_{t+k-1}, a_{t+k-1}, ctx_t)                per-group logits over the codebook
    c^_t = c_t,  c^_{t+k} = sample_ST(l_{t+k})                   open-loop rollout with straight-through
                                                                 (Gumbel-softmax, hard) samples
    L_TC(t)      = 1/H sum_{k=1..H} rho^{k-1} m_{t,k} CE(l_{t+k}, y_{t+k})     CE averaged over the G groups
    m_{t,k}      = 1 iff o_{t+1} .. o_{t+k} continue o_t's episode (masked at episode ends)

Constants as SPC's defaults: FSQ levels (5, 3) (a codebook of 15 codes per group of 2 channels), H = 5
(`seq_len`), rho = 0.99, tau = 0.005 (`tau`, the EMA rate SPC's `soft_update_params` uses), `use_tar_enc`,
`unc_prop_mode` "sample". ctx_t is DALI's: g's output from the K transitions before t, held fixed over the H
steps as SPC holds its task representation z; it reaches the agent exactly as with L_FD (detached; shallow or
deep integration, dali.py). Only how g learns changes: L_TC trains g, e and d with g's optimiser, and nothing
else (no world-model or actor-critic loss reaches them, and L_TC reaches neither).

Where this differs from SPC:
- Online data: SPC is offline meta-RL on fixed datasets of known tasks; here g, e and d train on DreamerV3's
  replay of the agent's own episodes, beside the world model and the actor-critic, at every update.
- No task-ID term: SPC adds an InfoNCE loss that pulls together the representations of transitions of the
  same task index. DALI uses no task labels (the true context is never read by a learned-context agent), so
  there is no InfoNCE term here: g learns from L_TC alone (SPC's "TC" ablation, its Fig. 3).
- No reward head: SPC's world model also predicts rewards (and its policy reads the codes c_t); here the
  DreamerV3 world model and actor-critic do their own work, and this model exists only to train g.
- Sizes: SPC uses 512 groups (1,024 code channels) and 512-unit MLPs on MuJoCo; here G = 32 groups
  (`--ctx.tc-groups`) and 128 units (`--ctx.tc-units`), the width of f, for an 8-24 dim observation on CPU.
  e has one hidden layer and d two, as in SPC; layers are DreamerV3's Dense (Linear, LayerNorm, SiLU) where
  SPC uses TD-MPC2's (Linear, LayerNorm, Mish).
- Inputs: e reads symlog o_t for features (DreamerV3's vector-input convention; pixels: the world model's
  detached embeddings, as g and f do). SPC reads raw observations.
- Masking: SPC multiplies step k's loss by (1 - done) of step k alone; here a rollout step counts only if no
  episode start lies between o_t and o_{t+k} (replayed sequences cross episode boundaries), and the loss is
  averaged over the rollouts that have at least one valid step.
- Optimiser: e and d train with g's Adam (`--ctx.lr` 1e-3, gradient clip `--ctx.clip` 100) at every update;
  SPC's `spc.yaml` sets learning rates of 1e-4 for its world model and context encoder (`model_lr`,
  `context_enc_lr`) and updates the world model every second step (`model_update_freq: 2`).
- Sequences: SPC draws H-step sequences; here every training step t of a replayed segment starts a rollout
  (targets beyond the segment's end are masked), as L_FD is computed at every step.

Shapes: B batch, N rollout starts, H horizon, G code groups, C = 2 code channels per group (len(FSQ_LEVELS)),
Q = 15 codes per group, O observation (or embedding) size, A action dims, X context dims.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Dense, linear, symlog

FSQ_LEVELS = (5, 3)  # SPC's `fsq_levels`: per group, channel 1 takes 5 values, channel 2 takes 3


def fsq(z: torch.Tensor, levels: tuple[int, ...] = FSQ_LEVELS, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite scalar quantisation (Mentzer et al., arXiv:2309.15505), as in vector-quantize-pytorch's FSQ that SPC
    uses: each channel is bounded by tanh to (level - 1) / 2 (shifted by half a step for an even level), rounded
    with a straight-through gradient, and scaled into [-1, 1]. z (..., G, C) -> codes (..., G, C) with values in
    {-1, ..., 1} (level 5: -1, -0.5, 0, 0.5, 1), and the index of each group's code (..., G) in [0, prod(levels))."""
    L = torch.tensor(levels, dtype=z.dtype, device=z.device)  # (C,)
    half_l = (L - 1) * (1 + eps) / 2
    offset = (L % 2 == 0).to(z.dtype) * 0.5
    bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through: the gradient of `bounded`
    half_width = torch.div(L, 2, rounding_mode="floor")
    codes = rounded / half_width
    basis = torch.cumprod(torch.tensor((1,) + levels[:-1], device=z.device), 0)  # mixed radix: (1, 5)
    indices = ((rounded.detach() + half_width) * basis).sum(-1).round().long()
    return codes, indices


def fsq_codebook(levels: tuple[int, ...] = FSQ_LEVELS) -> torch.Tensor:
    """Every code of one group, in index order: (Q, C) with Q = prod(levels); `fsq`'s index i is row i."""
    index = torch.arange(math.prod(levels))
    digits, radix = [], 1
    for level in levels:
        digits.append((index // radix) % level)
        radix *= level
    digits = torch.stack(digits, -1).float()  # (Q, C)
    half_width = torch.tensor([level // 2 for level in levels], dtype=torch.float32)
    return (digits - half_width) / half_width


def straight_through_sample(logits: torch.Tensor) -> torch.Tensor:
    """One code per group sampled from softmax(logits), as a one-hot with the gradient of the softmax (Gumbel-
    softmax, hard, temperature 1: SPC's "sample" propagation). (..., G, Q) -> (..., G, Q)."""
    return F.gumbel_softmax(logits, tau=1.0, hard=True, dim=-1)


class TemporalConsistencyModel(nn.Module):
    """SPC's `discrete_ce` latent world model without its reward head: online encoder e, its EMA copy e_bar
    (`target`, no gradient, in no optimiser) and the transition model d(c, a, ctx) -> logits."""

    def __init__(self, obs: int, action: int, ctx: int, groups: int, units: int, features: bool = True):
        super().__init__()
        self.groups, self.features = groups, features
        C = len(FSQ_LEVELS)
        Q = math.prod(FSQ_LEVELS)
        self.encoder = nn.Sequential(Dense(obs, units), linear(units, groups * C))  # e: one hidden layer, as SPC
        self.target = copy.deepcopy(self.encoder).requires_grad_(False)  # e_bar starts as a copy of e
        self.transition = nn.Sequential(Dense(groups * C + action + ctx, units), Dense(units, units), linear(units, groups * Q))
        self.register_buffer("codebook", fsq_codebook(), persistent=False)  # (Q, C), a constant

    def _quantise(self, net: nn.Module, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = symlog(obs) if self.features else obs
        z = net(x).unflatten(-1, (self.groups, len(FSQ_LEVELS)))  # (..., G, C)
        return fsq(z)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """c_t = FSQ(e(o_t)), the online codes with straight-through gradients: (..., O) -> (..., G * C)."""
        return self._quantise(self.encoder, obs)[0].flatten(-2)

    @torch.no_grad()
    def target_indices(self, obs: torch.Tensor) -> torch.Tensor:
        """y = index(FSQ(e_bar(o))), the classification targets: (..., O) -> (..., G), no gradient."""
        return self._quantise(self.target, obs)[1]

    def step(self, code: torch.Tensor, action: torch.Tensor, ctx: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One open-loop step: (..., G * C), (..., A), (..., X) -> logits (..., G, Q) of the next codes and a
        straight-through sample of them (..., G * C) (None without `sample`: the rollout's last step needs none)."""
        logits = self.transition(torch.cat([code, action, ctx], -1)).unflatten(-1, (self.groups, -1))  # (..., G, Q)
        if not sample:
            return logits, None
        codes = straight_through_sample(logits) @ self.codebook  # (..., G, Q) @ (Q, C) -> (..., G, C)
        return logits, codes.flatten(-2)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """e_bar <- (1 - tau) e_bar + tau e, after each optimiser step (SPC's `soft_update_params`)."""
        for online, target in zip(self.encoder.parameters(), self.target.parameters()):
            target.lerp_(online, tau)


def temporal_consistency_loss(model: TemporalConsistencyModel, obs, action, ctx, valid, horizon: int, rho: float) -> torch.Tensor:
    """L_TC (SPC's `discrete_ce` temporal-consistency loss) of an H-step open-loop rollout from every start t.

    obs (B, N + 1, O): o_t .. o_{t+N}; action (B, N, A): a_t (row j: the action taken at o_j); ctx (B, N, X):
    ctx_j of each start (not detached: the loss trains g through it); valid (B, N): o_{j+1} continues o_j's
    episode. Step k of the rollout from j predicts the target code indices of o_{j+k} from a_{j+k-1} and
    ctx_j; it counts iff j + k <= N and no episode starts in o_{j+1} .. o_{j+k}.
    Returns (B, N): 1/H sum_k rho^{k-1} m_{j,k} CE_{j,k}, zero where o_{j+1} already starts a new episode."""
    B, N = valid.shape
    targets = model.target_indices(obs[:, 1:])  # (B, N, G): y of o_{j+1}
    pad = lambda x, value: torch.cat([x, torch.full((B, horizon, *x.shape[2:]), value, dtype=x.dtype, device=x.device)], 1)  # noqa: E731
    targets, action, valid = pad(targets, 0), pad(action, 0), pad(valid, False)  # (B, N + H, ...): beyond the end
    code = model.encode(obs[:, :-1])  # (B, N, G * C): c_j, the rollout's start
    mask = torch.ones(B, N, dtype=torch.bool, device=obs.device)
    loss = torch.zeros(B, N, device=obs.device)
    for k in range(1, horizon + 1):
        mask = mask & valid[:, k - 1 : k - 1 + N]  # o_{j+k} continues the episode of o_{j+k-1} (and of o_j)
        logits, code = model.step(code, action[:, k - 1 : k - 1 + N], ctx, sample=k < horizon)  # (B, N, G, Q)
        ce = F.cross_entropy(logits.flatten(0, 2), targets[:, k - 1 : k - 1 + N].flatten(), reduction="none")  # (B * N * G,)
        loss = loss + rho ** (k - 1) * mask * ce.view(B, N, -1).mean(-1)
    return loss / horizon
