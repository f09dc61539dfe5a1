"""The logs of a training run (train.py): one line per log step on stdout, the same metrics as JSON lines
in metrics.jsonl and as TensorBoard scalars; and the rule that two runs' logs never mix in one logdir.

    logger = Logger(logdir, env_steps)   # appends; a resumed run drops TensorBoard events after env_steps
    logger.add({"wm/loss": tensor, ...}) # per update; averaged (and synced to the host) only at write
    logger.write(env_steps, progress)    # {"step": ..., "wm/loss": ...} per line of metrics.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


class Logger:
    """stdout line + metrics.jsonl + TensorBoard; metric tensors are averaged and synced only here."""

    def __init__(self, logdir: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir), purge_step=step or None)  # a resumed run drops events after its checkpoint
        self.file = open(logdir / "metrics.jsonl", "a")
        self.pending: dict[str, list] = {}

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.pending.setdefault(k, []).append(v)

    def write(self, step: int, progress: tqdm | None) -> None:
        row = {"step": step}
        for k, vs in sorted(self.pending.items()):
            row[k] = float(torch.stack(vs).float().mean()) if torch.is_tensor(vs[0]) else float(np.mean(vs))
            self.writer.add_scalar(k, row[k], step)
        self.pending.clear()
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        keys = ["episode/return", "eval/return", "wm/loss", "ac/return", "perf/fps", "perf/updates"]
        line = f"step {step:>8d} | " + " | ".join(f"{k} {row[k]:.3g}" for k in keys if k in row)
        (progress.write if progress is not None else print)(line)

    def close(self) -> None:
        self.writer.close()
        self.file.close()


def prepare_logdir(logdir: Path, ckpt: dict | None) -> None:
    """Never mix two runs' logs: a fresh run needs a logdir without logs; a resumed one drops the metric lines
    and TensorBoard events written after its checkpoint (the resumed run writes them again)."""
    logs = [p for p in (logdir / "metrics.jsonl", logdir / "ckpt.pt") if p.exists()] + list(logdir.glob("events.out.tfevents.*"))
    if ckpt is None and logs:
        what = "a checkpoint; pass --resume to continue it" if (logdir / "ckpt.pt").exists() else "logs of a run that saved no checkpoint; delete them"
        raise SystemExit(f"error: {logdir} holds {what}, or choose another --logdir")
    if ckpt is not None and (logdir / "metrics.jsonl").exists():
        step = ckpt["counters"]["env_steps"]
        lines = (logdir / "metrics.jsonl").read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        (logdir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
