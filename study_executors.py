"""Where a study's runs execute (sweep.py, docs/studies.md): on this machine, or one SLURM job per run.

Both are built on an engine rather than a scheduler of our own, and both call study_runs.RunJob:
- local (`run_local`): a `concurrent.futures.ThreadPoolExecutor` of --workers threads. The work happens in
  child processes (train.py, then evaluate.py), so a thread per worker is all it needs, and a run that
  crashes or is killed fails alone (one dead worker of a ProcessPoolExecutor breaks the whole pool).
  submitit's LocalExecutor starts every job at once, with no limit on how many run in parallel. A worker
  takes the next run that no other process holds (`FreeRuns`), so a run still locked by a killed sweep's
  train.py never blocks a worker while other runs wait.
- slurm (`run_slurm`): one job per run through submitit's SlurmExecutor. `sbatch_parameters` turns the
  flags into sbatch options, and `check_sbatch` has `sbatch --test-only` judge the rendered script before
  anything is submitted. SLURM warns a job --signal-delay-s before its time limit with USR2; submitit then
  calls RunJob.checkpoint, which has train.py checkpoint, and requeues the job, which resumes.
  `wait_for_jobs` follows the jobs with submitit's Job API (see its docstring for what it takes from it).
"""

from __future__ import annotations

import functools
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import submitit
from submitit.core.utils import UncompletedJobError
from submitit.slurm.slurm import SlurmInfoWatcher, _make_sbatch_string

from study_runs import REPO, RunFailed, RunJob, RunSpec, Study, write_atomic


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
    """slurm: GPUs per job (--gpus-per-node; train.py's --device auto then trains on CUDA)."""
    mem_gb: float = 0.0
    """slurm: memory per job in GB as SLURM counts them (1 G = 1024 M; rendered --mem=16G, or in M); 0: the cluster's default."""
    account: str = ""
    """slurm: account to charge (empty: the user's default)."""
    signal_delay_s: int = 300
    """slurm: the grace period: seconds between SLURM's USR2 warning and the time limit. train.py gets all but
    60 of them to finish its current step and write its checkpoint, mid-episode (seconds at the cpu preset; a
    pixel run's replay-sized checkpoint on a slow shared filesystem takes longer); the last 60 are for the requeue."""
    max_requeues: int = 100
    """slurm: times a job may hit its time limit and be requeued (submitit's max_num_timeout)."""
    wait: bool = True
    """slurm: wait for the jobs, then print the status and aggregate (--no-wait: submit and return)."""


# ----------------------------------------------------------------------------------------------------
# Local
# ----------------------------------------------------------------------------------------------------


class FreeRuns:
    """The runs not started yet, handed to worker threads: each `take` locks and returns a run no other
    process works on, passing over locked ones; with only locked ones left it waits for one to be freed."""

    def __init__(self, runs: list[RunSpec], threads: int):
        self.waiting, self.threads = list(runs), threads
        self.taken: list[RunJob] = []
        self.stopping = 0
        self._mutex = threading.Lock()
        self._told: set[str] = set()

    def take(self) -> RunJob | None:
        while True:
            with self._mutex:
                if self.stopping or not self.waiting:
                    return None
                for run in self.waiting:
                    job = RunJob(run, self.threads)
                    if job.try_lock():
                        self.waiting.remove(run)
                        self.taken.append(job)
                        return job
                    if run.name not in self._told:
                        print(f"{run.name}: another process works on this run ({job.holder()}); taking others first", flush=True)
                        self._told.add(run.name)
            time.sleep(2)

    def stop(self, sig: int) -> None:
        """Take no more runs, and stop the running ones: SIGTERM (train.py checkpoints first) or SIGKILL."""
        with self._mutex:
            self.stopping = sig
            for job in self.taken:
                job.stop(sig)


