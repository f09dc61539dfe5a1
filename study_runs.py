"""What a study runs (the DALI protocol, arXiv:2508.20294, Sec. 6): its configuration (`Study`), one run per
method x seed (`RunSpec`), and the work of one run (`RunJob`: train or resume, evaluate zero-shot, mark
done), which both executors of study_executors.py call. sweep.py is the command line.

A run lives in its own directory, DIR/<method>_s<seed>:

    train/                   the train.py logdir (args.json, code.json, metrics.jsonl, TensorBoard events, ckpt.pt)
    train.log, eval.log      the output of every train.py / evaluate.py launch, appended, each after a header
                             line with the time, host, SLURM job and code
    code.json                the code (code_version.py) of every train.py and evaluate.py launch of the run
    trained                  written when train.py has reached --steps
    zeroshot_<setting>.jsonl `evaluate.py run` on the setting's grid (written atomically by evaluate.py)
    done                     written last, once the results file is complete
    failed                   the last attempt's error, removed when the run is tried again
    lock                     flock-ed while a process works on the run (its holder written inside)
    job                      the run's SLURM job id (SLURM executor)

Every train.py and evaluate.py runs under `python -m supervisor` (supervisor.py), so that it gets exactly
one SIGTERM however the runner ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import submitit

import code_version
import envs

REPO = Path(__file__).resolve().parent

# The methods of the README's table: name -> (--context, --integration)
METHODS: dict[str, tuple[str, str]] = {
    "Dreamer-DR": ("none", "shallow"),  # context-unaware; integration is ignored
    "DALI-S": ("learned", "shallow"),
    "DALI-D": ("learned", "deep"),
    "cRSSM-S": ("oracle", "shallow"),
    "cRSSM-D": ("oracle", "deep"),
}
Method = Literal["Dreamer-DR", "DALI-S", "DALI-D", "cRSSM-S", "cRSSM-D"]

# train.py flags a study sets for every run (--threads comes from the executor)
STUDY_FLAGS = ("--task", "--obs", "--contexts", "--context", "--integration", "--seed", "--steps", "--logdir", "--resume", "--threads")


@dataclass(frozen=True)
class Study:
    """What a study runs: every method x seed, trained on one task and context setting, evaluated zero-shot."""

    task: envs.Task = "ball_in_cup"
    """Contextual DMC task."""
    obs: envs.ObsKind = "features"
    """Observation of every run."""
    setting: envs.Setting = "single_0"
    """Training contexts of every run (train.py --contexts) and the zero-shot evaluation grid."""
    methods: tuple[Method, ...] = ("Dreamer-DR", "DALI-S")
    """Methods, as named in the README's table."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds; each method runs once per seed."""
    steps: int = 200_000
    """Env steps each run trains for (train.py --steps; it rounds up to whole episodes: 4,000 env steps with 4 envs)."""
    eval_episodes: int = 10
    """Zero-shot episodes per context of the evaluation grid (evaluate.py run --episodes)."""
    train_flags: str = ""
    """Further train.py flags for every run, one shell-quoted string: --train-flags "--size xs --train-ratio 256"."""
    dir: str = "runs/studies/bic_gravity"
    """Study directory: study.json, one directory per run, the aggregate table and figure."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: a method and a seed, in its own directory."""

    study: Study
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_s{self.seed}"

    @property
    def dir(self) -> Path:
        return Path(self.study.dir) / self.name

    @property
    def logdir(self) -> Path:
        return self.dir / "train"

    @property
    def results(self) -> Path:
        return self.dir / f"zeroshot_{self.study.setting}.jsonl"

    def marker(self, name: Literal["trained", "done", "failed", "lock", "job", "code.json"]) -> Path:
        return self.dir / name

    def train_command(self, threads: int, resume: bool) -> list[str]:
        # The full configuration also on --resume: train.py accepts flags equal to the saved ones.
        context, integration = METHODS[self.method]
        s = self.study
        return [str(REPO / "train.py"), *shlex.split(s.train_flags), "--task", s.task, "--obs", s.obs, "--contexts", s.setting,
                "--context", context, "--integration", integration, "--seed", str(self.seed), "--steps", str(s.steps),
                "--logdir", str(self.logdir), "--threads", str(threads), "--no-progress", *(["--resume"] if resume else [])]  # fmt: skip

    def eval_command(self, threads: int) -> list[str]:
        return [str(REPO / "evaluate.py"), "run", "--checkpoint", str(self.logdir / "ckpt.pt"), "--setting", self.study.setting,
                "--episodes", str(self.study.eval_episodes), "--out", str(self.results), "--threads", str(threads), "--no-progress"]  # fmt: skip


def expand(study: Study) -> list[RunSpec]:
    """The study's runs, seeds outer, methods inner: with two workers the first seed's methods finish
    side by side, so a paired comparison exists as early as possible."""
    return [RunSpec(study, m, s) for s in study.seeds for m in study.methods]


class RunFailed(Exception):
    """A run's train.py or evaluate.py failed, or the run was stopped; the message says which and where."""


