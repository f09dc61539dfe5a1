"""Studies: every method x seed of one task and context setting, trained, evaluated zero-shot and aggregated,
locally or on a SLURM cluster, surviving interruption (the DALI protocol, arXiv:2508.20294, Sec. 6).

    python sweep.py run --study bic_gravity                                    # the reduced protocol, this machine
    python sweep.py run --study bic_gravity --executor local --steps 3000 --seeds 0 1 --dir runs/try
    python sweep.py run --study bic_gravity --executor slurm --partition cpu --time-min 240 --account me
    python sweep.py status runs/studies/bic_gravity                          # or the study's name
    python sweep.py aggregate runs/studies/bic_gravity

A study (`Study`) expands into runs, one per (method, seed), each in its own directory DIR/<method>_s<seed>:

    train/                   the train.py logdir (args.json, metrics.jsonl, TensorBoard events, ckpt.pt)
    train.log, eval.log      the output of every train.py / evaluate.py launch, appended
    trained                  written when train.py has reached --steps
    zeroshot_<setting>.jsonl `evaluate.py run` on the setting's grid (written atomically by evaluate.py)
    done                     written last, once the results file is complete
    failed                   the last attempt's error, removed when the run is tried again
    lock                     flock-ed while a process works on the run

DIR/study.json records the study's configuration, and a different configuration in the same directory is
refused, listing the differing fields: runs of two configurations are never mixed, nor overwritten.
Running the same command again skips finished runs and resumes the others from their checkpoints
(`train.py --resume` is exact), so a study survives a stopped machine, a killed process or a preempted
job. At the end, and on demand (`status`, `aggregate`), it prints a status table and aggregates the
finished runs with `evaluate.py aggregate` into DIR/zeroshot_<setting>.{json,png,txt}.

Executors, both built on an engine rather than a scheduler of our own:
- local: a `concurrent.futures.ThreadPoolExecutor` of --workers threads. The work happens in child
  processes (train.py, then evaluate.py, each with --threads), so a thread per run is all the worker
  needs; a run that crashes or is killed fails alone (one dead worker of a ProcessPoolExecutor breaks the
  whole pool). submitit's LocalExecutor starts every job at once, with no limit on how many run in parallel.
- slurm: one SLURM job per run through submitit. SLURM warns a job before its time limit with USR2
  (submitit's --signal=USR2@signal_delay_s); submitit then calls `RunJob.checkpoint`, which asks train.py to
  checkpoint (SIGTERM: it saves at the next episode boundary), and requeues the job, which resumes.

A small supervisor process (`python -m supervisor`, supervisor.py) stands between a runner and each
train.py / evaluate.py, so that the child gets exactly one SIGTERM (train.py checkpoints on it) however the
runner ends: stopped, killed or preempted.
"""

from __future__ import annotations

import dataclasses
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Union

import submitit
import tyro

import envs

REPO = Path(__file__).resolve().parent
STUDY_VERSION = 1

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


# Studies that ship with the code; any field can be overridden on the command line (--seeds 0 1 --steps ...).
STUDIES: dict[str, Study] = {
    # The reduced protocol: ball_in_cup with gravity varying, DALI-S against Dreamer-DR, 3 seeds
    "bic_gravity": Study(),
    # The same with every method of the table
    "bic_gravity_all": Study(methods=tuple(METHODS), dir="runs/studies/bic_gravity_all"),  # type: ignore[arg-type]
    # The README's main job as a study: walker, gravity x actuator strength varying, every method, 5 seeds
    "walker_double_box": Study(
        task="walker", setting="double_box", methods=tuple(METHODS), seeds=(0, 1, 2, 3, 4), steps=500_000,  # type: ignore[arg-type]
        dir="runs/studies/walker_double_box",
    ),
}


