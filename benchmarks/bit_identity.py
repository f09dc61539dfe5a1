"""Bit identity across code versions: runs of train.py under an older commit and under the working tree end
in exactly the same training state (every tensor and value of agent, optimisers, replay, counters and
random streams), for a restructuring that must not change a single number.

    python benchmarks/bit_identity.py                          # against 44a2cd4: Dreamer-DR, DALI-S, cRSSM-S
    python benchmarks/bit_identity.py --commit HEAD~3 --methods dali_s
    python benchmarks/bit_identity.py --commit ba796d3 --methods dreamer_dr dali_s crssm_s dali_s_chi dali_d
    python benchmarks/bit_identity.py --flags="--task ball_in_cup --contexts single_0 --envs 2 --action-repeat 10 --prefill 1000 --eval-every 0 --no-progress" --steps 4000 6000
    python benchmarks/bit_identity.py --write-fixture          # regenerate fixtures/dali_s_v1.pt and its reference

The older commit is exported with `git archive` into a temporary folder (no worktree, no change to the
repository). For each method, on ball_in_cup features:
  fresh   train.py to --steps[0] env steps under both versions (same seed): same initial weights, same training;
  resume  the old version's checkpoint at --steps[0], resumed to --steps[1] under the old version and, from a
          copy of the same file, under the working tree (an old checkpoint is migrated on load).
Every entry of checkpoint.flat_state is compared with torch.equal (plain values with ==). Prints one line per
comparison and exits 1 on any difference.

--write-fixture writes the fixture of test_dali.py's version-1 test: a DALI-S checkpoint of the old version
at --steps[0] (fixtures/dali_s_v1.pt) and the state digest (checkpoint.state_digest) of its resume to
--steps[1] under the old version, with the torch version and CPU capability that computed it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from checkpoint import flat_state, load_checkpoint, state_digest  # noqa: E402

METHODS = {
    "dreamer_dr": ["--context", "none"],
    "dali_s": ["--context", "learned", "--integration", "shallow"],
    "crssm_s": ["--context", "oracle", "--integration", "shallow"],
    "dali_s_chi": ["--context", "learned", "--integration", "shallow", "--ctx.cross-weight", "1"],
    "dali_d": ["--context", "learned", "--integration", "deep"],
    "crssm_d": ["--context", "oracle", "--integration", "deep"],
    "dali_d_per_step": ["--context", "learned", "--integration", "deep"],
}
# Flags only the working tree's fresh run gets (the older code lacks them): the per-step deep ctx of code before
# the held one (ctx.refresh 0), against that code's DALI-D. An old checkpoint resumes with it by itself.
NEW_ONLY = {"dali_d_per_step": ["--ctx.refresh", "0"]}
# Tiny sizes (seconds per run on 2 cores); 50 control steps per policy step: 20-step episodes of 2000 env steps.
TINY = (
    "--task ball_in_cup --obs features --contexts single_0 --envs 2 --action-repeat 50 --batch-size 3 --batch-length 8 "
    "--prefill 400 --train-ratio 48 --rssm.deter 16 --rssm.hidden 16 --rssm.stoch 4 --rssm.classes 4 --hidden 16 "
    "--ctx.window 6 --ctx.units 16 --ctx.heads 2 --ctx.fd-units 16 --replay-capacity 64 --eval-every 0 "
    "--log-every 1000 --save-every 2000 --no-progress --threads 1"
)
FIXTURE = ROOT / "fixtures"


@dataclass(frozen=True)
class Args:
    """Compare train.py runs of an older commit and of the working tree, tensor by tensor."""

    commit: str = "44a2cd4"
    """The older commit (anything `git archive` takes)."""
    methods: tuple[str, ...] = ("dreamer_dr", "dali_s", "crssm_s")
    """Methods to run: dreamer_dr, dali_s, crssm_s (the default: the headline and cRSSM-S), dali_s_chi, dali_d,
    crssm_d, dali_d_per_step (the working tree with --ctx.refresh 0 against an older DALI-D)."""
    flags: str = TINY
    """train.py flags shared by every run (task, sizes, budget; write --flags="..."); --steps and --logdir are added."""
    steps: tuple[int, int] = (2000, 4000)
    """Env steps of the checkpoint both versions start from, and of the resumed runs' end."""
    write_fixture: bool = False
    """Write fixtures/dali_s_v1.pt and fixtures/dali_s_v1_resumed.json from the older commit instead."""


