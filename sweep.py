"""Studies: every method x seed of one task and context setting, trained, evaluated zero-shot and aggregated,
locally or on a SLURM cluster, surviving interruption (the DALI protocol, arXiv:2508.20294, Sec. 6).

    python sweep.py run --study bic_gravity                                    # the reduced protocol, this machine
    python sweep.py run --study bic_gravity --executor local --steps 3000 --seeds 0 1 --dir runs/try
    python sweep.py run --study bic_gravity --executor slurm --partition cpu --time-min 240 --account me
    python sweep.py status runs/studies/bic_gravity                          # or the study's name
    python sweep.py aggregate runs/studies/bic_gravity

This file is the command line: the studies that ship, the checks before anything is launched, the study
directory, status and aggregation. A study's configuration and the work of one run are in study_runs.py,
the local and SLURM executors in study_executors.py, the process between a runner and train.py in
supervisor.py, the recorded code version in code_version.py; docs/studies.md tells the whole story.

The study directory DIR holds one directory per run (study_runs.py lists its files) and:

    study.json               the study's configuration, and the code (commit, dirty tree) of every sweep.py run
                             that worked in it; another configuration in DIR is refused, listing the fields
    sweep.lock               flock-ed by the one `sweep.py run` working in DIR (its holder written inside)
    aggregate.lock           flock-ed while one process aggregates
    zeroshot_<setting>.{json,png,txt}   the aggregate of the finished runs (`evaluate.py aggregate`)
    slurm/                   submitit's job scripts, pickles and logs (SLURM executor)

Running the same command again skips finished runs and resumes the others from their checkpoints
(`train.py --resume` is exact), so a study survives a stopped machine, a killed process or a preempted
job. At the end, and on demand (`status`, `aggregate`), it prints a status table and aggregates.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Union

import tyro

import code_version
import dir_lock
import envs
from study_executors import SLURM_ENDED, Executor, check_sbatch, job_state, run_local, run_slurm, tracked_job
from study_runs import METHODS, REPO, STUDY_FLAGS, RunSpec, Study, expand, write_atomic

STUDY_VERSION = 1

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
class RunCommand:
    """Run a study: train, evaluate and aggregate every (method, seed) not finished yet."""

    study: str = "bic_gravity"
    """Named study whose fields are the defaults of the flags below: bic_gravity (the reduced protocol),
    bic_gravity_all (every method), walker_double_box."""
    config: Annotated[Study, tyro.conf.OmitArgPrefixes] = field(default_factory=Study)
    how: Annotated[Executor, tyro.conf.OmitArgPrefixes] = field(default_factory=Executor)


@dataclass(frozen=True)
class StatusCommand:
    """Print a study's status table: run, state, env steps, last evaluation return, hours, zero-shot mean, code."""

    dir: tyro.conf.Positional[str]
    """Study directory (or the name of a shipped study, for its default directory)."""


@dataclass(frozen=True)
class AggregateCommand:
    """Aggregate a study's finished runs (evaluate.py aggregate): table, JSON and figure in its directory."""

    dir: tyro.conf.Positional[str]
    """Study directory (or the name of a shipped study, for its default directory)."""


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
    if how.workers < 0 or how.threads < 1 or how.cpus_per_job < 0 or how.gpus_per_job < 0 or how.mem_gb < 0:
        problems.append(f"--workers {how.workers}, --threads {how.threads}, --cpus-per-job {how.cpus_per_job}, --gpus-per-job "
                        f"{how.gpus_per_job}, --mem-gb {how.mem_gb}: --threads must be >= 1, the others >= 0")  # fmt: skip
    if not math.isfinite(how.mem_gb):  # nan passes `< 0`; inf would end in a traceback when rendered for sbatch
        problems.append(f"--mem-gb {how.mem_gb}: must be a finite number >= 0 (0: the cluster's default)")
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
    import config  # here: it imports torch, which `status` and `aggregate` never need
    import train

    for method in study.methods:
        argv = RunSpec(study, method, study.seeds[0]).train_command(threads, resume=False)[1:]
        try:
            config.check_args(train.cli(argv))
        except SystemExit as e:
            raise SystemExit(f"{e.code if isinstance(e.code, str) else ''}\nerror: train.py rejects the flags of {method}: "
                             f"--train-flags {study.train_flags!r}") from None  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The study directory
# ----------------------------------------------------------------------------------------------------