@dataclass(frozen=True)
class Executor:
    """Where and how the runs execute (not part of the study: one study may move between executors)."""

    executor: Literal["local", "slurm"] = "local"
    """local: worker threads on this machine, each running one run's processes; slurm: one job per run (submitit)."""
    workers: int = 0
    """local: runs in parallel (0: one per core divided by --threads). Two 1-thread runs beat one 2-thread
    run on a small CPU: torch threads spin-wait when cores are shared (docs/speed.md)."""
    threads: int = 1
    """torch threads of each run's train.py and evaluate.py."""
    partition: str = ""
    """slurm: partition (empty: the cluster's default)."""
    time_min: int = 24 * 60
    """slurm: time limit per job, in minutes; a job that reaches it is requeued and resumes from its checkpoint."""
    cpus_per_job: int = 0
    """slurm: CPUs per job (0: --threads)."""
    gpus_per_job: int = 0
    """slurm: GPUs per job (train.py's --device auto then trains on CUDA)."""
    mem_gb: float = 0.0
    """slurm: memory per job in GB (0: the cluster's default)."""
    account: str = ""
    """slurm: account to charge (empty: the user's default)."""
    signal_delay_s: int = 180
    """slurm: seconds between the USR2 warning and the time limit; train.py checkpoints within them."""
    max_requeues: int = 100
    """slurm: times a job may hit its time limit and be requeued (submitit's max_num_timeout)."""
    wait: bool = True
    """slurm: wait for the jobs, then print the status and aggregate (--no-wait: submit and return)."""


@dataclass(frozen=True)
class RunCommand:
    """Run a study: train, evaluate and aggregate every (method, seed) not finished yet."""

    study: str = "bic_gravity"
    """Named study whose fields are the defaults of the flags below: bic_gravity (the reduced protocol),
    bic_gravity_all (every method), walker_double_box."""
    config: Annotated[Study, tyro.conf.OmitArgPrefixes] = field(default_factory=Study)
    how: Annotated[Executor, tyro.conf.OmitArgPrefixes] = field(default_factory=Executor)


@dataclass(frozen=True)
class StatusCommand:
    """Print a study's status table: run, state, env steps, last evaluation return, hours."""

    dir: tyro.conf.Positional[str]
    """Study directory (or the name of a shipped study, for its default directory)."""


