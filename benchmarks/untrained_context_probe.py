"""Does training g help? The held-out linear probe of a trained learned-context agent's ctx against that of the
same agent with its context encoder g put back to the weights the run started with, on the same recorded
episodes (docs/context_inference.md, the L_TC section).

    python benchmarks/untrained_context_probe.py --checkpoint runs/tc_bench/ckpt.pt --threads 1

The episodes are recorded with the trained agent exactly as `counterfactual.py probe` records them (the run's
evaluation grid, --episodes per context, --steps per episode, every other context held out); ctx_t is then
inferred on them twice, by the trained g and by the initial g. The initial weights are rebuilt as train.py
builds them (seed, then the agent); for a `--ctx.objective tc` run this is checked against the checkpoint's
forward model f, which that objective never trains. Prints both probes and writes them to --out (default
untrained_probe.json next to the checkpoint); run by hand (never by CI).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import envs  # noqa: E402
from checkpoint import build_agent  # noqa: E402
from counterfactual import Probe, load, out_path  # noqa: E402
from dreams import inferred_context  # noqa: E402
from probes import probe_table  # noqa: E402


def main(cmd: Probe) -> dict:
    path = out_path(cmd, cmd.out, "untrained_probe.json")
    agent, args, device, ep, ctx, first = load(cmd)
    torch.manual_seed(args.seed)  # as train.py: the seed, then the agent
    initial = build_agent(args, envs.make_env(args.task, args.obs, [envs.default_context(args.task)], args.seed, args.action_repeat), device)
    if args.ctx.objective == "tc":  # f is built but never trained under L_TC: it must still be at its initial weights
        for (name, p), q in zip(agent.ctx_encoder.forward_model.named_parameters(), initial.ctx_encoder.forward_model.parameters()):
            assert torch.equal(p, q), f"the rebuilt initial weights differ from the run's (forward_model.{name})"
    untrained = copy.deepcopy(agent)
    untrained.ctx_encoder.load_state_dict(initial.ctx_encoder.state_dict())
    features = envs.task_features(args.task)
    names = list(features)
    held_out = (np.arange(len(ep.contexts)) // cmd.episodes) % 2 == 1  # every other context, as counterfactual.py probe
    inside = np.array([all(features[n].inside(c[n]) for n in names) for c in ep.contexts])
    out = {}
    for label, c in (("trained g", ctx), ("initial g", inferred_context(untrained, ep, device))):
        steps = c[:, first :: max(1, (cmd.steps - first) // 16)].cpu().numpy()  # (E, P, X), ~16 per episode
        table = probe_table(steps, ep.true_context, held_out, names, inside)
        out[label] = table
        grid = ", ".join(f"{n} {v:.3f}" for n, v in table["r2_linear"].items() if v is not None)
        inner = ", ".join(f"{n} {v:.3f}" for n, v in table.get("r2_linear_train_range", {}).items() if v is not None)
        print(f"{label}: held-out linear probe R^2, whole grid: {grid}; inside the training range: {inner or '-'}")
    if agent.tc is not None and agent.spaces.image is None:  # have L_TC's codes collapsed? (its targets would be trivial)
        with torch.no_grad():
            index = agent.tc.target_indices(ep.x.to(device).float()).flatten(0, 1)  # (E * T, G)
        counts = torch.stack([torch.bincount(index[:, g], minlength=agent.tc.codebook.shape[0]) for g in range(index.shape[1])]).float()  # (G, Q)
        p = counts / counts.sum(-1, keepdim=True)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)  # (G,) nats
        print(f"L_TC target codes on these episodes: {(counts > 0).sum(-1).float().mean():.1f} of {counts.shape[1]} used per group, "
              f"entropy {entropy.mean():.2f} nats per group (uniform: {np.log(counts.shape[1]):.2f})")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main(tyro.cli(Probe))