LOCKS = ("sweep.lock", "aggregate.lock")


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
    elif root.exists() and any(p.name not in LOCKS for p in root.iterdir()):
        raise SystemExit(f"error: {root} exists, is not empty and holds no study.json: not a study directory; choose another --dir")


def lock_dir(root: Path, name: str = "sweep.lock", wait: bool = False) -> int:
    """flock DIR/<name> for as long as this process keeps the returned fd open (dir_lock.py: it dies with the
    process; children do not inherit it). Without `wait`, a held lock is an error naming its holder."""
    try:
        return dir_lock.acquire(root / name, wait)
    except dir_lock.DirLocked as held:
        raise SystemExit(f"error: {root} is in use by another sweep.py: {held}. One `sweep.py run` works in a "
                         "study directory at a time: wait for it to end (its runs go on if it is stopped), or choose "
                         "another --dir.") from None  # fmt: skip


def claim_dir(study: Study, name: str) -> None:
    """Record the study in its directory (after check_dir), and the code this sweep runs, when it differs
    from the last code recorded there."""
    path = Path(study.dir) / "study.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(path.read_text()) if path.is_file() else {"version": STUDY_VERSION, "name": name, "study": study_record(study)}
    code, before = code_version.code_version(), record.get("code", [])
    if before and not code_version.same_code(before[-1], code):
        print(f"note: this study ran under code {code_version.describe(before[-1])} so far, now under {code_version.describe(code)}: "
              "runs resumed now mix code versions (`sweep.py status` shows each run's)", flush=True)  # fmt: skip
    if not before or not code_version.same_code(before[-1], code):
        record["code"] = [*before, {**code, "since": time.strftime("%Y-%m-%d %H:%M:%S")}]
        write_atomic(path, json.dumps(record, indent=1) + "\n")


def load_study(where: str) -> Study:
    """The study in directory `where` (or a shipped study's default directory), from its study.json."""
    root = Path(STUDIES[where].dir if where in STUDIES and not Path(where).is_dir() else where)
    path = root / "study.json"
    if not path.is_file():
        raise SystemExit(f"error: {root} is not a study directory (no study.json); shipped studies: {list(STUDIES)}")
    d = json.loads(path.read_text())["study"]
    return Study(**{**d, "methods": tuple(d["methods"]), "seeds": tuple(d["seeds"]), "train_flags": shlex.join(d["train_flags"]), "dir": str(root)})


# ----------------------------------------------------------------------------------------------------
# Status and aggregation
# ----------------------------------------------------------------------------------------------------


def slurm_states(study: Study) -> dict[str, str]:
    """{run name: SLURM state} of the runs whose job SLURM may still run (queued, running, being requeued)."""
    runs = [r for r in expand(study) if r.marker("job").is_file() and not r.marker("done").exists()]
    if not runs or not (shutil.which("squeue") or shutil.which("sacct")):
        return {}
    states = {}
    for run in runs:
        job = tracked_job(study, run.marker("job").read_text().strip())
        if not job.paths.result_pickle.exists() and (state := job_state(job)) not in SLURM_ENDED:
            states[run.name] = state
    return states


def run_state(run: RunSpec, queued: dict[str, str]) -> str:
    """done, running, a SLURM state (pending, ...), failed, trained (evaluation pending), started (a checkpoint
    to resume) or pending; `queued` holds the SLURM states of the study's unfinished jobs."""
    if run.marker("done").exists():
        return "done"
    lock = run.marker("lock")
    if lock.exists():
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return "running"
    if run.name in queued:
        return queued[run.name].lower()
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


def run_code(run: RunSpec) -> list[str]:
    """The code versions of a run's launches (train.py and evaluate.py), in order, each once."""
    return list(dict.fromkeys(code_version.describe(c) for c in code_version.read_launches(run.marker("code.json"))))