@dataclass(frozen=True)
class AggregateCommand:
    """Aggregate a study's finished runs (evaluate.py aggregate): table, JSON and figure in its directory."""

    dir: tyro.conf.Positional[str]
    """Study directory (or the name of a shipped study, for its default directory)."""


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------


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

    def marker(self, name: Literal["trained", "done", "failed", "lock", "job"]) -> Path:
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
    """Train (or resume), evaluate, mark done: one run, callable by both executors.

    submitit calls `checkpoint` when SLURM announces the end of the job (USR2); it stops train.py
    gracefully and hands back this same callable, which the requeued job calls again: it resumes."""

    def __init__(self, run: RunSpec, threads: int = 1, grace_s: float = 120.0):
        self.run, self.threads, self.grace_s = run, threads, grace_s
        self._child: subprocess.Popen | None = None
        self._stopping = 0  # the signal this runner was asked to stop with
        self._lock_fd = -1

    def __getstate__(self) -> dict:  # pickled for SLURM: the spec, never the live process
        return {"run": self.run, "threads": self.threads, "grace_s": self.grace_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __call__(self) -> str:
        run = self.run
        run.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(run.marker("lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire_lock()
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
                _write_atomic(run.marker("done"), json.dumps({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname()}))
            except RunFailed as e:
                if not self._stopping:  # a stop that was asked for is no failure: the run resumes next time
                    _write_atomic(run.marker("failed"), f"{e}\n")
                raise
            return "done"
        finally:
            os.close(self._lock_fd)  # releases the flock once no child holds the fd either

    def _acquire_lock(self) -> None:
        """Wait while another process works on this run (e.g. a child of a killed sweep still checkpointing)."""
        told = False
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self._stopping:
                    raise RunFailed("stopped while waiting for another process to release the run") from None
                if not told:
                    print(f"{self.run.name}: another process works on this run ({self.run.marker('lock')}); waiting", flush=True)
                    told = True
                time.sleep(2)
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"pid {os.getpid()} on {socket.gethostname()} job {os.environ.get('SLURM_JOB_ID', '-')}\n".encode(), 0)

    def _launch(self, cmd: list[str], log: Path, what: str) -> None:
        """Run `python cmd` to its end, output appended to `log`; RunFailed unless it exits with 0."""
        if self._stopping:
            raise RunFailed(f"{what} not started: the study was stopped")
        with open(log, "a") as f:
            job = f" (SLURM job {os.environ['SLURM_JOB_ID']})" if "SLURM_JOB_ID" in os.environ else ""
            f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}{job}\n$ python {shlex.join(cmd)}\n")
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
        if signalled and not self._stopping and os.environ.get("SLURM_JOB_ID"):
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Checks before anything is launched
# ----------------------------------------------------------------------------------------------------


def check_study(study: Study, how: Executor) -> None:
    """Reject a study or executor that cannot work, naming every bad value, before anything is written."""
    problems = []
    for m in study.methods:
        if m not in METHODS:
            problems.append(f"--methods: unknown method {m!r}; choose from {list(METHODS)}")
    for name, values in (("methods", study.methods), ("seeds", study.seeds)):
        if not values:
            problems.append(f"--{name}: give at least one")
        if len(set(values)) < len(values):
            problems.append(f"--{name} {' '.join(map(str, values))}: each may appear once")
    if study.task not in envs.TASKS:
        problems.append(f"--task {study.task!r}: unknown; choose from {list(envs.TASKS)}")
    elif study.setting not in envs.SETTINGS:
        problems.append(f"--setting {study.setting!r}: unknown; choose from {list(envs.SETTINGS)}")
    else:
        try:
            envs.eval_contexts(study.task, study.setting)
        except ValueError as e:
            problems.append(f"--setting {study.setting!r}: task {study.task} has no such setting ({e})")
        oracle = [m for m in study.methods if METHODS.get(m, ("",))[0] == "oracle"]
        if oracle and study.setting == "default":
            problems.append(f"--methods {' '.join(oracle)} with --setting default: the true context never changes, so it carries no information")
    if study.steps < 1 or study.eval_episodes < 1:
        problems.append(f"--steps {study.steps}, --eval-episodes {study.eval_episodes}: both must be >= 1")
    try:
        flags = shlex.split(study.train_flags)
    except ValueError as e:
        flags = []
        problems.append(f"--train-flags {study.train_flags!r}: not a shell-quoted string ({e})")
    owned = sorted({f.split("=")[0] for f in flags} & set(STUDY_FLAGS))
    if owned:
        problems.append(f"--train-flags sets {', '.join(owned)}: the study sets these for every run (use the study's own flags)")
    if how.workers < 0 or how.threads < 1 or how.cpus_per_job < 0 or how.gpus_per_job < 0:
        problems.append(f"--workers {how.workers}, --threads {how.threads}, --cpus-per-job {how.cpus_per_job}, --gpus-per-job "
                        f"{how.gpus_per_job}: --threads must be >= 1, the others >= 0")  # fmt: skip
    if how.executor == "slurm":
        missing = [tool for tool in ("sbatch", "srun", "squeue", "scontrol") if shutil.which(tool) is None]
        if missing:
            problems.append(f"--executor slurm: {', '.join(missing)} not on the PATH (run from a SLURM login node; on this machine "
                            "`bash benchmarks/slurm_local.sh start` starts a one-node SLURM)")  # fmt: skip
        if how.time_min < 1 or how.signal_delay_s < 30 or how.signal_delay_s >= how.time_min * 60:
            problems.append(f"--time-min {how.time_min}, --signal-delay-s {how.signal_delay_s}: need --time-min >= 1 and "
                            "30 <= --signal-delay-s < the time limit")  # fmt: skip
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))


def check_train_flags(study: Study, threads: int) -> None:
    """Parse each method's train.py command line as train.py would, so a typo fails before any launch."""
    import train  # here: it imports torch, which `status` and `aggregate` never need

    for method in study.methods:
        argv = RunSpec(study, method, study.seeds[0]).train_command(threads, resume=False)[1:]
        try:
            train.check_args(train.cli(argv))
        except SystemExit as e:
            raise SystemExit(f"{e.code if isinstance(e.code, str) else ''}\nerror: train.py rejects the flags of {method}: "
                             f"--train-flags {study.train_flags!r}") from None  # fmt: skip


def study_record(study: Study) -> dict:
    """What study.json holds: every field but the directory (a study may be moved)."""
    d = dataclasses.asdict(study)
    d.pop("dir")
    d["train_flags"] = shlex.split(study.train_flags)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def check_dir(study: Study) -> None:
    """Refuse a directory that holds another study's configuration (listing the differences) or other files."""
    root = Path(study.dir)
    path = root / "study.json"
    if path.is_file():
        here, there = study_record(study), json.loads(path.read_text()).get("study", {})
        diff = [f"{k}: {there.get(k)!r} there, {here.get(k)!r} asked" for k in sorted(here.keys() | there.keys()) if here.get(k) != there.get(k)]
        if diff:
            raise SystemExit(f"error: {root} holds a study of another configuration ({path}); it differs in\n       "
                             + "\n       ".join(diff) + "\n       A study directory holds one configuration, even for added seeds "
                             "or methods: choose another --dir.")  # fmt: skip
    elif root.exists() and any(root.iterdir()):
        raise SystemExit(f"error: {root} exists, is not empty and holds no study.json: not a study directory; choose another --dir")


