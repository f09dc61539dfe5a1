"""The code a run or a study is made with: the git commit of this checkout and whether its tree was dirty.

    {"commit": "44a2cd4e...", "dirty": false, "diff": null}       # a clean checkout
    {"commit": "44a2cd4e...", "dirty": true, "diff": "3f9c01a2"}  # uncommitted changes; diff: a hash of them
    {"commit": "unknown", "dirty": null, "diff": null}            # no git, or not a git checkout (a tarball)

train.py appends one such record per launch to its logdir's code.json (beside args.json, which
`--resume` compares field by field, so the code never makes a resume fail) and prints a note when a run
resumes under other code; sweep.py records it in study.json and each run's code.json, and `sweep.py
status` flags runs of mixed code. Dirty means tracked files differ from the commit or untracked .py files
exist; other untracked files are not counted, since a study's outputs may live inside the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
UNKNOWN = {"commit": "unknown", "dirty": None, "diff": None}


def _git(*args: str) -> str:
    # --no-optional-locks: never take the index lock, so that runs starting together do not contend for it
    cmd = ["git", "--no-optional-locks", "-C", str(REPO), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def code_version() -> dict:
    """This checkout's commit, whether tracked files differ from it, and a hash of the difference."""
    try:
        if Path(_git("rev-parse", "--show-toplevel")).resolve() != REPO:
            return dict(UNKNOWN)  # the code is not tracked by git, though some folder above it is
        commit = _git("rev-parse", "HEAD")
        diff = _git("diff", "HEAD", "--no-ext-diff", "--binary")
        untracked = _git("ls-files", "--others", "--exclude-standard", "-z", "--", "*.py").split("\0")
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, a repository without commits
        return dict(UNKNOWN)
    digest = hashlib.sha256(diff.encode())
    for name in filter(None, untracked):
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    dirty = bool(diff) or any(untracked)
    return {"commit": commit, "dirty": dirty, "diff": digest.hexdigest()[:8] if dirty else None}


def describe(code: dict) -> str:
    """'44a2cd4', '44a2cd4-dirty.3f9c01a2' or 'unknown'."""
    if code.get("commit", "unknown") == "unknown":
        return "unknown"
    return code["commit"][:7] + (f"-dirty.{code['diff']}" if code.get("dirty") else "")


def same_code(a: dict, b: dict) -> bool:
    return describe(a) == describe(b)


def read_launches(path: Path) -> list[dict]:
    """The launch records of a code.json; [] when there is none (or it is unreadable)."""
    try:
        launches = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return launches if isinstance(launches, list) else []


def append_launch(path: Path, record: dict, fresh: bool = False) -> tuple[list[dict], dict]:
    """Add one launch record (this code, the time, `record`) to the code.json at `path`, atomically; `fresh`
    starts a new list. Returns the records before it, and it."""
    before = [] if fresh else read_launches(path)
    entry = {**code_version(), **record, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps([*before, entry], indent=1) + "\n")
    os.replace(tmp, path)
    return before, entry


def record_launch(logdir: Path, env_steps: int) -> str | None:
    """train.py: record this launch in logdir/code.json (a fresh run starts a new list); returns a note to
    log when the run resumes under code other than its last launch's."""
    path = Path(logdir) / "code.json"
    before, now = append_launch(path, {"env_steps": env_steps}, fresh=env_steps == 0)
    if before and not same_code(before[-1], now):
        return (f"note: resuming at {env_steps} env steps under code {describe(now)}; this run was trained so far under "
                f"{describe(before[-1])} (every launch's code: {path})")  # fmt: skip
    return None
