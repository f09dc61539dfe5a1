"""How a training run stops on a signal: the first SIGINT or SIGTERM (Ctrl-C, or what SLURM sends before it
kills a job) asks train.py's loop to checkpoint after its current step and exit; a second one exits at once.
Not part of the paper: the machinery that lets a run be interrupted and resumed exactly (docs/training.md).
"""

from __future__ import annotations

import os
import signal
import sys


class StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks the loop to checkpoint after the current step and exit;
    a second one exits at once (the last checkpoint stays as it was).

    Python runs a handler between bytecodes, once for any number of signals of one kind that arrived during
    a long C call (a torch op): two signals milliseconds apart would count as one. So deliveries are counted
    where they happen, in the C-level handler, which writes one byte per delivery to the wakeup fd. Two
    signals the kernel merges (sent before the process ran at all in between) are still one."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.count = 0, 0
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._previous_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self.previous = {s: signal.signal(s, self) for s in self.SIGNALS}

    def deliveries(self) -> int:
        """SIGINT and SIGTERM deliveries since the last call (bytes of the wakeup fd)."""
        try:
            data = os.read(self._read, 4096)
        except BlockingIOError:
            return 0
        return sum(b in self.SIGNALS for b in data)

    def __call__(self, signum, frame) -> None:
        self.count += max(1, self.deliveries())  # this call stands for at least one delivery
        if self.count > 1:
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after the current step, then exiting "
              "(send it again to exit at once without saving)", file=sys.stderr, flush=True)  # fmt: skip

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._previous_wakeup)
        os.close(self._read)
        os.close(self._write)
