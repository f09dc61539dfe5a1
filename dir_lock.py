"""Exclusive locks on a directory, each naming its holder: one `sweep.py run` works in a study directory at a
time (sweep.lock), one train.py in a logdir (train.lock).

    fd = dir_lock.acquire(logdir / "train.lock")   # DirLocked (naming the holder) if another process holds it
    ...                                           # held until fd is closed or the process ends, however it ends

A lock is an flock on a file in the directory; the holder writes a line into it (pid, host, start time,
command) that the refused process prints. The kernel releases the lock when its process dies (kill -9
included), so a stale lock never needs deleting. The fd is not inherited by child processes (Python opens
files non-inheritable), so children do not keep a lock alive.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import socket
import sys
import time
from pathlib import Path


class DirLocked(Exception):
    """Another process holds the lock; the message is its holder line."""


def holder() -> str:
    """This process, as a lock's holder line names it: pid, host, start time, command."""
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join([sys.executable, *sys.argv])}"


def read_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "a process that has not written its name yet"
    except OSError:
        return "a process that has not written its name yet"


def acquire(path: Path, wait: bool = False) -> int:
    """flock `path` (created, with its folder) and write this process's holder line into it; return the fd,
    which holds the lock until it is closed. Held by another process: without `wait`, DirLocked naming the
    holder; with `wait`, print whom it waits for and block until the lock is free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)
            raise DirLocked(read_holder(path)) from None
        print(f"waiting for {path}, held by {read_holder(path)}", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder()}\n".encode(), 0)
    return fd