def claim_dir(study: Study, name: str) -> None:
    """Record the study in its directory (after check_dir)."""
    path = Path(study.dir) / "study.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps({"version": STUDY_VERSION, "name": name, "study": study_record(study)}, indent=1) + "\n")


def load_study(where: str) -> Study:
    """The study in directory `where` (or a shipped study's default directory), from its study.json."""
    root = Path(STUDIES[where].dir if where in STUDIES and not Path(where).is_dir() else where)
    path = root / "study.json"
    if not path.is_file():
        raise SystemExit(f"error: {root} is not a study directory (no study.json); shipped studies: {list(STUDIES)}")
    d = json.loads(path.read_text())["study"]
    return Study(**{**d, "methods": tuple(d["methods"]), "seeds": tuple(d["seeds"]), "train_flags": shlex.join(d["train_flags"]), "dir": str(root)})


# ----------------------------------------------------------------------------------------------------
# Executors
# ----------------------------------------------------------------------------------------------------


def run_local(runs: list[RunSpec], how: Executor) -> None:
    """Every run on this machine, --workers at a time; Ctrl-C asks the running ones to checkpoint and exit."""
    workers = min(len(runs), how.workers or max(1, len(os.sched_getaffinity(0)) // how.threads))
    print(f"local: {len(runs)} runs, {workers} workers x {how.threads} threads", flush=True)
    jobs = [RunJob(r, how.threads) for r in runs]
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {pool.submit(job): job for job in jobs}
    try:
        for done in as_completed(futures):
            run = futures[done].run
            error = done.exception()
            print(f"{run.name}: {'FAILED: ' + str(error) if error else 'done'}", flush=True)
    except KeyboardInterrupt:
        print("\nstopping: the running runs checkpoint and exit (Ctrl-C again stops them at once)", flush=True)
        for f in futures:
            f.cancel()
        for job in jobs:
            job.stop(signal.SIGTERM)
        try:
            pool.shutdown(wait=True)
        except KeyboardInterrupt:
            for job in jobs:
                job.stop(signal.SIGKILL)
            pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)


# Job states after which SLURM runs the job no more (any other may go on: REQUEUED, PENDING, PREEMPTED before
# a requeue, ...); a job that has left squeue has ended too
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "REVOKED", "SPECIAL_EXIT"}