def run_local(runs: list[RunSpec], how: Executor) -> None:
    """Every run on this machine, --workers at a time; Ctrl-C asks the running ones to checkpoint and exit."""
    workers = min(len(runs), how.workers or max(1, len(os.sched_getaffinity(0)) // how.threads))
    print(f"local: {len(runs)} runs, {workers} workers x {how.threads} threads", flush=True)
    free = FreeRuns(runs, how.threads)

    def worker() -> None:
        while (job := free.take()) is not None:
            try:
                result = job.work()
            except RunFailed as e:
                result = f"FAILED: {e}"
            except Exception as e:  # a bug, not a run's failure: report it with the run, go on with the others
                result = f"FAILED: {type(e).__name__}: {e}"
            print(f"{job.run.name}: {result}", flush=True)

    pool = ThreadPoolExecutor(max_workers=workers)
    futures = [pool.submit(worker) for _ in range(workers)]
    try:
        for f in futures:
            while not f.done():  # a timed wait: Ctrl-C reaches the main thread
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping: the running runs checkpoint and exit (Ctrl-C again stops them at once)", flush=True)
        free.stop(signal.SIGTERM)
        try:
            pool.shutdown(wait=True)
        except KeyboardInterrupt:
            free.stop(signal.SIGKILL)
            pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------------
# SLURM: the request
# ----------------------------------------------------------------------------------------------------


def sbatch_parameters(study: Study, how: Executor) -> dict:
    """submitit SlurmExecutor parameters (sbatch options) for the study's jobs."""
    params: dict = dict(
        time=how.time_min, cpus_per_task=how.cpus_per_job or how.threads, signal_delay_s=how.signal_delay_s,
        # --requeue: submitit requeues with `scontrol requeue`, which SLURM refuses for jobs not marked
        # requeueable where a cluster sets JobRequeue=0 (benchmarks/slurm_local.sh does, to test this)
        additional_parameters={"requeue": True},
        setup=[f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"],
    )  # fmt: skip
    if how.mem_gb:  # SLURM takes integers with a unit; SlurmExecutor would render the float as is (--mem=16.0)
        mb = math.ceil(how.mem_gb * 1024)
        params["mem"] = f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"
    if how.gpus_per_job:
        params["gpus_per_node"] = how.gpus_per_job
    params.update({k: v for k, v in dict(partition=how.partition, account=how.account).items() if v})
    return params


def sbatch_script(study: Study, how: Executor) -> str:
    """The job script submitit will submit for each run (less the job name)."""
    folder = Path(study.dir) / "slurm"
    # submitit's own renderer (SlurmExecutor._make_submission_file_text calls it with the same arguments)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"  # as SlurmExecutor writes it
    return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(study, how))


def check_sbatch(study: Study, how: Executor) -> None:
    """Have SLURM judge the job script before anything is submitted (`sbatch --test-only`: no job is made)."""
    test = subprocess.run(["sbatch", "--test-only"], input=sbatch_script(study, how), capture_output=True, text=True, timeout=120)
    if test.returncode != 0:
        indent = lambda lines: "".join(f"\n       {line}" for line in lines)  # noqa: E731
        options = [line for line in sbatch_script(study, how).splitlines() if line.startswith("#SBATCH")]
        raise SystemExit(f"error: sbatch --test-only rejects this study's job request:{indent(test.stderr.strip().splitlines())}"
                         f"\n       the request:{indent(options)}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# SLURM: the jobs
# ----------------------------------------------------------------------------------------------------

# Job states after which SLURM runs the job no more (REQUEUED, PENDING, COMPLETING, PREEMPTED before a requeue,
# SUSPENDED, CONFIGURING, ... may all go on); ENDED is ours: a job squeue no longer lists, purged after MinJobAge
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "REVOKED",
               "SPECIAL_EXIT", "ENDED"}  # fmt: skip


class SqueueWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, answered by squeue instead of sacct, for clusters that keep no accounting
    database (sacct fails there, so submitit would report every job's state as UNKNOWN forever)."""

    _asked: set[str] = set()

    def _make_command(self) -> list[str] | None:
        # Every job, also those submitit's own list of unfinished states calls finished (a SUSPENDED job may
        # resume); all of this user's jobs, since asking by id fails outright once every id asked for is purged
        self._asked = {x.split("_")[0] for x in self._registered}
        return ["squeue", "--noheader", "--states=all", "--format=%i|%T|%r", f"--user={os.getuid()}"] if self._asked else None

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        info = {jid: {"JobID": jid, "State": "ENDED", "Reason": "no longer in squeue"} for jid in self._asked}
        for line in text.splitlines():
            jid, state, reason = line.strip().split("|", 2)
            info[jid] = {"JobID": jid, "State": state, "Reason": reason}
        return info


class SqueueJob(submitit.SlurmJob):
    watcher = SqueueWatcher(delay_s=30)


@functools.lru_cache(maxsize=1)
def job_class() -> type[submitit.SlurmJob]:
    """submitit's SlurmJob (its states from sacct), or SqueueJob where sacct has no accounting to read."""
    sacct = subprocess.run(["sacct", "--noheader", "-X", "-j", "1"], capture_output=True, text=True) if shutil.which("sacct") else None
    return submitit.SlurmJob if sacct is not None and sacct.returncode == 0 else SqueueJob


def tracked_job(study: Study, job_id: str) -> submitit.SlurmJob:
    """submitit's Job object for a job of the study, submitted by this or an earlier sweep.py."""
    return job_class()(folder=Path(study.dir) / "slurm", job_id=job_id)


def job_state(job: submitit.SlurmJob) -> str:
    """SLURM's state of the job, one word (sacct writes 'CANCELLED by 1000')."""
    return (job.state or "UNKNOWN").split()[0].upper()


def job_outcome(job: submitit.SlurmJob, run: RunSpec) -> str | None:
    """None while SLURM may still run the job; else 'done' or what went wrong.

    A job has ended for good when submitit's result file exists (RunJob returned or raised; a requeue
    writes none) or when SLURM's state is final (killed, cancelled, lost: no result will come). Not
    `job.done()` alone: it takes every state it does not list as unfinished (SUSPENDED, CONFIGURING,
    REQUEUE_HOLD, ...) for finished. `job.exception()` then gives the outcome (it waits up to 15 s for a
    result file that a shared filesystem shows late)."""
    state = None
    if not job.paths.result_pickle.exists():
        state = job_state(job)
        if state not in SLURM_ENDED:
            return None
    error = job.exception()
    if error is None:
        return "done" if run.marker("done").exists() else "ended without marking the run done"
    if run.marker("failed").is_file():
        return "FAILED: " + run.marker("failed").read_text().strip()
    if isinstance(error, UncompletedJobError) and state:
        reason = job.get_info(mode="cache").get("Reason", "None")
        return f"ended without a result (SLURM state {state}{'' if reason == 'None' else ', ' + reason}); its log: {job.paths.stderr}"
    return f"FAILED: {str(error).strip().splitlines()[-1]}; its log: {job.paths.stderr}"


def run_slurm(study: Study, runs: list[RunSpec], how: Executor) -> None:
    """One SLURM job per unfinished run through submitit; jobs still queued or running from an earlier call
    are waited for, not submitted again."""
    jobs: dict[str, tuple[RunSpec, submitit.SlurmJob]] = {}
    for run in runs:
        if run.marker("job").is_file():
            job = tracked_job(study, run.marker("job").read_text().strip())
            if not job.paths.result_pickle.exists() and job_state(job) not in SLURM_ENDED:
                print(f"{run.name}: job {job.job_id} is still {job_state(job).lower()}; not submitted again", flush=True)
                jobs[job.job_id] = (run, job)
    executor = submitit.SlurmExecutor(folder=Path(study.dir) / "slurm", max_num_timeout=how.max_requeues)
    executor.update_parameters(**sbatch_parameters(study, how))
    queued = {run.name for run, _ in jobs.values()}
    for run in [r for r in runs if r.name not in queued]:
        executor.update_parameters(job_name=f"{Path(study.dir).name}/{run.name}")
        job = executor.submit(RunJob(run, how.threads, grace_s=max(20, how.signal_delay_s - 60)))
        run.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run.marker("job"), job.job_id + "\n")
        print(f"{run.name}: submitted job {job.job_id}", flush=True)
        jobs[job.job_id] = (run, tracked_job(study, job.job_id))
    if not how.wait:
        print(f"submitted; `python sweep.py status {study.dir}` shows progress, the same command again waits for the jobs", flush=True)
        return
    try:
        wait_for_jobs(jobs)
    except KeyboardInterrupt:
        print("\nno longer waiting; the jobs go on. The same command again waits for them (nothing is submitted twice).", flush=True)
        raise


def wait_for_jobs(jobs: dict[str, tuple[RunSpec, submitit.SlurmJob]]) -> None:
    """Follow the jobs until each has ended, printing each change of state and each job's outcome."""
    seen: dict[str, str] = {}
    while jobs:
        for jid, (run, job) in list(jobs.items()):
            outcome = job_outcome(job, run)
            if outcome is not None:
                print(f"{run.name}: job {jid} {outcome}", flush=True)
                del jobs[jid]
            elif seen.get(jid) != (state := job_state(job)):
                print(f"{run.name}: job {jid} {state.lower()}", flush=True)
                seen[jid] = state
        if jobs:
            time.sleep(5)
