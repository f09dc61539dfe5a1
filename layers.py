"""DreamerV3's building blocks (Hafner et al., arXiv:2301.04104, Sec. 2 and App. B), shared by the RSSM, the
world model, the actor-critic and the context encoder: the symlog transform, the symlog two-hot
distribution of the reward head and the critic (eq. 9-10), the truncated-normal initialiser, the Dense
block (Linear -> LayerNorm -> SiLU), output layers and MLPs made of them; and the guard that keeps a
non-finite loss from reaching an optimiser.

Shapes: K two-hot bins."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def symlog(x: torch.Tensor) -> torch.Tensor:
    """DreamerV3 eq. 1: sign(x) ln(|x| + 1), squashes inputs and targets of any scale."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """The inverse of symlog."""
    return torch.sign(x) * torch.expm1(x.abs())


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


def trunc_normal_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DreamerV3's initialiser: truncated normal with variance scale / fan_avg (0.8796 corrects truncation)."""
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    fan_avg = (fan_in + fan_out * receptive) / 2
    std = (scale / fan_avg) ** 0.5 / 0.87962566103423978
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


class Dense(nn.Sequential):
    """Linear -> LayerNorm -> SiLU, the building block of every DreamerV3 network."""

    def __init__(self, inp: int, out: int, eps: float = 1e-3):
        linear = nn.Linear(inp, out, bias=False)  # LayerNorm's bias replaces it
        trunc_normal_(linear.weight)
        super().__init__(linear, nn.LayerNorm(out, eps=eps), nn.SiLU())


def linear(inp: int, out: int, zero: bool = False) -> nn.Linear:
    """An output layer; `zero` initialises it to zeros (DreamerV3's reward head and critic)."""
    layer = nn.Linear(inp, out)
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        trunc_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(inp: int, hidden: int, layers: int, out: int | None = None, zero_out: bool = False) -> nn.Sequential:
    """`layers` x Dense(hidden) [+ a linear output layer]."""
    mods = [Dense(inp if i == 0 else hidden, hidden) for i in range(layers)]
    if out is not None:
        mods.append(linear(hidden if layers else inp, out, zero=zero_out))
    return nn.Sequential(*mods)


def require_finite(losses: dict[str, torch.Tensor]) -> None:
    """Raise FloatingPointError naming every non-finite loss (scalars), before it is backpropagated: a NaN or
    infinite loss would turn every weight it reaches into NaN. One host sync."""
    if not bool(torch.isfinite(torch.stack([v.detach().float() for v in losses.values()])).all()):
        raise FloatingPointError("non-finite " + ", ".join(f"{k} = {v.item()}" for k, v in losses.items() if not torch.isfinite(v)))
