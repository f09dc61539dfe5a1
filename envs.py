"""Contextual DeepMind Control tasks with CARL semantics.

The benchmark of DALI (Röder et al., NeurIPS 2025, arXiv:2508.20294, Sec. 6 and App. C), built on the
CARL benchmark (Benjamins et al., TMLR 2023): a DMC task whose physics -- gravity, actuator strength,
string length -- is a hidden *context* that changes from episode to episode.

    walker       walk   contexts: gravity, actuator_strength    obs: 24 features or 64x64 RGB
    ball_in_cup  catch  contexts: gravity, distance (string)    obs:  8 features or 64x64 RGB

Why not CARL's own envs: PyPI carl-bench 1.1.1 has walker but no ball_in_cup, and its walker rebuilds the
physics from XML on every context change (~72 ms, ~390 ms with rendering) and ignores seeds. We take from
carl-bench what it does well -- feature names, defaults, `ContextSampler` -- and apply a context by
patching the compiled MuJoCo model in place at reset. `test_dali.py` checks that this is bit-identical
to CARL's XML route for walker.

    gravity            model.opt.gravity[2] = -g
    actuator_strength  model.actuator_gear[:, 0] = default_gear * s
    distance           string tendon range upper bound = d; ball body shifted up by (0.3 - d)

Public API (the context protocol itself -- features, ranges, sampling, grid -- lives in contexts.py and
is re-exported here; several envs stepped as one batch: vector_env.py):
    CONTEXT_FEATURES[task]                       feature name -> ContextFeature (defaults, ranges, grid)
    make_env(task, obs, contexts, seed, action_repeat) -> ContextualDMC   (a gymnasium.Env)
    train_contexts(task, setting, n, seed)       -> list[dict]           (training contexts)
    eval_contexts(task, setting)                 -> list[(dict, regime)] (zero-shot evaluation grid)
    normalize_context(task, context)             -> float32 array in [-1, 1] over the training range

Observations are dicts: "obs" (float32 features) or "image" (uint8 H x W x 3). The true context is *not*
in the observation, so that nothing wrapping the env leaks it to an agent by accident: it is in
`info["context"]` (the raw dict) and `info["context_vector"]` (normalised over the training range, float32),
where train.py reads it for the replay and hands it to the oracle baselines (cRSSM) alone.
`make_env(..., context_in_obs=True)` adds it to the observation as "context" for code that wants it there.
"""

from __future__ import annotations

import ctypes.util
import os
from typing import Literal

# MuJoCo picks its GL backend when dm_control is imported. EGL renders headless (llvmpipe on a CPU);
# when libEGL is missing but OSMesa is there, fall back to it rather than fail on the first render.
if "MUJOCO_GL" not in os.environ and not ctypes.util.find_library("EGL") and ctypes.util.find_library("OSMesa"):
    os.environ["MUJOCO_GL"] = "osmesa"
os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from dm_control import suite  # noqa: E402
from dm_control.mujoco.engine import Camera  # noqa: E402

from contexts import (  # noqa: E402  (re-exported: the public API of the environments)
    CONTEXT_FEATURES,
    DEFAULT_STRING_LENGTH,
    SETTINGS,
    ContextFeature,
    Regime,
    Setting,
    Task,
    carl,
    default_context,
    eval_contexts,
    normalize_context,
    regime,
    task_features,
    train_contexts,
    validate_context,
    varied_features,
)

ObsKind = Literal["features", "pixels"]
TASKS: dict[str, tuple[str, str]] = {"walker": ("walker", "walk"), "ball_in_cup": ("ball_in_cup", "catch")}
EPISODE_STEPS = 1000  # control steps per episode in both tasks (walker: 25 s / 0.025 s; cup: 20 s / 0.02 s)

__all__ = ["CONTEXT_FEATURES", "SETTINGS", "TASKS", "EPISODE_STEPS", "ContextFeature", "ContextualDMC", "carl",
           "default_context", "eval_contexts", "make_env", "normalize_context", "regime",
           "task_features", "train_contexts", "validate_context", "varied_features", "Regime", "Setting", "Task", "ObsKind"]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The environment
# ----------------------------------------------------------------------------------------------------


