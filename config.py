"""The configuration of a training run: train.py's `Args`, composed of the configs that live next to their code
(`RSSMConfig` in rssm.py, `AgentConfig` in dali.py, `ContextEncoderConfig` in context_encoder.py), with
DreamerV3's size presets (Hafner et al., arXiv:2301.04104, Table B.1, as its code ran them on proprioceptive
DMC) and this project's train ratios; the paper's name of a configuration (`method_name`: Dreamer-DR, DALI-S,
cRSSM-D, ...); the checks that reject flag combinations that cannot work; and the
reading of configurations saved by older code (args.json, checkpoints), completed with what that code trained
with, and compared field by field on --resume.

It sits below train.py, checkpoint.py, evaluate.py and sweep.py, so that none of them imports the training
script to know a run's configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

import envs
from context_encoder import ContextEncoderConfig
from dali import AgentConfig, context_prefix
from rssm import RSSMConfig


@dataclass(frozen=True)
class Args:
    """Training run. Model sizes come from --size; any --rssm.* / --hidden ... flag overrides the preset."""

    task: envs.Task = "walker"
    """Contextual DMC task."""
    obs: envs.ObsKind = "features"
    """Observation: proprioceptive features, or 64x64 RGB pixels."""
    contexts: envs.Setting = "double_box"
    """Training contexts: default, single_0 / single_1 (one feature varies), double_box (both vary)."""
    num_contexts: int = 100
    """Number of training contexts sampled from the training range (with --seed)."""
    steps: int = 500_000
    """Env steps to train for (action repeats and envs counted), rounded up to whole episodes."""
    seed: int = 0
    """Seed of contexts, envs, replay sampling and network initialisation."""
    logdir: str = "runs/default"
    """Where metrics and checkpoints go."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available."""
    size: Literal["cpu", "xs", "s", "m"] = "cpu"
    """Model size preset (DreamerV3's XS/S/M as they ran on proprioceptive DMC, encoder and decoder MLPs 5 x 1024;
    `cpu` is the small default when no GPU is used)."""
    envs: int = 4
    """Parallel envs."""
    action_repeat: int = 2
    """Control steps per policy step (DreamerV3's DMC default 2; the DALI paper used 1)."""
    train_ratio: float = 512.0
    """Replayed steps per policy step: B * T / train_ratio policy steps per update (DreamerV3's 512; the
    cpu preset's default is 128, and 256 on walker, see TRAIN_RATIO)."""
    batch_size: int = 16
    """Sequences per batch B."""
    batch_length: int = 64
    """Steps per sequence T."""
    prefill: int = 2500
    """Env steps of uniform random actions before training starts."""
    replay_capacity: int = 1_000_000
    """Replay size in records (all envs together)."""
    eval_every: int = 10_000
    """Env steps between evaluations (0: never)."""
    eval_episodes: int = 4
    """Episodes per evaluation, one per eval env, on the training contexts."""
    eval_mode: Literal["sample", "mode"] = "sample"
    """Evaluation actions: sampled from the policy (the DALI paper) or its mode."""
    log_every: int = 2_000
    """Env steps between metric lines."""
    save_every: int = 20_000
    """Env steps between periodic checkpoints (taken at the next episode boundary; a signal saves at once)."""
    resume: bool = False
    """Continue the run in --logdir from its ckpt.pt (replay, optimisers, counters, RNGs restored)."""
    threads: int = 1
    """torch CPU threads. 1 (the default) is robust when anything else runs on the machine (env workers,
    another seed): with more threads than free cores, torch's spin-waiting threads slow an update 20-70x.
    More pay only on an otherwise idle machine (docs/speed.md has the measurements);
    0 takes one per core."""
    progress: bool = True
    """Show a progress bar on stderr."""
    agent: Annotated[AgentConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=AgentConfig)
    rssm: RSSMConfig = field(default_factory=RSSMConfig)
    ctx: ContextEncoderConfig = field(default_factory=ContextEncoderConfig)


