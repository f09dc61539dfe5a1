"""How well does the context vector encode the true physics? (DALI Sec. 5, the O(K) vs O(T) argument)

For each task: collect random-policy episodes under the 100 training contexts of --setting (default
`double_box`: both features vary; `single_0`: gravity alone); train the context encoder g by L_FD alone
for a fixed time per window length K (`--objectives tc` or `none`: by SPC's L_TC, or not at all); fit probes from ctx_t to the true normalised context on training
episodes and report R^2 on held-out episodes (linear probe, and a small MLP probe beside it). Next to it,
the same probes on the deterministic RSSM state h_t of a DreamerV3 world model trained for the same time
on the same data (h_t sees the whole episode so far).
With --ceiling (default), two measures of what the data allow: the largest-K encoder trained to regress
the true context (the best any g of this shape does on these episodes), and the ratio of f's held-out
L_FD given the true context to that given none.

Run by hand (per task, about (number of K + 3) x --seconds plus collection):
    python benchmarks/context_probe.py --seconds 120
"""

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
from probes import linear_r2, random_rollouts  # noqa: E402
from context_encoder import ContextEncoder, ContextEncoderConfig, forward_dynamics_loss  # noqa: E402
from temporal_consistency import TemporalConsistencyModel, temporal_consistency_loss  # noqa: E402
from rssm import RSSMConfig  # noqa: E402
from world_model import Spaces, WorldModel, WorldModelConfig  # noqa: E402


@dataclass(frozen=True)
class Args:
    tasks: tuple[str, ...] = ("ball_in_cup", "walker")
    """Tasks to probe."""
    windows: tuple[int, ...] = (1, 4, 16, 64)
    """Window lengths K of the context encoder."""
    seconds: float = 120.0
    """Training time of each encoder (and of the world model)."""
    episodes: int = 200
    """Random-policy episodes (3/4 train, 1/4 held out)."""
    steps: int = 150
    """Policy steps per episode (action repeat 2)."""
    probe_from: int = 0
    """First probe step (0: K_max + 1, so every window is full); probes every `probe_every` steps from there.
    Windows of earlier steps hold all transitions since the episode start."""
    probe_every: int = 20
    """Spacing of the probe steps."""
    rssm: bool = True
    """Also probe the RSSM state h_t."""
    ceiling: bool = True
    """Also measure what the data allow at the largest K: the same encoder trained to regress the true
    context (supervised, a ceiling for L_FD's encoder), and how much knowing the true context lowers the
    held-out L_FD of f (the signal L_FD can give g)."""
    threads: int = 2
    """torch threads."""
    seed: int = 0
    """Seed of contexts, envs and training."""
    objectives: tuple[str, ...] = ("fd",)
    """What trains g in the K rows: fd (L_FD, DALI), tc (L_TC, SPC's latent temporal consistency with the
    `--ctx.objective tc` defaults), none (g at its initial weights, the baseline a trained g must beat)."""
    setting: str = "double_box"
    """Training contexts the episodes are drawn from (envs.train_contexts); a feature held at its default
    gets no R^2 ("-")."""


