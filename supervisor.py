"""The process between a study's runner and each train.py / evaluate.py it starts (sweep.py, docs/studies.md).

    python -m supervisor RUNNER_PID SCRIPT [ARGS...]     # runs `python SCRIPT ARGS...` as its one child

Its contract: the child gets exactly one SIGTERM, however the runner ends (it asks for a stop, it is
killed, it is preempted), and none while the runner lives and asks for nothing. train.py checkpoints after
its current step on a first SIGTERM and exits at once, unsaved, on a second, so a double signal loses the
work since the last periodic checkpoint.

Why a process of its own: PR_SET_PDEATHSIG on the child alone would not do, since the kernel sends the
parent-death signal when the thread that forked the child exits, and at every reparenting after that, so a
child of a multi-threaded runner (the local executor's worker threads) could get several. The supervisor
is single-threaded, so the child's parent-death signal fires once, when the supervisor dies.

Signals it takes:
- USR1: a stop request, from the runner (RunJob.stop) or from the kernel when the runner dies (the
  supervisor's own parent-death signal): forwarded to the child as SIGTERM, the first time only.
- SIGTERM, SIGINT: sent to the whole process group or job (Ctrl-C, SLURM at a time limit), so the child has
  it already: not forwarded. Once one of these or a USR1 came, later ones are not forwarded either.
- USR2: SLURM's warning before a time limit, for submitit's handler in the runner only: ignored here and,
  by inheritance, in the child.

Exit status: the child's; 128 + N when a signal N ended it (as a shell reports it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


class Supervisor:
    """One child, and at most one SIGTERM forwarded to it."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.forwarded = False  # a stop was forwarded, or the child was signalled with the rest of the group

    def on_signal(self, signum: int, frame) -> None:
        if self.child is None:  # asked to stop before the child exists: start none
            os._exit(128 + signal.SIGTERM)
        if not self.forwarded and signum == signal.SIGUSR1:
            self.child.send_signal(signal.SIGTERM)
        self.forwarded = True

    def run(self, runner_pid: int, argv: list[str]) -> int:
        libc = ctypes.CDLL(None)
        for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.on_signal)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1))
        if os.getppid() != runner_pid:  # the runner died before prctl: no USR1 will come
            return 128 + signal.SIGTERM

        def child_setup() -> None:  # in the child, before exec
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))  # fires once: the supervisor is single-threaded
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.child = subprocess.Popen([sys.executable, *argv], preexec_fn=child_setup, close_fds=False)
        rc = self.child.wait()
        return rc if rc >= 0 else 128 - rc


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit("usage: python -m supervisor RUNNER_PID SCRIPT [ARGS...]")
    return Supervisor().run(int(argv[0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