# Size presets: RSSM sizes and MLP widths. xs, s, m: DreamerV3's sizes (2023 Table B.1) as its code ran them
# on proprioceptive DMC (danijar/dreamerv3 at 423291a, the commit that published its scores): the size
# overrides (`.*\.units`, `.*\.layers`) never matched the encoder's and decoder's `mlp_units`/`mlp_layers`,
# so those stayed at the defaults, 5 x 1024, in every size (docs/training.md has the derivation). `cpu` is
# smaller for 2-core machines, with encoder and decoder as wide as its other MLPs.
ENC_DEC_DREAMERV3 = dict(enc_dec_hidden=1024, enc_dec_layers=5)
SIZES: dict[str, tuple[RSSMConfig, dict]] = {
    # cpu: chosen by wall-clock time to ball_in_cup >= 900 (docs/speed.md): 256 of the 1,024 imagination starts
    "cpu": (RSSMConfig(deter=256, hidden=128, stoch=32, classes=8), dict(hidden=128, layers=1, cnn_depth=16, imag_starts=256)),
    "xs": (RSSMConfig(deter=256, hidden=256), dict(hidden=256, layers=1, cnn_depth=24, **ENC_DEC_DREAMERV3)),
    "s": (RSSMConfig(deter=512, hidden=512), dict(hidden=512, layers=2, cnn_depth=32, **ENC_DEC_DREAMERV3)),
    "m": (RSSMConfig(deter=1024, hidden=640), dict(hidden=640, layers=3, cnn_depth=48, **ENC_DEC_DREAMERV3)),
}

# Train ratio where it differs from DreamerV3's 512, per preset and, where it was measured to matter, per
# task (None: every other task). The cpu preset trains at 128: on ball_in_cup (features, default context)
# ratio 128 first evaluated >= 900 at 140k env steps (8.6k updates); ratio 64 had not learned to catch at
# 65k; 512 costs 4x the updates per env step (docs/learning.md). Walker needs 256: at 128 the main command
# was at 465 after 260k env steps, at 256 it led at every evaluation of the same seed (docs/walker.md).
TRAIN_RATIO: dict[tuple[str, str | None], float] = {("cpu", None): 128.0, ("cpu", "walker"): 256.0}

# Fields that may change on --resume; every other field must equal the checkpoint's.
RESUMABLE = {"steps", "logdir", "device", "resume", "threads", "progress", "eval_every", "log_every", "save_every", "eval_episodes", "eval_mode"}


def preset(size: str, task: str) -> Args:
    """Default Args for a size preset and task (the base that command-line flags override)."""
    rssm, agent = SIZES[size]
    ratio = TRAIN_RATIO.get((size, task), TRAIN_RATIO.get((size, None), Args.train_ratio))
    return Args(task=task, size=size, rssm=rssm, agent=AgentConfig(**agent), train_ratio=ratio)


def peek(argv: list[str], flag: str, default: str) -> str:
    """The value of `flag` in argv (`--flag v` or `--flag=v`; the last one wins), before tyro parses it."""
    value = default
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(f"{flag}="):
            value = a.split("=", 1)[1]
    return value


def method_name(args: Args) -> str:
    """The paper's name of a run's variant: Dreamer-DR, cRSSM-S/D, DALI-S/D; DALI-S-chi with the cross-modal loss
    (`--ctx.cross-weight`), DALI-S-TC when g learns by SPC's L_TC (`--ctx.objective tc`; this project's name, not the
    paper's). A saved args dict goes through `args_from_dict` first, so runs older than a field get its default."""
    context, ctx = args.agent.context, args.ctx
    if context == "none":
        return "Dreamer-DR"
    name = {"oracle": "cRSSM", "learned": "DALI"}[context] + "-" + args.agent.integration[0].upper()
    if context == "oracle":
        return name
    # check_args refuses L_cross with L_TC, so at most one suffix applies
    return name + ("-chi" if ctx.cross_weight else "-TC" if ctx.objective == "tc" else "")


# ----------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------