def slurm_active(job_ids: list[str], attempts: int = 5) -> dict[str, str]:
    """{job id: state} of the jobs SLURM may still run: queued, running, or being requeued."""
    if not job_ids:
        return {}
    for attempt in range(attempts):
        cmd = ["squeue", "--noheader", "--states=all", "--format=%i|%T", f"--jobs={','.join(job_ids)}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode == 0:
            states = dict(line.split("|", 1) for line in out.stdout.split())
            return {j: s for j, s in states.items() if s not in SLURM_ENDED}
        if "Invalid job id" in out.stderr:  # every one of them has ended and been purged
            return {}
        if attempt + 1 < attempts:
            time.sleep(2 + 5 * attempt)
    raise SystemExit(f"error: squeue fails: {out.stderr.strip()}")


def run_slurm(study: Study, runs: list[RunSpec], how: Executor) -> None:
    """One SLURM job per unfinished run through submitit; jobs still queued from an earlier call are kept."""
    previous = {r.name: r.marker("job").read_text().strip() for r in runs if r.marker("job").is_file()}
    active = slurm_active(sorted(set(previous.values())))
    executor = submitit.SlurmExecutor(folder=Path(study.dir) / "slurm", max_num_timeout=how.max_requeues)
    params: dict = dict(time=how.time_min, cpus_per_task=how.cpus_per_job or how.threads, signal_delay_s=how.signal_delay_s,
                        setup=[f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"])  # fmt: skip
    params.update({k: v for k, v in dict(partition=how.partition, account=how.account, gpus_per_node=how.gpus_per_job, mem=how.mem_gb).items() if v})
    jobs: dict[str, RunSpec] = {}
    for run in runs:
        if previous.get(run.name) in active:
            print(f"{run.name}: job {previous[run.name]} is still {active[previous[run.name]].lower()}; not submitted again", flush=True)
            jobs[previous[run.name]] = run
            continue
        executor.update_parameters(**params, job_name=f"{Path(study.dir).name}/{run.name}")
        job = executor.submit(RunJob(run, how.threads, grace_s=max(20, how.signal_delay_s - 60)))
        run.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(run.marker("job"), job.job_id + "\n")
        print(f"{run.name}: submitted job {job.job_id}", flush=True)
        jobs[job.job_id] = run
    if not how.wait:
        print(f"submitted; `python sweep.py status {study.dir}` shows progress, the same command again waits for the jobs", flush=True)
        return
    seen: dict[str, str] = {}  # the last state of each job, printed when it changes
    ended: set[str] = set()  # not active at the last poll: ended if still so at the next one
    try:
        while jobs:
            active = slurm_active(list(jobs))
            for jid, state in active.items():
                if seen.get(jid) != state:
                    print(f"{jobs[jid].name}: job {jid} {state.lower()}", flush=True)
                    seen[jid] = state
            for jid in [j for j in jobs if j not in active and j in ended]:
                run = jobs.pop(jid)
                result = "done" if run.marker("done").exists() else "unfinished: " + _job_failure(run, study, jid)
                print(f"{run.name}: job {jid} ended, {result}", flush=True)
            ended = {j for j in jobs if j not in active}
            if jobs:
                time.sleep(5)
    except KeyboardInterrupt:
        print("\nno longer waiting; the jobs go on. The same command again waits for them (nothing is submitted twice).", flush=True)
        raise


def _job_failure(run: RunSpec, study: Study, jid: str) -> str:
    if run.marker("failed").is_file():
        return run.marker("failed").read_text().strip()
    return f"the job ended without a result (cancelled, or see {Path(study.dir) / 'slurm' / f'{jid}_0_log.err'})"


# ----------------------------------------------------------------------------------------------------
# Status and aggregation
# ----------------------------------------------------------------------------------------------------


def run_state(run: RunSpec, queued: dict[str, str]) -> str:
    """done, running, a SLURM state (pending, ...), failed, trained (evaluation pending), started (a checkpoint
    to resume) or pending; `queued` holds the states of the study's active SLURM jobs."""
    if run.marker("done").exists():
        return "done"
    lock = run.marker("lock")
    if lock.exists():
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return "running"
    job = run.marker("job").read_text().strip() if run.marker("job").is_file() else None
    if job in queued:
        return queued[job].lower()
    if run.marker("failed").exists():
        return "failed"
    if run.marker("trained").exists():
        return "trained"
    return "started" if (run.logdir / "ckpt.pt").exists() else "pending"


def metrics_summary(logdir: Path) -> tuple[int | None, float | None, float | None]:
    """(env steps, last eval/return, hours) from a run's metrics.jsonl."""
    step = ret = hours = None
    path = logdir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            step, ret, hours = row.get("step", step), row.get("eval/return", ret), row.get("perf/hours", hours)
    return step, ret, hours


def status(study: Study) -> list[dict]:
    """Print and return one row per run: run, state, env steps, last evaluation return, hours, zero-shot mean."""
    rows, queued = [], {}
    jobs = [r.marker("job").read_text().strip() for r in expand(study) if r.marker("job").is_file() and not r.marker("done").exists()]
    if jobs and shutil.which("squeue"):
        try:
            queued = slurm_active(jobs, attempts=1)
        except SystemExit as e:
            print(f"note: SLURM's job states are unknown ({e})")
    for run in expand(study):
        step, ret, hours = metrics_summary(run.logdir)
        zs = None
        if run.marker("done").exists() and run.results.is_file():
            means = [json.loads(line)["mean"] for line in run.results.read_text().splitlines() if line.strip()]
            zs = sum(means) / len(means)
        rows.append({"run": run.name, "state": run_state(run, queued), "env_steps": step, "eval_return": ret, "hours": hours, "zeroshot": zs})
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"{'run':<16} {'state':<10} {'env steps':>10} {'eval return':>12} {'hours':>7} {'zero-shot mean':>15}")
    for r in rows:
        print(f"{r['run']:<16} {r['state']:<10} {fmt(r['env_steps'], 'd'):>10} {fmt(r['eval_return'], '.1f'):>12} "
              f"{fmt(r['hours'], '.3f'):>7} {fmt(r['zeroshot'], '.1f'):>15}")  # fmt: skip
    done = sum(r["state"] == "done" for r in rows)
    print(f"{done}/{len(rows)} runs done in {study.dir}")
    for run in expand(study):
        if run.marker("failed").exists() and not run.marker("done").exists():
            print(f"{run.name}: {run.marker('failed').read_text().strip()}")
    return rows


def aggregate(study: Study) -> Path | None:
    """evaluate.py aggregate over the finished runs; with unequal seed counts, over the seeds every method has."""
    done = [r for r in expand(study) if r.marker("done").exists()]
    seeds = {m: {r.seed for r in done if r.method == m} for m in study.methods}
    common = set.intersection(*[s for s in seeds.values() if s]) if done else set()
    files = [r for r in done if r.seed in common]
    left = [r.name for r in done if r.seed not in common]
    if left:
        print(f"note: aggregating seeds {sorted(common)}, which every method with a finished run has; left out for now: {', '.join(left)}")
    if not files:
        print("nothing to aggregate yet: no finished run")
        return None
    out = Path(study.dir) / f"zeroshot_{study.setting}"
    cmd = [sys.executable, str(REPO / "evaluate.py"), "aggregate", *(str(r.results) for r in files), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        raise SystemExit(f"{proc.stderr.strip()}\nerror: evaluate.py aggregate failed (status {proc.returncode})")
    out.with_suffix(".txt").write_text(proc.stdout)
    return out


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def run_study(cmd: RunCommand) -> int:
    """Check, claim the directory, run what is unfinished, then print the status and aggregate. Exit status:
    0 when every run is done."""
    study = dataclasses.replace(cmd.config, dir=str(Path(cmd.config.dir).resolve()))
    check_study(study, cmd.how)
    check_dir(study)
    check_train_flags(study, cmd.how.threads)
    claim_dir(study, cmd.study)
    runs = [r for r in expand(study) if not r.marker("done").exists()]
    print(f"study {study.dir}: {len(expand(study))} runs, {len(expand(study)) - len(runs)} done already", flush=True)
    interrupted = False
    try:
        if runs and cmd.how.executor == "local":
            run_local(runs, cmd.how)
        elif runs:
            run_slurm(study, runs, cmd.how)
    except KeyboardInterrupt:
        interrupted = True
    rows = status(study)
    if interrupted:
        return 130
    aggregate(study)
    return 0 if all(r["state"] == "done" for r in rows) else 1


def cli(argv: list[str] | None = None) -> RunCommand | StatusCommand | AggregateCommand:
    """Parse a command; `run` takes its defaults from the named --study (peeked first, so flags override it)."""
    given, argv = sys.argv[1:] if argv is None else argv, []
    for a in given:
        if argv and argv[-1] == "--train-flags":  # its value starts with "--": hand it to tyro as one token
            argv[-1] = f"--train-flags={a}"
        else:
            argv.append(a)
    name = "bic_gravity"
    for i, a in enumerate(argv):
        if a == "--study" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--study="):
            name = a.split("=", 1)[1]
    if argv and argv[0] == "run" and name not in STUDIES:
        raise SystemExit(f"error: unknown --study {name!r}; choose one of {list(STUDIES)}")
    default = RunCommand(study=name, config=STUDIES.get(name, Study()))
    command = Union[
        Annotated[RunCommand, tyro.conf.subcommand("run", default=default)],
        Annotated[StatusCommand, tyro.conf.subcommand("status")],
        Annotated[AggregateCommand, tyro.conf.subcommand("aggregate")],
    ]
    return tyro.cli(command, args=argv, description=__doc__)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    cmd = cli(argv)
    if isinstance(cmd, RunCommand):
        return run_study(cmd)
    study = load_study(cmd.dir)
    if isinstance(cmd, StatusCommand):
        rows = status(study)
        return 0 if all(r["state"] == "done" for r in rows) else 1
    return 0 if aggregate(study) else 1


if __name__ == "__main__":
    # Run as the module `sweep`, not `__main__`, so that the RunJobs pickled for SLURM name a module the job imports.
    import sweep

    sys.exit(sweep.main())