class RunJob(submitit.helpers.Checkpointable):
    """Train (or resume), evaluate, mark done: one run. The local executor locks it (`try_lock`) and calls
    `work`; a SLURM job calls the RunJob itself, which waits for the lock first.

    submitit calls `checkpoint` when SLURM announces the end of the job (USR2); it stops train.py
    gracefully and hands back this same callable, which the requeued job calls again: it resumes."""

    def __init__(self, run: RunSpec, threads: int = 1, grace_s: float = 240.0):
        self.run, self.threads, self.grace_s = run, threads, grace_s
        self._child: subprocess.Popen | None = None
        self._stopping = 0  # the signal this runner was asked to stop with
        self._lock_fd = -1

    def __getstate__(self) -> dict:  # pickled for SLURM: the spec, never the live process
        return {"run": self.run, "threads": self.threads, "grace_s": self.grace_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __call__(self) -> str:
        """The SLURM job: wait while another process works on the run (e.g. a killed job's train.py still
        checkpointing), then work on it."""
        told = False
        while not self.try_lock():
            if not told:
                print(f"{self.run.name}: another process works on this run ({self.holder()}); waiting", flush=True)
                told = True
            time.sleep(2)
        return self.work()

    def try_lock(self) -> bool:
        """Lock the run for this process unless another holds it; the holder is written into the lock file."""
        self.run.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run.marker("lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        # its train.py / evaluate.py inherit the lock and may outlive this process (they checkpoint first)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, SLURM job {os.environ.get('SLURM_JOB_ID', '-')}, or a train.py it started"
        os.pwrite(fd, f"{holder}\n".encode(), 0)
        self._lock_fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.run.marker("lock").read_text().strip() or "unknown holder"
        except OSError:
            return "unknown holder"

    def work(self) -> str:
        """The run's remaining work, under its lock (released at the end, once no child holds it either)."""
        run = self.run
        assert self._lock_fd >= 0, "work() needs the run's lock"
        try:
            if run.marker("done").exists():
                return "done"
            run.marker("failed").unlink(missing_ok=True)
            try:
                if not run.marker("trained").exists():
                    resume = (run.logdir / "ckpt.pt").exists()
                    if not resume and run.logdir.exists():
                        shutil.rmtree(run.logdir)  # killed before its first checkpoint: nothing to resume
                    self._launch(run.train_command(self.threads, resume), run.dir / "train.log", "train.py")
                    run.marker("trained").touch()
                self._launch(run.eval_command(self.threads), run.dir / "eval.log", "evaluate.py run")
                if not run.results.is_file():
                    raise RunFailed(f"evaluate.py exited cleanly but wrote no {run.results}")
                write_atomic(run.marker("done"), json.dumps({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname()}))
            except RunFailed as e:
                if not self._stopping:  # a stop that was asked for is no failure: the run resumes next time
                    write_atomic(run.marker("failed"), f"{e}\n")
                raise
            return "done"
        finally:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _launch(self, cmd: list[str], log: Path, what: str) -> None:
        """Run `python cmd` to its end, output appended to `log`; RunFailed unless it exits with 0."""
        if self._stopping:
            raise RunFailed(f"{what} not started: the study was stopped")
        job = os.environ.get("SLURM_JOB_ID")
        host, now = socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S")
        _, code = code_version.append_launch(self.run.marker("code.json"), {"what": what.split()[0], "host": host, "job": job})
        with open(log, "a") as f:
            where = f"{host}{f' (SLURM job {job})' if job else ''}"
            f.write(f"\n# {now} on {where}, code {code_version.describe(code)}\n$ python {shlex.join(cmd)}\n")
            f.flush()
            child = subprocess.Popen(
                [sys.executable, "-m", "supervisor", str(os.getpid()), *cmd],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                start_new_session=True,  # Ctrl-C reaches the sweep alone, which asks for one SIGTERM
                pass_fds=(self._lock_fd,),  # the run stays locked while the child lives
            )  # fmt: skip
        self._child = child
        while child.poll() is None:  # poll, not wait(): submitit's USR2 handler (checkpoint) may run meanwhile
            time.sleep(0.5)
        self._child = None
        rc = child.returncode
        if rc == 0:
            return
        signalled = rc < 0 or rc > 128  # the supervisor passes on 128 + the signal that ended the child
        if signalled and not self._stopping and job:
            # SLURM terminates every process of a job it preempts or cancels: the USR2 handler (requeue) or
            # SLURM's SIGKILL follows; this job ends with either, and a later attempt resumes.
            time.sleep(self.grace_s + 120)
        how = f"was stopped (status {rc})" if signalled else f"failed with status {rc}"
        raise RunFailed(f"{what} {how}; its output: {log}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Start nothing more, and stop the running child: SIGTERM (train.py checkpoints first) or SIGKILL."""
        self._stopping = sig
        child = self._child
        if child is not None:
            try:  # SIGTERM goes through the supervisor, which sends it once
                os.killpg(child.pid, sig) if sig == signal.SIGKILL else os.kill(child.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit, on SLURM's USR2: let train.py checkpoint and exit, then requeue this callable."""
        child = self._child
        if child is not None:
            self.stop(signal.SIGTERM)
            if not _wait_exit(child.pid, self.grace_s):
                self.stop(signal.SIGKILL)  # the last periodic checkpoint stays: resuming is exact too
                _wait_exit(child.pid, 10)
        return super().checkpoint(*args, **kwargs)


def _wait_exit(pid: int, timeout: float) -> bool:
    """Reap child `pid` within `timeout` s (os.waitpid: Popen.poll may be mid-call in the interrupted frame)."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:
            return True
        time.sleep(0.2)
    return False


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