class ContextualDMC(gymnasium.Env):
    """One DMC task whose context is re-drawn at every reset, as a gymnasium.Env (passes
    gymnasium.utils.env_checker.check_env):

        obs, info = env.reset(seed=None, options=None)    # options={"context": {...}}: this episode's context
        obs, reward, terminated, truncated, info = env.step(action)   # action: float (A,) in action_space

    Each episode takes the next context of this env's own shuffled round robin over `contexts`
    (reshuffled every cycle), applied by patching the compiled model in place: no XML rebuild, no new GL
    context. `action_repeat` control steps per `step`, rewards summed. DMC tasks never terminate; the
    1000-step time limit is a truncation. Actions outside the action space are an error, not clipped.
    The true context is in `info`, not in the observation, unless `context_in_obs` (see the module doc).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        task: Task,
        obs: ObsKind = "features",
        contexts: list[dict] | None = None,
        seed: int = 0,
        action_repeat: int = 2,
        image_size: int = 64,
        camera_id: int = 0,
        context_in_obs: bool = False,
    ):
        if obs not in ("features", "pixels"):
            raise ValueError(f"unknown observation kind {obs!r}; choose 'features' or 'pixels'")
        if not isinstance(action_repeat, int) or action_repeat < 1:
            raise ValueError(f"action_repeat = {action_repeat!r}: must be an integer >= 1")
        self.task, self.obs_kind, self.action_repeat = task, obs, action_repeat
        self.features = task_features(task)
        contexts = [default_context(task)] if contexts is None else list(contexts)
        if not contexts:
            raise ValueError("contexts is an empty list; pass None for the default context")
        self.contexts = [validate_context(task, c) for c in contexts]

        domain, task_name = TASKS[task]
        self._env = suite.load(domain, task_name, task_kwargs={"random": seed})
        self.physics = self._env.physics
        model = self.physics.model
        # Defaults of every patched field, so a context is always applied to the pristine model.
        self._gear0 = model.actuator_gear[:, 0].copy()
        if task == "ball_in_cup":
            self._string = model.name2id("string", "tendon")
            self._ball = model.name2id("ball", "body")
            self._ball_pos0 = model.body_pos[self._ball].copy()
        self._camera = None
        if obs == "pixels":
            # The cheap look, set before the first render creates the GL context: no multisampling,
            # coarse built-in meshes, no shadows or reflections. ~40x faster than the default look at 64x64.
            model.vis.quality.offsamples = 0
            model.vis.quality.numslices, model.vis.quality.numstacks = 8, 4
            model.light_castshadow[:] = 0
            model.mat_reflectance[:] = 0
            self._camera = Camera(self.physics, height=image_size, width=image_size, camera_id=camera_id)

        spec = self._env.action_spec()
        self.action_low, self.action_high = spec.minimum.astype(np.float32), spec.maximum.astype(np.float32)
        self.action_size = int(spec.shape[0])
        self.obs_size = int(sum(int(np.prod(v.shape)) for v in self._env.observation_spec().values()))
        self.image_shape = (image_size, image_size, 3)
        self.control_timestep = float(self._env.control_timestep())  # seconds per control step (not per agent step)
        self.context_in_obs = context_in_obs
        spaces = gymnasium.spaces
        fields = {"image": spaces.Box(0, 255, self.image_shape, np.uint8)} if obs == "pixels" else {
            "obs": spaces.Box(-np.inf, np.inf, (self.obs_size,), np.float32)}  # fmt: skip
        if context_in_obs:
            fields["context"] = spaces.Box(-np.inf, np.inf, (len(self.features),), np.float32)
        self.observation_space = spaces.Dict(fields)
        self.action_space = spaces.Box(self.action_low, self.action_high, (self.action_size,), np.float32)
        self.render_mode = "rgb_array" if obs == "pixels" else None
        self.metadata = {**self.metadata, "render_fps": round(1 / (self.control_timestep * action_repeat))}
        self._seed_streams(seed)
        self._pre_reset_rng: dict | None = None
        self.context: dict[str, float] = self.contexts[0]
        self._needs_reset = True

    # -- contexts --------------------------------------------------------------------------------------

    def _seed_streams(self, seed: int) -> None:
        self._env.task.random.seed(seed)  # initial-state randomisation of the DMC task
        self._order_rng = np.random.default_rng(seed)  # the round robin's shuffles
        self._order: list[int] = []

    def _next_context(self) -> dict[str, float]:
        if not self._order:
            self._order = list(self._order_rng.permutation(len(self.contexts)))
        return self.contexts[self._order.pop(0)]

    def apply_context(self, context: dict) -> None:
        """Patch the compiled model in place to `context` (full or partial dict). Called at reset."""
        context = validate_context(self.task, context)
        model = self.physics.model
        model.opt.gravity[2] = -context["gravity"]
        if "actuator_strength" in context:
            model.actuator_gear[:, 0] = self._gear0 * context["actuator_strength"]
        if "distance" in context:
            d = context["distance"]
            model.tendon_range[self._string, 1] = d
            model.body_pos[self._ball] = self._ball_pos0 + np.array([0.0, 0.0, DEFAULT_STRING_LENGTH - d])
        # Recompute what the compiler derives from the patched fields at qpos0 (tendon_length0, com-relative
        # camera offsets, ...; ~20 us), so the model equals one compiled from the edited XML.
        mujoco.mj_setConst(model.ptr, self.physics.data.ptr)
        if "distance" in context:
            model.tendon_lengthspring[self._string] = model.tendon_length0[self._string]  # the compiler's rule
        self.context = context

    # -- gymnasium-style API ---------------------------------------------------------------------------

    def rng_state(self) -> dict:
        """The random streams as they were just before the latest reset (or now, if never reset).
        `set_rng_state` + `reset()` replays that reset exactly: train.py's exact resume."""
        return self._pre_reset_rng if self._pre_reset_rng is not None else self._current_rng()

    def set_rng_state(self, state: dict) -> None:
        self._env.task.random.set_state(tuple(state["task"]))
        self._order_rng.bit_generator.state = state["order_rng"]
        self._order = list(state["order"])

    def _current_rng(self) -> dict:
        order_rng = self._order_rng.bit_generator.state
        name, keys, pos, has_gauss, gauss = self._env.task.random.get_state()  # plain types: weights_only checkpoints
        task = (name, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss))
        return {"task": task, "order_rng": order_rng, "order": [int(i) for i in self._order]}

    def get_state(self) -> dict:
        """Everything that decides this env's future, mid-episode too: its random streams, the context, MuJoCo's
        integration state (time, qpos, qvel, act, the solver's warm start, ...) and the time limit's step count.
        Plain types only (weights_only checkpoints); `set_state` continues the episode bit-identically."""
        env = self._env
        return {
            "rng": self._current_rng(),
            "pre_reset_rng": self._pre_reset_rng,
            "context": dict(self.context),
            "integration": self.physics.get_state(mujoco.mjtState.mjSTATE_INTEGRATION).tolist(),
            "step_count": int(env._step_count),
            "needs_reset": bool(self._needs_reset),
        }

    def set_state(self, state: dict) -> None:
        """Continue from `get_state`'s snapshot (of an env of the same task and contexts)."""
        self.set_rng_state(state["rng"])
        self._pre_reset_rng = state["pre_reset_rng"]
        self.apply_context(state["context"])
        self.physics.set_state(np.asarray(state["integration"], np.float64), mujoco.mjtState.mjSTATE_INTEGRATION)
        # dm_control's step runs mj_step2 on the quantities the previous step's mj_step1 left: recompute them
        mujoco.mj_step1(self.physics.model.ptr, self.physics.data.ptr)
        self._env._step_count = state["step_count"]
        self._env._reset_next_step = self._needs_reset = state["needs_reset"]

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        """Start an episode in the next context of the round robin, or in options["context"] (a full or
        partial context dict; missing features take their defaults). `seed` reseeds this env's streams."""
        super().reset(seed=seed)
        unknown = set(options or {}) - {"context"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; the only option is 'context'")
        if seed is not None:
            self._seed_streams(seed)
        self._pre_reset_rng = self._current_rng()
        context = self._next_context()
        if options and options.get("context") is not None:
            context = {**default_context(self.task), **options["context"]}
        self.apply_context(context)
        time_step = self._env.reset()
        self._needs_reset = False
        return self._observe(time_step), self._info()

    def step(self, action) -> tuple[dict, float, bool, bool, dict]:
        if self._needs_reset:
            raise RuntimeError("step() called before reset() or after the episode ended; call reset() first")
        action = np.asarray(action, np.float64)
        if action.shape != (self.action_size,):
            raise ValueError(f"action shape {action.shape}: expected ({self.action_size},)")
        if (action < self.action_low).any() or (action > self.action_high).any() or not np.isfinite(action).all():
            raise ValueError(f"action {action.tolist()} outside the action space [{self.action_low[0]:g}, {self.action_high[0]:g}]^{self.action_size}")
        reward = 0.0
        for _ in range(self.action_repeat):
            time_step = self._env.step(action)
            reward += time_step.reward or 0.0
            if time_step.last():
                break
        truncated = time_step.last()  # the time limit; DMC's discount stays 1 there
        self._needs_reset = truncated
        return self._observe(time_step), float(reward), False, truncated, self._info()

    def _info(self) -> dict:
        return {"context": dict(self.context), "context_vector": normalize_context(self.task, self.context)}

    def _observe(self, time_step) -> dict[str, np.ndarray]:
        out = {}
        if self._camera is not None:
            out["image"] = self.render()
        else:
            out["obs"] = np.concatenate([np.asarray(v, np.float32).ravel() for v in time_step.observation.values()])
        if self.context_in_obs:
            out["context"] = normalize_context(self.task, self.context)
        return out

    def render(self) -> np.ndarray | None:
        """The current frame, (H, W, 3) uint8 (pixel envs; None for feature envs, which have no camera)."""
        if self._camera is None:
            return None
        # Camera.render returns a flipped view of a buffer it reuses: copy, or every stored frame would
        # silently become the latest one.
        return self._camera.render().copy()

    def close(self) -> None:
        self._camera = None  # its scene and GL buffers are freed with it


def make_env(
    task: Task,
    obs: ObsKind = "features",
    contexts: list[dict] | None = None,
    seed: int = 0,
    action_repeat: int = 2,
    image_size: int = 64,
    context_in_obs: bool = False,
) -> ContextualDMC:
    """A contextual DMC env; `contexts` is cycled one per episode (None: the default context)."""
    return ContextualDMC(task, obs, contexts, seed, action_repeat, image_size, context_in_obs=context_in_obs)
