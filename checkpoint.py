"""A training run's checkpoints: saving and loading ckpt.pt (older versions migrated, the run's configuration
checked against the one asked for on --resume), and rebuilding a trained agent from one.

It sits below train.py, evaluate.py and counterfactual.py, so that evaluating a checkpoint never imports
the training script; the configuration it stores is config.py's `Args`. A checkpoint is one dict of tensors
and plain Python types (version, args, agent, optimizers, replay, counters, RNG states, and the acting state
of a checkpoint taken mid-episode); it is loaded with torch.load(weights_only=True), so a shared checkpoint
cannot run code on load. A pretrained agent (`export_agent`) is the same dict with the agent's weights alone:
evaluate.py, film.py and counterfactual.py load it like a checkpoint; train.py cannot resume it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path

import torch

import envs
from config import Args, args_from_dict, config_conflicts, migrate_args
from dali import Agent, Spaces

CHECKPOINT_VERSION = 2  # 2: the agent's world model and actor-critic are submodules `wm` and `ac`


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
