"""Film a trained agent acting in several contexts side by side, as an animated GIF: see where it copes
with unseen physics and where it breaks (DALI, arXiv:2508.20294, Sec. 6; e.g. a walker in low, default and
high gravity, or a ball_in_cup agent catching in low and high gravity).

    python film.py --checkpoint runs/default --contexts gravity=2.45 gravity=9.81 gravity=17.64
    python film.py --checkpoint pretrained/ball_in_cup_dali_d.pt --contexts gravity=2.45 gravity=17.64 --out runs/cup.gif

Each panel is one episode from a fresh agent state (rollout.play), filmed by the task's film camera: feature
agents in MuJoCo's default look, pixel agents in the cheap look they were trained on. The GIF plays in real
time and labels each panel with its context and return. Rendering uses MUJOCO_GL=egl unless it is set (envs.py;
no display is needed).

Shapes: T frames, N panels (contexts), S x S pixels per panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

import envs  # first of the project's modules: it sets MUJOCO_GL before dm_control is imported
from checkpoint import checkpoint_path, load_agent, resolve_device
from dali import Agent
from evaluate import writable_output
from rollout import RandomPolicy, play
from vector_env import VectorEnv


@dataclass(frozen=True)
class Args:
    """Film an agent acting in several contexts, side by side, as an animated GIF."""

    checkpoint: str
    """A train.py run directory, its checkpoint, or a pretrained agent's file."""
    contexts: tuple[str, ...] = ("gravity=2.45", "gravity=9.81", "gravity=17.64")
    """One panel per context, each as name=value[,name=value]; features not named keep their default."""
    out: str = ""
    """Output GIF (default: video.gif next to the checkpoint); folders are created."""
    size: int = 128
    """Height and width of each panel in pixels."""
    every: int = 2
    """Film every n-th policy step (the GIF plays in real time either way)."""
    seed: int = 300_000
    """Reset seed of the first panel's episode (the others: seed + 1, ...) and of the policy's samples."""
    mode: Literal["sample", "mode"] = "sample"
    """Actions sampled from the policy, or its mode."""
    camera: int = -1
    """MuJoCo camera id; -1: the task's film camera (FILM_CAMERA)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available."""
    threads: int = 1
    """torch CPU threads."""


FILM_CAMERA = {"ball_in_cup": 1}
"""Camera per task when --camera is -1, else camera 0. ball_in_cup's camera 0 looks down from above and cuts
off the top of the cup's range, where trained agents hold the caught ball; its camera 1 looks level."""


def parse_context(task: str, text: str) -> dict[str, float]:
    """ "gravity=2.45,distance=0.3" -> a full, validated context of `task` (missing features at default)."""
    context = envs.default_context(task)
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in context:
            raise SystemExit(f"error: context {text!r}: {item!r} is not name=value with a feature of {task}: {list(context)}")
        try:
            context[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"error: context {text!r}: {value!r} is not a number") from None
    try:
        return envs.validate_context(task, context)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def film(
    agent: Agent | RandomPolicy,
    task: str,
    obs: str,
    action_repeat: int,
    contexts: list[dict],
    seed: int,
    device: torch.device | str = "cpu",
    sample: bool = True,
    size: int = 128,
    every: int = 1,
    camera: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One episode per context in lockstep, filmed every `every` policy steps: frames (T, N, S, S, 3) uint8
    and the returns (N,)."""
    vec = VectorEnv([envs.make_env(task, obs, [c], seed + i, action_repeat) for i, c in enumerate(contexts)])
    cameras = [envs.Camera(env.physics, height=size, width=size, camera_id=camera) for env in vec.envs]
    frames: list[np.ndarray] = []
    seen = [0]

    def shoot() -> None:
        if seen[0] % every == 0:
            frames.append(np.stack([cam.render().copy() for cam in cameras]))  # render() reuses its buffer
        seen[0] += 1

    returns = play(agent, vec, sample, device, shoot)
    cameras.clear()  # their scenes and GL buffers go before the envs
    vec.close()
    return np.stack(frames), returns


def write_gif(frames: np.ndarray, labels: list[str], path: str, fps: float) -> None:
    """Frames (T, N, S, S, 3) as an animated GIF, the N panels side by side, each with its label."""
    from PIL import Image, ImageDraw

    images = []
    for panels in frames:
        image = Image.fromarray(np.concatenate(list(panels), 1))
        draw = ImageDraw.Draw(image)
        for i, label in enumerate(labels):
            draw.text((i * panels.shape[2] + 4, 3), label, fill=(255, 255, 255))
        images.append(image.convert("P", palette=Image.ADAPTIVE, colors=128))
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, optimize=True)


def main(args: Args) -> Path:
    """Load, film, write the GIF; prints each panel's return."""
    if args.size < 16 or args.every < 1:
        raise SystemExit(f"error: --size {args.size}, --every {args.every}: need size >= 16 and every >= 1")
    if not args.contexts:
        raise SystemExit("error: give at least one --contexts entry, e.g. gravity=9.81")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    path = checkpoint_path(args.checkpoint)
    train_args, agent, _ = load_agent(path, device)
    contexts = [parse_context(train_args.task, text) for text in args.contexts]
    out = writable_output(Path(args.out) if args.out else path.parent / "video.gif")
    camera = FILM_CAMERA.get(train_args.task, 0) if args.camera == -1 else args.camera
    n_cameras = envs.make_env(train_args.task).physics.model.ncam
    if not 0 <= camera < n_cameras:
        raise SystemExit(f"error: --camera {args.camera}: {train_args.task} has cameras 0 to {n_cameras - 1} (-1: its default)")
    torch.manual_seed(args.seed)
    frames, returns = film(agent, train_args.task, train_args.obs, train_args.action_repeat, contexts, args.seed, device,
                           args.mode == "sample", args.size, args.every, camera)  # fmt: skip
    varied = [n for n in contexts[0] if len({c[n] for c in contexts}) > 1] or list(contexts[0])[:1]
    labels = [", ".join(f"{n} {c[n]:g}" for n in varied) + f": {r:.0f}" for c, r in zip(contexts, returns)]
    seconds_per_frame = envs.make_env(train_args.task).control_timestep * train_args.action_repeat * args.every
    write_gif(frames, labels, str(out), 1 / seconds_per_frame)
    print(f"{len(frames)} frames, returns " + ", ".join(labels) + f" -> {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
