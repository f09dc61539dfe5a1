"""A training run's configuration and its checkpoints: the `Args` of train.py with DreamerV3's size presets
(Hafner et al., arXiv:2301.04104, Table B.1), saving and loading ckpt.pt, and rebuilding a trained agent.

It sits below train.py, evaluate.py and counterfactual.py, so that evaluating a checkpoint never imports
the training script. A checkpoint is one dict of tensors and plain Python types (version, args, agent,
optimizers, replay, counters, RNG states, and the acting state of a checkpoint taken mid-episode); it is
loaded with torch.load(weights_only=True), so a shared checkpoint cannot run code on load. A pretrained
agent (`export_agent`) is the same dict with the agent's weights alone: evaluate.py, film.py and
counterfactual.py load it like a checkpoint; train.py cannot resume it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

import envs
from context_encoder import ContextEncoderConfig
from dali import Agent, AgentConfig, Spaces
from rssm import RSSMConfig

CHECKPOINT_VERSION = 2  # 2: the agent's world model and actor-critic are submodules `wm` and `ac`


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


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(path: str | Path) -> Path:
    """A run directory or its ckpt.pt -> the ckpt.pt."""
    path = Path(path)
    return path / "ckpt.pt" if path.is_dir() else path


def load_checkpoint(path: str | Path, args: Args | None = None) -> dict:
    """Load ckpt.pt (or a run directory's) with clear errors for a missing, corrupt, unsafe or incompatible
    file. With `args`, every non-resumable field must equal the checkpoint's; all conflicts are listed."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {path}")
    try:
        # weights_only: a checkpoint holds tensors and plain types only, so loading one never runs its code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0]
        raise SystemExit(
            f"error: checkpoint {path} holds objects other than tensors and plain types; refused, since loading them "
            f"could run code ({reason})"
        ) from None
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise SystemExit(f"error: checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if isinstance(ckpt, dict) and ckpt.get("version") == 1:
        ckpt = migrate_v1(ckpt)
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise SystemExit(f"error: {path} is not a checkpoint of this train.py (version {CHECKPOINT_VERSION})")
    ckpt["args"] = migrate_args(ckpt["args"])
    if args is not None and ckpt.get("kind") == "pretrained":
        raise SystemExit(f"error: {path} is a pretrained agent (weights only, no replay or optimisers): evaluate, film or "
                         "dream with it; train.py cannot resume it")  # fmt: skip
    if args is not None:
        conflicts = config_conflicts(ckpt["args"], dataclasses.asdict(args))
        if conflicts:
            raise SystemExit(f"error: checkpoint {path} was trained with another configuration:\n       " + "\n       ".join(conflicts))
    return ckpt


# Version 1 (up to commit 44a2cd4) kept every module of the agent at its top level; version 2 groups them.
V1_PREFIXES = {
    **{name: "wm." + name for name in ("encoder.", "rssm.", "decoder.", "reward_head.", "cont_head.")},
    **{name: "ac." + name for name in ("actor.", "critic.", "slow_critic.", "retnorm.")},
    "ctx_encoder.": "ctx_encoder.", "cross.": "cross.",
}


def migrate_v1(ckpt: dict) -> dict:
    """A version-1 checkpoint as version 2: the agent's keys renamed (`encoder.*` -> `wm.encoder.*`, `actor.*` ->
    `ac.actor.*`, ...), the duplicate `world_model.*` entries (a ModuleList of the same modules) dropped and
    the two-hot `bins` given to both parts. The optimiser states need no change: they are keyed by parameter
    index, and the world model's parameters come in the order of the old ModuleList (a test resumes a
    version-1 checkpoint bit-identically)."""
    agent = {}
    for key, value in ckpt["agent"].items():
        if key == "bins":
            agent["wm.bins"] = agent["ac.bins"] = value
        elif not key.startswith("world_model."):
            prefix = next((p for p in V1_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                raise SystemExit(f"error: version-1 checkpoint has an unknown agent entry {key!r}")
            agent[V1_PREFIXES[prefix] + key[len(prefix) :]] = value
    return {**ckpt, "version": 2, "agent": agent}


def flat_state(ckpt: dict) -> dict:
    """Every tensor and plain value of a checkpoint's training state by its path ("agent.wm.rssm.gru.weight",
    "optimizers.model.state.0.exp_avg", "replay.data.obs", "rng.torch", ...): what two runs must share to
    be in the same state. Left out: the args (they name the logdir) and the wall-clock counter."""
    out = {}

    def walk(x, path: str) -> None:
        nested = isinstance(x, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) or torch.is_tensor(v) for v in x)
        if isinstance(x, dict) or nested:
            for k, v in x.items() if isinstance(x, dict) else enumerate(x):
                walk(v, f"{path}.{k}" if path else str(k))
        else:
            out[path] = x

    walk({k: v for k, v in ckpt.items() if k != "args"}, "")
    out.pop("counters.seconds", None)
    return out


def state_digest(ckpt: dict) -> dict[str, str]:
    """`flat_state` as a SHA-256 digest per entry (of a tensor's dtype, shape and bytes): equal digests, equal state."""
    out = {}
    for path, value in flat_state(ckpt).items():
        if torch.is_tensor(value):
            data = f"{value.dtype} {tuple(value.shape)}".encode() + value.detach().cpu().contiguous().numpy().tobytes()
        else:
            data = json.dumps(value).encode()
        out[path] = hashlib.sha256(data).hexdigest()
    return out


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


def saved_args(logdir: str | Path) -> Args:
    """The configuration a run in `logdir` was started with (its args.json, else its checkpoint)."""
    logdir = Path(logdir)
    if (logdir / "args.json").is_file():
        try:
            return args_from_dict(json.loads((logdir / "args.json").read_text()))
        except (ValueError, TypeError, KeyError) as e:
            raise SystemExit(f"error: {logdir / 'args.json'} is not a train.py configuration ({type(e).__name__}: {e})") from None
    return args_from_dict(load_checkpoint(logdir / "ckpt.pt")["args"])


def plain_numpy_state(state: tuple) -> tuple:
    """np.random.get_state() with its key array as a list of ints (weights_only checkpoints)."""
    name, keys, pos, has_gauss, gauss = state
    return (name, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss))


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


def resolve_device(device: str) -> torch.device:
    """--device auto|cpu|cuda -> a torch device, with a clear error where CUDA is asked for but missing."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: this torch build or machine has no CUDA device (use --device auto or cpu)")
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))


def build_agent(args: Args, env: envs.ContextualDMC, device: str | torch.device = "cpu") -> Agent:
    spaces = Spaces(
        action=env.action_size,
        obs=env.obs_size if args.obs == "features" else 0,
        image=env.image_shape if args.obs == "pixels" else None,
        context=len(env.features),
    )
    return Agent(args.agent, args.rssm, spaces, args.ctx).to(device)


def load_agent(path: str | Path, device: str | torch.device = "cpu") -> tuple[Args, Agent, dict]:
    """The saved args, the trained agent (eval mode) and the raw checkpoint of a train.py run."""
    ckpt = load_checkpoint(path)  # a run directory or its ckpt.pt
    args = args_from_dict(ckpt["args"])
    env = envs.make_env(args.task, args.obs, [envs.default_context(args.task)], 0, args.action_repeat)
    agent = build_agent(args, env, device)
    env.close()
    missing, unexpected = (sorted(agent.state_dict().keys() - ckpt["agent"].keys()), sorted(ckpt["agent"].keys() - agent.state_dict().keys()))
    if missing or unexpected:
        raise SystemExit(f"error: {checkpoint_path(path)} does not fit the agent its configuration builds (written by incompatible "
                         f"code?): missing {missing[:4]}, unexpected {unexpected[:4]}")  # fmt: skip
    try:
        agent.load_state_dict(ckpt["agent"])
    except RuntimeError as e:  # shapes
        raise SystemExit(f"error: {checkpoint_path(path)} does not fit the agent its configuration builds: {str(e).splitlines()[-1].strip()}") from None
    return args, agent.eval(), ckpt


def export_agent(path: str | Path, out: str | Path) -> dict:
    """A trained agent's weights without replay, optimisers and random streams (a few MB), with its configuration,
    its counters and the code it trained on (the run's code.json, where there is one), written to `out`."""
    path = checkpoint_path(path)
    ckpt = load_checkpoint(path)
    code = path.parent / "code.json"
    made_by = {"run": str(path.parent), "code": json.loads(code.read_text()) if code.is_file() else "unknown"}
    agent = {k: v.clone() for k, v in ckpt["agent"].items()}  # not views into the full checkpoint's storage
    payload = {"version": CHECKPOINT_VERSION, "kind": "pretrained", "args": ckpt["args"], "agent": agent, "counters": ckpt["counters"], "made_by": made_by}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(Path(out), payload)
    return payload