def export(commit: str, dest: Path) -> Path:
    """The tree of `commit` as plain files in dest."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def train(tree: Path, logdir: Path, flags: list[str]) -> Path:
    """Run train.py of `tree` (as its own working directory) and return the checkpoint."""
    out = subprocess.run([sys.executable, "train.py", *flags, "--logdir", str(logdir)], cwd=tree, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: train.py in {tree} failed:\n{out.stderr[-3000:]}")
    return logdir / "ckpt.pt"


def resume(tree: Path, ckpt: Path, logdir: Path, steps: int) -> Path:
    """Resume a copy of `ckpt` in a fresh logdir to `steps` env steps under `tree`."""
    logdir.mkdir(parents=True)
    shutil.copy(ckpt, logdir / "ckpt.pt")
    return train(tree, logdir, ["--resume", "--steps", str(steps)])


# Entries that newer checkpoints add and older ones lack: the acting state of a mid-episode checkpoint. They are
# not compared (the old version has nothing to compare them with); everything both hold must be equal.
ADDED = ("acting.",)


def differences(a: Path, b: Path) -> tuple[int, list[str]]:
    """Entries compared, and the paths of those that differ (or exist in one checkpoint only, but for `ADDED`
    ones in the newer `b`)."""
    fa, fb = flat_state(load_checkpoint(a)), flat_state(load_checkpoint(b))
    fb = {k: v for k, v in fb.items() if k in fa or not k.startswith(ADDED)}
    diff = sorted(fa.keys() ^ fb.keys())
    for k in fa.keys() & fb.keys():
        x, y = fa[k], fb[k]
        same = torch.equal(x, y) if torch.is_tensor(x) and torch.is_tensor(y) else (not torch.is_tensor(x) and not torch.is_tensor(y) and x == y)
        if not same:
            diff.append(k)
    return len(fa.keys() | fb.keys()), diff


def write_fixture(args: Args, old: Path, tmp: Path) -> None:
    flags = [*args.flags.split(), *METHODS["dali_s"]]
    ckpt = train(old, tmp / "fixture", [*flags, "--steps", str(args.steps[0])])
    resumed = resume(old, ckpt, tmp / "fixture_resumed", args.steps[1])
    FIXTURE.mkdir(exist_ok=True)
    shutil.copy(ckpt, FIXTURE / "dali_s_v1.pt")
    reference = {
        "made_by": f"benchmarks/bit_identity.py --write-fixture: commit {args.commit}, train.py {' '.join(flags)} --steps {args.steps[0]}, "
        f"then --resume --steps {args.steps[1]}",
        "steps": list(args.steps),
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "digest": state_digest(load_checkpoint(resumed)),
    }
    (FIXTURE / "dali_s_v1_resumed.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {FIXTURE / 'dali_s_v1.pt'} ({(FIXTURE / 'dali_s_v1.pt').stat().st_size} bytes) and {FIXTURE / 'dali_s_v1_resumed.json'}")


def main(args: Args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = export(args.commit, tmp / "old")
        if args.write_fixture:
            write_fixture(args, old, tmp)
            return 0
        failed = 0
        for method in args.methods:
            flags = [*args.flags.split(), *METHODS[method]]
            start = [*flags, "--steps", str(args.steps[0])]
            old_start = train(old, tmp / method / "old_fresh", start)
            new_start = train(ROOT, tmp / method / "new_fresh", [*start, *NEW_ONLY.get(method, [])])
            old_end = resume(old, old_start, tmp / method / "old_resumed", args.steps[1])
            new_end = resume(ROOT, old_start, tmp / method / "new_resumed", args.steps[1])
            for what, a, b in (("fresh", old_start, new_start), ("resume", old_end, new_end)):
                n, diff = differences(a, b)
                updates = load_checkpoint(b)["counters"]["updates"]
                verdict = "identical" if not diff else f"DIFFERENT in {len(diff)}: {', '.join(diff[:8])}"
                print(f"{method:<10} {what:<6} {updates:>4} updates: {n} entries {verdict}", flush=True)
                failed += bool(diff)
        print(f"{args.commit} vs working tree: {'every checkpoint identical' if not failed else f'{failed} comparisons differ'}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args, description=__doc__)))