def r2_mlp(xtr, ytr, xte, yte):
    torch.manual_seed(0)
    m, s = xtr.mean(0), xtr.std(0) + 1e-6
    net = torch.nn.Sequential(torch.nn.Linear(xtr.shape[1], 32), torch.nn.SiLU(), torch.nn.Linear(32, ytr.shape[1]))
    opt = torch.optim.Adam(net.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(300):
        loss = ((net((xtr - m) / s) - ytr) ** 2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    with torch.no_grad():
        pred = net((xte - m) / s)
    return (1 - ((pred - yte) ** 2).sum(0) / ((yte - yte.mean(0)) ** 2).sum(0)).tolist()


def probe(features: torch.Tensor, ctx_true: torch.Tensor, n_train: int):
    """features (E, P, F) at P probe steps per episode -> R^2 per context feature, linear and MLP."""
    y = ctx_true[:, None].expand(-1, features.shape[1], -1)
    split = lambda a: (a[:n_train].flatten(0, 1), a[n_train:].flatten(0, 1))  # noqa: E731
    (xtr, xte), (ytr, yte) = split(features), split(y)
    return linear_r2(*(a.double().numpy() for a in (xtr, ytr, xte, yte))).tolist(), r2_mlp(xtr, ytr, xte, yte)


def train_encoder(K, obs, actions, n_train, probe_steps, seconds, ctx_true=None, objective="fd"):
    """Train g (and f) by L_FD for `seconds` (objective tc: g and L_TC's model by L_TC; none: not at all); with
    `ctx_true` (E, F), train g instead to regress the true context in its first F dims (the supervised
    ceiling). Returns ctx at the probe steps (E, P, X)."""
    L = K + 32
    cfg = ContextEncoderConfig(window=K)
    enc = ContextEncoder(cfg, obs.shape[-1], actions.shape[-1])
    params = list(enc.parameters())
    if objective == "tc":
        tc = TemporalConsistencyModel(obs.shape[-1], actions.shape[-1], cfg.dim, cfg.tc_groups, cfg.tc_units)
        params = [p for n, p in enc.named_parameters() if not n.startswith("forward_model.")] + [p for p in tc.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, enc.cfg.lr)
    S, start, its, loss = obs.shape[1] - 1, time.time(), 0, torch.tensor(float("nan"))
    while objective != "none" and time.time() - start < seconds:
        idx = torch.randint(0, n_train, (32,))
        steps = torch.randint(0, S + 1 - L, (32,))[:, None] + torch.arange(L)
        o, a = obs[idx[:, None], steps], actions[idx[:, None], steps]
        ctx, valid = enc.segment(o, a, torch.zeros(32, L, dtype=torch.bool))
        if ctx_true is not None:  # full windows only: the last L - K steps
            loss = ((ctx[:, K:, : ctx_true.shape[1]] - ctx_true[idx, None]) ** 2).mean()
        elif objective == "tc":  # rollouts from the steps with full windows, as train.py's batches
            loss = temporal_consistency_loss(tc, o[:, K:], a[:, K + 1 :], ctx[:, K:-1], valid[:, K:], cfg.tc_horizon, cfg.tc_rho).mean()
        else:
            loss = forward_dynamics_loss(enc, o[:, :-1], o[:, 1:], a[:, 1:], ctx[:, :-1], valid).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        if objective == "tc":
            tc.update_target(cfg.tc_tau)
        its += 1
    with torch.no_grad():
        zeros = torch.zeros(len(obs), K + 1, dtype=torch.bool)
        ctx = torch.stack([enc.segment(obs[:, max(0, t - K) : t + 1], actions[:, max(0, t - K) : t + 1], zeros[:, : t + 1])[0][:, -1] for t in probe_steps], 1)
    return ctx, its, loss.item()


def fd_gain(obs, actions, ctx_true, n_train, seconds):
    """Held-out L_FD of f given the true context, relative to f given none (both trained `seconds / 2`):
    below 1 by as much as the context helps predict o_{t+1}, the only signal L_FD gives g."""
    losses = []
    for known in (False, True):
        torch.manual_seed(0)
        f = ContextEncoder(ContextEncoderConfig(dim=ctx_true.shape[1]), obs.shape[-1], actions.shape[-1])
        opt = torch.optim.Adam(f.forward_model.parameters(), f.cfg.lr)
        c = ctx_true[:, None].expand(-1, obs.shape[1] - 1, -1) * float(known)  # (E, S, F)
        fd = lambda e: forward_dynamics_loss(f, obs[e, :-1], obs[e, 1:], actions[e, 1:], c[e], torch.ones(c[e].shape[:-1]))  # noqa: E731
        start = time.time()
        while time.time() - start < seconds / 2:
            loss = fd(torch.randint(0, n_train, (32,))).mean()
            opt.zero_grad(), loss.backward(), opt.step()
        with torch.no_grad():
            losses.append(fd(torch.arange(n_train, len(obs))).mean().item())
    return losses[1] / losses[0]


def train_world_model(obs, actions, n_train, probe_steps, seconds):
    """A context-unaware DreamerV3 world model (cpu preset) trained on the same data; returns h_t."""
    spaces = Spaces(action=actions.shape[-1], obs=obs.shape[-1], context=0)
    wm = WorldModel(WorldModelConfig(hidden=128, layers=1), RSSMConfig(deter=256, hidden=128, classes=8), spaces)
    S, T, start, its = obs.shape[1] - 1, 64, time.time(), 0
    while time.time() - start < seconds:
        idx = torch.randint(0, n_train, (16,))
        first = torch.randint(0, S + 1 - T, (16,))
        steps = first[:, None] + torch.arange(T)
        batch = {"obs": obs[idx[:, None], steps], "action": actions[idx[:, None], steps], "reward": torch.zeros(16, T),
                 "is_first": (steps == 0), "is_terminal": torch.zeros(16, T, dtype=torch.bool)}  # fmt: skip
        losses, _ = wm.loss(batch)
        loss = sum(wm.loss_scales[k] * v.mean() for k, v in losses.items() if k != "rew")
        wm.opt.zero_grad(), loss.backward(), wm.opt.step()
        its += 1
    with torch.no_grad():
        is_first = torch.zeros(obs.shape[:2], dtype=torch.bool)
        is_first[:, 0] = True
        post, _ = wm.rssm.observe(wm.encoder(obs), actions, is_first)
    return post["deter"][:, list(probe_steps)], its


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    rows, gains = [], []
    for task in args.tasks:
        torch.manual_seed(args.seed)
        obs, actions, ctx_true = map(torch.tensor, random_rollouts(task, args.setting, args.episodes, args.steps, args.seed))
        names = list(envs.CONTEXT_FEATURES[task])
        n_train = args.episodes * 3 // 4
        probe_steps = range(args.probe_from or max(args.windows) + 1, args.steps + 1, args.probe_every)
        for K in args.windows:
            for objective in args.objectives:
                if len(args.objectives) > 1:
                    torch.manual_seed(args.seed)  # the same initial g for every objective
                ctx, its, loss = train_encoder(K, obs, actions, n_train, probe_steps, args.seconds, objective=objective)
                lin, mlp = probe(ctx, ctx_true, n_train)
                what = f"ctx, K={K}" + ("" if args.objectives == ("fd",) else f", g trained by {objective}")
                rows.append((f"{task} ({names[0]}, {names[1]})", what, its, lin, mlp))
                print(task, K, objective, its, f"loss {loss:.4f}", lin, mlp, flush=True)
        if args.ceiling:
            K = max(args.windows)
            ctx, its, _ = train_encoder(K, obs, actions, n_train, probe_steps, args.seconds, ctx_true)
            lin, mlp = probe(ctx, ctx_true, n_train)
            rows.append((f"{task} ({names[0]}, {names[1]})", f"ctx, K={K}, supervised by the true context (ceiling)", its, lin, mlp))
            gains.append((task, fd_gain(obs, actions, ctx_true, n_train, args.seconds)))
            print(task, "ceiling", its, lin, mlp, "fd ratio", gains[-1][1], flush=True)
        if args.rssm:
            h, its = train_world_model(obs, actions, n_train, probe_steps, args.seconds)
            lin, mlp = probe(h, ctx_true, n_train)
            rows.append((f"{task} ({names[0]}, {names[1]})", "RSSM h_t (whole episode)", its, lin, mlp))
            print(task, "h", its, lin, mlp, flush=True)
    print(f"\nProbe R^2 on held-out episodes ({args.seconds:.0f} s of training each, random policy, {args.setting} contexts, "
          f"probe steps {list(probe_steps)})\n")
    print("| task (feature 0, feature 1) | input | updates | " + " | ".join(f"{f} linear | {f} MLP" for f in ("feature 0", "feature 1")) + " |")
    print("|---|---|---|" + "---|" * 4)
    for task, what, its, lin, mlp in rows:
        r2 = " | ".join(f"{v:.2f}" if math.isfinite(v) else "-" for v in (lin[0], mlp[0], lin[1], mlp[1]))
        print(f"| {task} | {what} | {its} | {r2} |")
    for task, ratio in gains:
        print(f"{task}: held-out L_FD of f given the true context / given none = {ratio:.3f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
