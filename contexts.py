"""The context protocol of the DALI benchmark: which physical features vary, over which ranges, and which
contexts are trained on and evaluated (Röder et al., arXiv:2508.20294, Sec. 6 and App. C; CARL, Benjamins
et al., TMLR 2023).

    CONTEXT_FEATURES[task]                       feature name -> ContextFeature (defaults, ranges, grid)
    train_contexts(task, setting, n, seed)       -> list[dict]           (training contexts, CARL's sampler)
    eval_contexts(task, setting)                 -> list[(dict, regime)] (zero-shot evaluation grid)
    validate_context / default_context / normalize_context

Settings: default; single_0 / single_1 (the first / second feature varies); double_box (both vary).
Regimes: interpolation (every varied feature inside its training range), extrapolation (every varied
feature outside), mixed (the rest). envs.py applies a context to the physics.
"""

from __future__ import annotations

import math
import os
import signal
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

Task = Literal["walker", "ball_in_cup"]
ObsKind = Literal["features", "pixels"]
Setting = Literal["default", "single_0", "single_1", "double_box"]
Regime = Literal["interpolation", "extrapolation", "mixed"]

SETTINGS: tuple[str, ...] = ("default", "single_0", "single_1", "double_box")
DEFAULT_STRING_LENGTH = 0.3  # ball_in_cup.xml: <spatial name="string" range="0 0.3">


@dataclass(frozen=True)
class ContextFeature:
    """One physical context feature and its place in the DALI evaluation protocol."""

    name: str
    """Feature name, as in CARL."""
    default: float
    """Value of the unmodified DMC task."""
    train_range: tuple[float, float]
    """Training contexts are sampled uniformly in [lo, hi]; also the range normalised to [-1, 1]."""
    interpolation: tuple[float, ...]
    """Single-feature evaluation values inside the training range."""
    extrapolation: tuple[float, ...]
    """Single-feature evaluation values outside the training range."""
    double_values: tuple[float, ...]
    """Values of this feature on the two-feature (double_box) evaluation grid."""
    minimum: float
    """Smallest physically possible value."""
    minimum_allowed: bool
    """Whether `minimum` itself is allowed (actuator_strength 0 is; gravity 0 and distance 0 are not)."""

    def check(self, value: float) -> None:
        """Raise ValueError if `value` is not a physically possible value of this feature."""
        ok = isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)
        ok = ok and (value >= self.minimum if self.minimum_allowed else value > self.minimum)
        if not ok:
            bound = ">=" if self.minimum_allowed else ">"
            raise ValueError(f"context feature {self.name!r} = {value!r} is impossible: it must be a finite number {bound} {self.minimum}")

    def inside(self, value: float) -> bool:
        """Whether `value` lies in the training range (the interpolation regime)."""
        lo, hi = self.train_range
        return lo <= value <= hi


def _feature(name, default, train_range, interpolation, extrapolation, double_values, minimum, minimum_allowed):
    return ContextFeature(name, float(default), train_range, interpolation, extrapolation, double_values, minimum, minimum_allowed)


_GRAVITY_GRID = dict(
    train_range=(4.9, 14.7),
    interpolation=(4.9, 7.35, 9.81, 12.25, 14.7),
    extrapolation=(0.98, 1.715, 2.45, 3.185, 3.92, 15.68, 16.66, 17.64, 18.62, 19.6),
    double_values=(0.98, 2.45, 3.92, 4.9, 9.81, 14.7, 15.68, 17.64, 19.6),
    minimum=0.0,
    minimum_allowed=False,
)
CONTEXT_FEATURES: dict[str, dict[str, ContextFeature]] = {
    "walker": {  # names and defaults as carl-bench's CARLDmcWalkerEnv.get_context_features() (tested)
        "gravity": _feature("gravity", 9.81, **_GRAVITY_GRID),
        "actuator_strength": _feature(
            "actuator_strength",
            1.0,
            train_range=(0.5, 1.5),
            interpolation=(0.5, 0.75, 1.0, 1.25, 1.5),
            extrapolation=(0.1, 0.2, 0.3, 0.4, 1.6, 1.7, 1.8, 1.9, 2.0),
            double_values=(0.1, 0.3, 0.5, 1.0, 1.5, 1.6, 1.8, 2.0),
            minimum=0.0,
            minimum_allowed=True,
        ),
    },
    "ball_in_cup": {  # absent from PyPI carl-bench; names as in the DALI paper's CARL fork
        "gravity": _feature("gravity", 9.81, **_GRAVITY_GRID),
        "distance": _feature(
            "distance",
            DEFAULT_STRING_LENGTH,
            train_range=(0.15, 0.45),
            interpolation=(0.15, 0.225, 0.3, 0.375, 0.45),
            extrapolation=(0.03, 0.06, 0.09, 0.12, 0.48, 0.51, 0.54, 0.57, 0.6),
            double_values=(0.03, 0.09, 0.15, 0.3, 0.45, 0.48, 0.54, 0.6),
            minimum=0.0,
            minimum_allowed=False,
        ),
    },
}