def check_args(args: Args) -> None:
    """Reject flag combinations that cannot work, naming the bad value."""
    problems = []
    if args.contexts == "default" and args.agent.context == "oracle":
        problems.append("--context oracle with --contexts default: the true context never changes, so it carries no information")
    for name in ("steps", "envs", "batch_size", "batch_length", "action_repeat", "replay_capacity"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    for name in ("enc_dec_hidden", "enc_dec_layers"):
        if getattr(args.agent, name) is not None and getattr(args.agent, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(args.agent, name)}: must be >= 1 (or None: as --{name.split('_')[-1]})")
    if args.train_ratio <= 0:
        problems.append(f"--train-ratio {args.train_ratio}: must be > 0")
    prefix = context_prefix(args.agent, args.ctx)  # history records before the T training steps of a batch
    if args.replay_capacity // args.envs < args.batch_length + prefix:
        problems.append(f"--replay-capacity {args.replay_capacity}: must hold --batch-length + {prefix} history records per env "
                        f"(--ctx.window, + --ctx.refresh with --integration deep; 0 without a learned context)")  # fmt: skip
    if args.ctx.window < 1 or args.ctx.dim < 1:
        problems.append(f"--ctx.window {args.ctx.window}, --ctx.dim {args.ctx.dim}: both must be >= 1")
    if args.ctx.refresh < 0:
        problems.append(f"--ctx.refresh {args.ctx.refresh}: must be >= 0 (R steps a deep ctx is held; 0: per step)")
    if args.ctx.objective == "tc" and args.ctx.cross_weight:
        problems.append(f"--ctx.cross-weight {args.ctx.cross_weight} with --ctx.objective tc: L_cross is weighed against L_FD; use --ctx.objective fd")
    if args.ctx.tc_horizon < 1 or args.ctx.tc_groups < 1 or not 0 < args.ctx.tc_tau <= 1:
        problems.append(f"--ctx.tc-horizon {args.ctx.tc_horizon}, --ctx.tc-groups {args.ctx.tc_groups}: must be >= 1; --ctx.tc-tau {args.ctx.tc_tau}: must be in (0, 1]")
    if args.threads < 0:
        problems.append(f"--threads {args.threads}: must be >= 0 (0: one per core)")
    if args.prefill >= args.steps:
        problems.append(f"--prefill {args.prefill} >= --steps {args.steps}: the agent would never be trained")
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))


# ----------------------------------------------------------------------------------------------------
# Saved configurations: older ones completed, compared on --resume
# ----------------------------------------------------------------------------------------------------


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def migrate_args(d: dict) -> dict:
    """Args saved by older code, completed with the values that code trained with: `ctx.refresh` (added with
    the held deep ctx) is 0, the per-step variant, for a learned deep agent saved without it, and the current
    default for every other agent (which it does not affect)."""
    ctx = d.get("ctx", {})
    if "refresh" not in ctx:
        deep_learned = d.get("agent", {}).get("context") == "learned" and d.get("agent", {}).get("integration") == "deep"
        ctx = {**ctx, "refresh": 0 if deep_learned else ContextEncoderConfig.refresh}
    return {**d, "ctx": ctx}


def args_from_dict(d: dict) -> Args:
    """Rebuild Args saved in a checkpoint or args.json (for evaluate.py and counterfactual.py)."""
    d = migrate_args(d)
    return Args(**{**d, "agent": AgentConfig(**d["agent"]), "rssm": RSSMConfig(**d["rssm"]), "ctx": ContextEncoderConfig(**d["ctx"])})


def config_conflicts(saved: dict, new: dict) -> list[str]:
    """The non-resumable fields where two Args dicts differ, as 'flag: saved X, asked Y' lines. A field absent from
    `saved` was added after that run started: it compares as its default, which is the old behaviour (e.g.
    --ctx.objective fd) for every field but those `migrate_args` completes first (--ctx.refresh)."""
    saved, new = {**_flatten(dataclasses.asdict(Args())), **_flatten(saved)}, _flatten(new)
    return [
        f"--{k.replace('_', '-')}: trained with {saved.get(k)!r}, this run asks {new.get(k)!r}"
        for k in sorted(saved.keys() | new.keys())
        if k.split(".")[0] not in RESUMABLE and saved.get(k) != new.get(k)
    ]