def status(study: Study, queued: dict[str, str] | None = None) -> list[dict]:
    """Print and return one row per run: run, state, env steps, last evaluation return, hours, zero-shot mean,
    code (the commit its launches ran; "mixed" when they differ); then which runs ran which code."""
    rows, queued = [], slurm_states(study) if queued is None else queued
    for run in expand(study):
        step, ret, hours = metrics_summary(run.logdir)
        zs = None
        if run.marker("done").exists() and run.results.is_file():
            means = [json.loads(line)["mean"] for line in run.results.read_text().splitlines() if line.strip()]
            zs = sum(means) / len(means)
        code = run_code(run)
        rows.append({"run": run.name, "state": run_state(run, queued), "env_steps": step, "eval_return": ret, "hours": hours,
                     "zeroshot": zs, "code": code[0] if len(code) == 1 else "mixed" if code else None})  # fmt: skip
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"{'run':<16} {'state':<10} {'env steps':>10} {'eval return':>12} {'hours':>7} {'zero-shot mean':>15}  code")
    for r in rows:
        print(f"{r['run']:<16} {r['state']:<10} {fmt(r['env_steps'], 'd'):>10} {fmt(r['eval_return'], '.1f'):>12} "
              f"{fmt(r['hours'], '.3f'):>7} {fmt(r['zeroshot'], '.1f'):>15}  {r['code'] or '-'}")  # fmt: skip
    print(f"{sum(r['state'] == 'done' for r in rows)}/{len(rows)} runs done in {study.dir}")
    versions = {run.name: run_code(run) for run in expand(study)}
    if len({c for codes in versions.values() for c in codes}) > 1:
        print("warning: the runs ran different code:\n" + "\n".join(f"  {name}: {' then '.join(c)}" for name, c in versions.items() if c))
    for run in expand(study):
        if run.marker("failed").exists() and not run.marker("done").exists():
            print(f"{run.name}: {run.marker('failed').read_text().strip()}")
    return rows


def aggregate(study: Study, queued: dict[str, str] | None = None) -> Path | None:
    """evaluate.py aggregate over the finished runs; with unequal seed counts, over the seeds every method with
    a finished run has. Says which methods and runs it leaves out, and why."""
    runs, queued = expand(study), slurm_states(study) if queued is None else queued
    done = [r for r in runs if r.marker("done").exists()]
    seeds = {m: {r.seed for r in done if r.method == m} for m in study.methods}
    common = set.intersection(*[s for s in seeds.values() if s]) if done else set()
    files = [r for r in done if r.seed in common]
    states = lambda m: ", ".join(f"{r.name} {run_state(r, queued)}" for r in runs if r.method == m)  # noqa: E731
    left = [f"{m}: no finished run ({states(m)})" for m in study.methods if not seeds[m]]
    left += [f"{r.name}: finished, but not every method has seed {r.seed} yet" for r in done if r.seed not in common]
    left += [f"{r.name}: {run_state(r, queued)}" for r in runs if seeds[r.method] and not r.marker("done").exists()]
    if left:
        print(f"note: left out of the aggregate ({len(files)} of {len(runs)} runs in it):\n  " + "\n  ".join(left))
    if not files:
        print("nothing to aggregate yet: no finished run")
        return None
    out = Path(study.dir) / f"zeroshot_{study.setting}"
    cmd = [sys.executable, str(REPO / "evaluate.py"), "aggregate", *(str(r.results) for r in files), "--out", str(out)]
    lock = lock_dir(Path(study.dir), "aggregate.lock", wait=True)  # one process at a time writes the aggregate
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        print(proc.stdout, end="")
        if proc.returncode != 0:
            raise SystemExit(f"{proc.stderr.strip()}\nerror: evaluate.py aggregate failed (status {proc.returncode})")
        write_atomic(out.with_suffix(".txt"), proc.stdout)
    finally:
        os.close(lock)
    return out


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def run_study(cmd: RunCommand) -> int:
    """Check, claim the directory, run what is unfinished, then print the status and aggregate. Exit status:
    0 when every run is done."""
    study = dataclasses.replace(cmd.config, dir=str(Path(cmd.config.dir).resolve()))
    check_study(study, cmd.how)
    check_dir(study)  # before anything is written; again below, under the lock, where it counts
    check_train_flags(study, cmd.how.threads)
    if cmd.how.executor == "slurm":
        check_sbatch(study, cmd.how)
    lock = lock_dir(Path(study.dir))  # held until the sweep ends: one sweep works in a directory at a time
    try:
        check_dir(study)
        claim_dir(study, cmd.study)
        runs = [r for r in expand(study) if not r.marker("done").exists()]
        code = code_version.describe(code_version.code_version())
        print(f"study {study.dir}: {len(expand(study))} runs, {len(expand(study)) - len(runs)} done already; code {code}", flush=True)
        try:
            if runs and cmd.how.executor == "local":
                run_local(runs, cmd.how)
            elif runs:
                run_slurm(study, runs, cmd.how)
        except KeyboardInterrupt:
            status(study)
            return 130
        queued = slurm_states(study) if cmd.how.executor == "slurm" else {}
        rows = status(study, queued)
        aggregate(study, queued)
        return 0 if all(r["state"] == "done" for r in rows) else 1
    finally:
        os.close(lock)


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
    sys.exit(main())