def carl():
    """Import carl-bench on first use. Its import costs ~2 s, pulls in pygame, and opens a pygame display
    (carl.envs.gymnasium calls pygame.display.init()), which we point at SDL's dummy driver."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    # SDL replaces the SIGINT/SIGTERM handlers by ones that only queue a quit event nobody reads: `kill` would
    # stop working once contexts are sampled. Ask it not to, and restore Python's handlers after the import.
    os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # carl warns about optional simulators (Box2D, py4j) we do not use, under its own "once" filter; record=True
    # catches them anyway.
    with warnings.catch_warnings(record=True):
        import carl.context.context_space
        import carl.context.sampler
        import carl.envs.dmc
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)
    return carl


def task_features(task: str) -> dict[str, ContextFeature]:
    """The context features of `task`; ValueError naming the allowed tasks for an unknown one."""
    if task not in CONTEXT_FEATURES:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(CONTEXT_FEATURES)}")
    return CONTEXT_FEATURES[task]


def default_context(task: str) -> dict[str, float]:
    """The unmodified task's context, e.g. {"gravity": 9.81, "actuator_strength": 1.0}."""
    return {name: f.default for name, f in task_features(task).items()}


def validate_context(task: str, context: dict) -> dict[str, float]:
    """Check names and values; return a full context (missing features at their defaults) as floats."""
    features = task_features(task)
    if not isinstance(context, dict):
        raise ValueError(f"a context must be a dict of feature values, got {context!r}")
    unknown = sorted(set(context) - set(features))
    if unknown:
        raise ValueError(f"task {task!r} has no context feature {unknown[0]!r}; its features are {list(features)}")
    full = default_context(task)
    for name, value in context.items():
        features[name].check(value)
        full[name] = float(value)
    return full


def normalize_context(task: str, context: dict) -> np.ndarray:
    """c -> (c - lo) / (hi - lo) * 2 - 1 over each feature's training range, as float32 (X,)."""
    features = task_features(task)
    values = [(context[n] - f.train_range[0]) / (f.train_range[1] - f.train_range[0]) * 2 - 1 for n, f in features.items()]
    return np.asarray(values, np.float32)


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"unknown context setting {setting!r}; choose one of {list(SETTINGS)}")


def varied_features(task: str, setting: str) -> list[str]:
    """Names of the features a setting varies: none, the k-th one, or both."""
    names = list(task_features(task))
    _check_setting(setting)
    return {"default": [], "single_0": names[:1], "single_1": names[1:2], "double_box": names}[setting]


def train_contexts(task: str, setting: str = "default", n: int = 100, seed: int = 0) -> list[dict[str, float]]:
    """Training contexts: the default one, or `n` sampled uniformly in the training box of the varied
    features (others at default), with CARL's `ContextSampler` seeded by the run seed."""
    features = task_features(task)
    varied = varied_features(task, setting)
    if not varied:
        return [default_context(task)]
    if n < 1:
        raise ValueError(f"n = {n!r} training contexts: need at least 1")
    cs = carl().context
    with warnings.catch_warnings():  # ConfigSpace warns when normalising an unbounded feature
        warnings.simplefilter("ignore", RuntimeWarning)
        space = cs.context_space.ContextSpace(
            {name: cs.context_space.UniformFloatContextFeature(name, f.minimum, np.inf, default_value=f.default) for name, f in features.items()}
        )
        distributions = [cs.context_space.UniformFloatContextFeature(name, *features[name].train_range) for name in varied]
        sampler = cs.sampler.ContextSampler(context_distributions=distributions, context_space=space, seed=seed)
        sampled = sampler.sample_contexts(n_contexts=n)
    return [{name: float(c[name]) for name in features} for c in sampled.values()]


def regime(task: str, context: dict, varied: list[str]) -> Regime:
    """interpolation: every varied feature inside its training range (a feature at its default counts as
    inside); extrapolation: every varied feature outside; mixed: the rest."""
    features = task_features(task)
    inside = [features[n].inside(context[n]) for n in varied]
    if all(inside):
        return "interpolation"
    return "extrapolation" if not any(inside) else "mixed"


def eval_contexts(task: str, setting: str) -> list[tuple[dict[str, float], Regime]]:
    """The zero-shot evaluation grid of a training setting, each context with its regime.

    single_k:   every evaluation value of feature k except its default, the other feature at default.
    double_box: feature 0's values (default included) with feature 1 at default, feature 1's values
                (default excluded) with feature 0 at default, and all pairs of double-grid values where
                neither is a default: 15 + 13 + 56 = 84 contexts for both tasks.
    default:    the default context alone.
    """
    features = task_features(task)
    varied = varied_features(task, setting)
    base = default_context(task)
    if not varied:
        return [(base, "interpolation")]
    grid: list[dict[str, float]] = []
    for k, name in enumerate(varied):
        f = features[name]
        keep_default = setting == "double_box" and k == 0  # the all-default context appears exactly once
        for v in sorted(f.interpolation + f.extrapolation):
            if v != f.default or keep_default:
                grid.append({**base, name: v})
    if setting == "double_box":
        (n0, f0), (n1, f1) = features.items()
        for v0 in f0.double_values:
            for v1 in f1.double_values:
                if v0 != f0.default and v1 != f1.default:
                    grid.append({**base, n0: v0, n1: v1})
    return [(c, regime(task, c, varied)) for c in grid]
