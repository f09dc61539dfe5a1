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

Which came first matters, and handlers cannot tell: a supervisor that is not scheduled until both the job's
SIGTERM and the runner's death (USR1) reached it would see them in signal-number order, USR1 first, and
forward a second SIGTERM. So the supervisor blocks these signals and takes them one at a time from the
kernel's pending set (sigtimedwait); a USR1 with a SIGTERM or SIGINT pending beside it is one stop of the
whole job, not a request to forward. A job stop that lands after the supervisor's last look and before it
forks the child reaches the supervisor alone; the child finds it in the supervisor's pending set before
exec and does not start.

Exit status: the child's; 128 + N when a signal N ended it (as a shell reports it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
STOPS = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}  # blocked, and taken by sigtimedwait
GROUP_STOPS = {signal.SIGTERM, signal.SIGINT}  # the child got these too


def pending_in(pid: int) -> set[int]:
    """The signals pending for process `pid`, for its main thread or the whole process (from /proc)."""
    mask = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(line.split()[1], 16)
    return {s for s in signal.Signals if mask >> (s - 1) & 1}


class Supervisor:
    """One child, and at most one SIGTERM forwarded to it."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.stopped = False  # a stop was forwarded, or the child was signalled with the rest of the group

    def take(self, signum: int) -> None:
        """Act on one stop signal taken from the pending set."""
        job_stop = signum in GROUP_STOPS or bool(signal.sigpending() & GROUP_STOPS)
        if not self.stopped and not job_stop:
            self.child.send_signal(signal.SIGTERM)
        self.stopped = True

    def run(self, runner_pid: int, argv: list[str]) -> int:
        libc = ctypes.CDLL(None)
        signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1))
        if os.getppid() != runner_pid or signal.sigpending() & STOPS:  # the runner died before prctl, or
            return 128 + signal.SIGTERM  # a stop came before the child exists: start none

        supervisor = os.getpid()

        def child_setup() -> None:  # in the child, before exec
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))  # fires once: the supervisor is single-threaded
            # A job stop that reached the supervisor after the check above but before the fork never reached
            # this child, and the supervisor will not forward it: start nothing. (One after the fork is
            # pending here too; ending now is the same stop.)
            if os.getppid() != supervisor or pending_in(supervisor) & GROUP_STOPS:
                os._exit(128 + signal.SIGTERM)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)

        self.child = subprocess.Popen([sys.executable, *argv], preexec_fn=child_setup, close_fds=False)
        while self.child.poll() is None:
            info = signal.sigtimedwait(STOPS, 0.2)
            if info is not None:
                self.take(info.si_signo)
        rc = self.child.returncode
        return rc if rc >= 0 else 128 - rc


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit("usage: python -m supervisor RUNNER_PID SCRIPT [ARGS...]")
    return Supervisor().run(int(argv[0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
