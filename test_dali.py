"""Tests for the DALI reference implementation: real MuJoCo physics, no mocks, CPU only.

Run:  python -m pytest -q test_dali.py
Sections follow the files: envs.py (contextual DMC tasks with CARL semantics).
"""

from __future__ import annotations

import numpy as np
import pytest

import envs

# ----------------------------------------------------------------------------------------------------
# envs.py: contexts change the physics the right way
# ----------------------------------------------------------------------------------------------------


def _env(task, context, seed=0, **kw):
    return envs.make_env(task, contexts=[context], seed=seed, action_repeat=1, **kw)


@pytest.mark.parametrize("g", [0.98, 4.9, 9.81, 19.6])
def test_gravity_sets_ball_free_fall_acceleration(g):
    env = _env("ball_in_cup", {"gravity": g})
    env.reset()  # the ball starts at rest, string slack, no contact
    v0 = env.physics.named.data.qvel["ball_z"][0]
    env.step(np.zeros(2))
    a_z = (env.physics.named.data.qvel["ball_z"][0] - v0) / env.control_timestep
    assert a_z == pytest.approx(-g, rel=1e-6)


def test_stronger_gravity_makes_walker_torso_fall_faster():
    drops = []
    for g in [2.0, 9.81, 18.0]:
        env = _env("walker", {"gravity": g})
        env.reset()  # same seed: same initial pose for every gravity
        z0 = env.physics.named.data.xpos["torso", "z"]
        for _ in range(5):
            env.step(np.zeros(6))
        drops.append(z0 - env.physics.named.data.xpos["torso", "z"])
    assert 0 < drops[0] < drops[1] < drops[2]


def test_actuator_strength_scales_joint_response():
    """The same torque command moves the joints proportionally to actuator_strength."""
    response = {}
    for s in [0.5, 1.0, 2.0]:
        env = _env("walker", {"actuator_strength": s})
        env.reset()
        state = env.physics.get_state().copy()
        env.step(np.full(6, 0.5))
        pushed = env.physics.data.qvel[3:].copy()  # the 6 actuated joints
        env.physics.set_state(state)
        env.physics.forward()
        env.step(np.zeros(6))
        response[s] = np.linalg.norm(pushed - env.physics.data.qvel[3:])
    assert response[2.0] / response[1.0] == pytest.approx(2.0, rel=0.15)
    assert response[0.5] / response[1.0] == pytest.approx(0.5, rel=0.15)


def test_longer_string_hangs_ball_lower():
    hang = {}
    for d in [0.2, 0.3, 0.4]:
        env = _env("ball_in_cup", {"distance": d})
        env.reset()
        p = env.physics
        # Start the ball at rest 5 cm straight below the cup's string anchor; it falls until the string is taut.
        p.named.data.qpos["ball_x"] = 0.0
        p.named.data.qpos["ball_z"] = p.named.data.site_xpos["cup", "z"] - 0.05 - p.named.model.body_pos["ball", "z"]
        p.data.qvel[:] = 0
        p.forward()
        for _ in range(300):
            env.step(np.zeros(2))
        hang[d] = p.named.data.site_xpos["cup", "z"] - p.named.data.site_xpos["ball", "z"]
        assert hang[d] == pytest.approx(d, abs=0.01)
    assert hang[0.2] < hang[0.3] < hang[0.4]


# ----------------------------------------------------------------------------------------------------
# envs.py: faithful to CARL
# ----------------------------------------------------------------------------------------------------


def test_walker_feature_names_and_defaults_agree_with_carl():
    carl_features = envs.carl().envs.dmc.CARLDmcWalkerEnv.get_context_features()
    for name, feature in envs.CONTEXT_FEATURES["walker"].items():
        assert name in carl_features
        assert feature.default == carl_features[name].default_value


@pytest.mark.parametrize(
    "context",
    [
        {"gravity": 9.81, "actuator_strength": 1.0},
        {"gravity": 3.185, "actuator_strength": 1.7},
        {"gravity": 17.64, "actuator_strength": 0.3},
        {"gravity": 12.345678901, "actuator_strength": 0.7777777},
    ],
)
def test_walker_bit_identical_to_carl(context):
    """In-place patching equals CARL's rebuild-from-XML route, step for step, from the same state."""
    ours = _env("walker", context, seed=3)
    obs, _ = ours.reset()
    ref = envs.carl().envs.dmc.CARLDmcWalkerEnv(contexts={0: context})
    ref.reset()
    ref_physics = ref.env.env.physics  # CARLEnv -> MujocoToGymWrapper -> dm_control Environment
    ref_physics.set_state(ours.physics.get_state())
    ref_physics.forward()
    rng = np.random.default_rng(0)
    for _ in range(200):
        action = rng.uniform(-1, 1, 6)
        obs, reward, *_ = ours.step(action)
        ref_obs, ref_reward, *_ = ref.step(action)
        assert np.array_equal(ours.physics.get_state(), ref_physics.get_state())
        assert np.array_equal(obs["obs"], np.asarray(ref_obs["obs"], np.float32))
        assert reward == ref_reward


@pytest.mark.parametrize("context", [{"gravity": 5.0, "distance": 0.6}, {"gravity": 17.0, "distance": 0.06}])
def test_ball_in_cup_patch_equals_xml_route(context):
    """ball_in_cup is not in PyPI carl-bench: compare with the same edit made to the XML and compiled."""
    from dm_control.suite import ball_in_cup

    xml, assets = ball_in_cup.get_model_and_assets()
    d, g = context["distance"], context["gravity"]
    xml = xml.decode()
    xml = xml.replace('range="0 0.3"', f'range="0 {d!r}"')
    xml = xml.replace('<body name="ball" pos="0 0 .2">', f'<body name="ball" pos="0 0 {0.2 + (0.3 - d)!r}">')
    xml = xml.replace("<default>", f'<option gravity="0 0 {-g!r}"/><default>', 1)
    ref = ball_in_cup.Physics.from_xml_string(xml, assets).model.ptr
    ours = _env("ball_in_cup", context)
    ours.reset()
    model = ours.physics.model.ptr
    compared = 0
    for name in dir(model):
        value = getattr(model, name)
        if isinstance(value, np.ndarray) and value.dtype.kind in "fi":
            assert np.array_equal(value, getattr(ref, name)), name
            compared += 1
    assert compared > 50


# ----------------------------------------------------------------------------------------------------
# envs.py: episodes, seeds, pixels, batches
# ----------------------------------------------------------------------------------------------------


def _rollout(env, steps, seed=None):
    obs, info = env.reset(seed=seed)
    out, contexts = [obs["obs"]], [info["context"]]
    rng = np.random.default_rng(123)
    for _ in range(steps):
        obs, reward, term, trunc, info = env.step(rng.uniform(-1, 1, env.action_size))
        out.append(np.append(obs["obs"], reward))
        if term or trunc:
            obs, info = env.reset()
            contexts.append(info["context"])
    return out, contexts


def test_same_seed_same_trajectory_other_seed_other_trajectory():
    contexts = envs.train_contexts("ball_in_cup", "double_box", n=10, seed=0)
    a, ctx_a = _rollout(envs.make_env("ball_in_cup", contexts=contexts, seed=7, action_repeat=8), 300)
    b, ctx_b = _rollout(envs.make_env("ball_in_cup", contexts=contexts, seed=7, action_repeat=8), 300)
    c, ctx_c = _rollout(envs.make_env("ball_in_cup", contexts=contexts, seed=8, action_repeat=8), 300)
    assert len(ctx_a) == 3  # 300 steps of 8 control steps cross two episode boundaries
    assert ctx_a == ctx_b and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert ctx_a != ctx_c and not np.array_equal(a[0], c[0])
    # reset(seed=...) restarts both streams (initial states and context order)
    env = envs.make_env("ball_in_cup", contexts=contexts, seed=0, action_repeat=8)
    d, ctx_d = _rollout(env, 10, seed=7)
    assert ctx_d[0] == ctx_a[0] and all(np.array_equal(x, y) for x, y in zip(d, a[:11]))


def test_episode_length_truncation_and_action_repeat_reward():
    for repeat in [1, 2]:
        env = envs.make_env("walker", seed=0, action_repeat=repeat)
        env.reset()
        for t in range(envs.EPISODE_STEPS // repeat):
            _, _, term, trunc, _ = env.step(np.zeros(6))
            assert not term  # DMC never terminates: the time limit is a truncation
            assert trunc == (t == envs.EPISODE_STEPS // repeat - 1)
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(6))
    # action repeat sums the rewards of the repeated control steps
    one, two = envs.make_env("walker", seed=5, action_repeat=1), envs.make_env("walker", seed=5, action_repeat=2)
    one.reset(), two.reset()
    action = np.full(6, 0.3)
    r1 = sum(one.step(action)[1] for _ in range(2))
    assert two.step(action)[1] == pytest.approx(r1, rel=1e-12) and r1 > 0


def test_round_robin_visits_every_context_once_per_cycle():
    contexts = envs.train_contexts("walker", "single_0", n=5, seed=0)
    env = envs.make_env("walker", contexts=contexts, seed=0)
    seen = [env.reset()[1]["context"]["gravity"] for _ in range(15)]
    for cycle in range(3):
        assert sorted(seen[5 * cycle : 5 * cycle + 5]) == sorted(c["gravity"] for c in contexts)
    assert seen[:5] != seen[5:10]  # reshuffled every cycle


def test_observation_holds_normalized_true_context():
    env = _env("walker", {"gravity": 4.9, "actuator_strength": 1.5})
    obs, info = env.reset()
    assert obs["obs"].dtype == np.float32 and obs["obs"].shape == (24,)
    np.testing.assert_allclose(obs["context"], [-1.0, 1.0], atol=1e-6)
    assert info["context"] == {"gravity": 4.9, "actuator_strength": 1.5}
    obs, *_ = env.step(np.zeros(6))
    np.testing.assert_allclose(obs["context"], [-1.0, 1.0], atol=1e-6)
    assert envs.normalize_context("ball_in_cup", {"gravity": 9.8, "distance": 0.3}) == pytest.approx([0, 0], abs=1e-6)


def test_pixels_shape_change_over_episode_and_differ_between_contexts():
    frames = {}
    for d in [0.15, 0.6]:
        env = envs.make_env("ball_in_cup", obs="pixels", contexts=[{"distance": d}], seed=0)
        obs, _ = env.reset()
        assert set(obs) == {"image", "context"}
        assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
        first = obs["image"]
        for _ in range(20):
            obs, *_ = env.step(np.array([1.0, 0.0]))
        assert np.abs(obs["image"].astype(int) - first).sum() > 0  # the scene moves
        frames[d] = first
    assert np.abs(frames[0.15].astype(int) - frames[0.6]).sum() > 0  # same seed, other string: other picture


def test_vector_env_batches_and_auto_resets():
    vec = envs.VectorEnv([envs.make_env("ball_in_cup", seed=i, action_repeat=4) for i in range(3)])
    obs, info = vec.reset()
    assert obs["obs"].shape == (3, 8) and obs["context"].shape == (3, 2) and obs["is_first"].all()
    assert not np.array_equal(obs["obs"][0], obs["obs"][1])  # envs are seeded apart
    for t in range(envs.EPISODE_STEPS // 4):
        obs, rew, term, trunc, info = vec.step(np.zeros((3, 2)))
        assert rew.shape == (3,) and not term.any()
        assert obs["is_first"].all() == trunc.all() == (t == envs.EPISODE_STEPS // 4 - 1)
    assert sorted(info["final_obs"]) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------
# envs.py: training contexts and the evaluation grid
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["walker", "ball_in_cup"])
def test_evaluation_grid_sizes_and_regimes(task):
    from collections import Counter

    grid = envs.eval_contexts(task, "double_box")
    assert len(grid) == 84
    assert Counter(r for _, r in grid) == {"interpolation": 13, "extrapolation": 30, "mixed": 41}
    assert len({tuple(c.values()) for c, _ in grid}) == 84  # no duplicates
    assert (envs.default_context(task), "interpolation") in grid
    name0, name1 = envs.CONTEXT_FEATURES[task]
    f0, f1 = envs.CONTEXT_FEATURES[task].values()
    assert sum(c[name1] == f1.default for c, _ in grid) == 15
    assert sum(c[name0] == f0.default for c, _ in grid) == 14  # 13 + the all-default context
    single0 = envs.eval_contexts(task, "single_0")
    assert len(single0) == 14 and Counter(r for _, r in single0) == {"interpolation": 4, "extrapolation": 10}
    assert all(c[name1] == f1.default and c[name0] != f0.default for c, _ in single0)
    single1 = envs.eval_contexts(task, "single_1")
    assert len(single1) == 13 and Counter(r for _, r in single1) == {"interpolation": 4, "extrapolation": 9}


def test_train_contexts_sampled_in_range_and_seeded():
    contexts = envs.train_contexts("ball_in_cup", "double_box", n=100, seed=0)
    assert len(contexts) == 100 and len({c["gravity"] for c in contexts}) == 100
    assert all(4.9 <= c["gravity"] <= 14.7 and 0.15 <= c["distance"] <= 0.45 for c in contexts)
    assert contexts == envs.train_contexts("ball_in_cup", "double_box", n=100, seed=0)
    assert contexts != envs.train_contexts("ball_in_cup", "double_box", n=100, seed=1)
    single = envs.train_contexts("walker", "single_1", n=20, seed=0)
    assert all(c["gravity"] == 9.81 and 0.5 <= c["actuator_strength"] <= 1.5 for c in single)
    assert envs.train_contexts("walker", "default") == [{"gravity": 9.81, "actuator_strength": 1.0}]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: envs.make_env("cartpole"), "unknown task 'cartpole'.*ball_in_cup.*walker"),
        (lambda: envs.make_env("walker", contexts=[{"distance": 0.3}]), "no context feature 'distance'.*gravity.*actuator_strength"),
        (lambda: envs.make_env("walker", contexts=[{"gravity": float("nan")}]), "'gravity' = nan.*finite"),
        (lambda: envs.make_env("walker", contexts=[{"gravity": 0.0}]), "'gravity' = 0.0.*> 0"),
        (lambda: envs.make_env("ball_in_cup", contexts=[{"gravity": -9.81}]), "'gravity' = -9.81.*> 0"),
        (lambda: envs.make_env("walker", contexts=[{"actuator_strength": -0.1}]), "'actuator_strength' = -0.1.*>= 0"),
        (lambda: envs.make_env("ball_in_cup", contexts=[{"distance": 0.0}]), "'distance' = 0.0.*> 0"),
        (lambda: envs.make_env("ball_in_cup", contexts=[{"distance": float("inf")}]), "'distance' = inf"),
        (lambda: envs.make_env("walker", obs="rgb"), "'rgb'.*features.*pixels"),
        (lambda: envs.make_env("walker", action_repeat=0), "action_repeat = 0"),
        (lambda: envs.train_contexts("walker", "single_2"), "'single_2'.*double_box"),
        (lambda: envs.eval_contexts("hopper", "default"), "unknown task 'hopper'"),
    ],
)
def test_bad_input_raises_naming_value_and_allowed(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_zero_actuator_strength_is_allowed():
    env = _env("walker", {"actuator_strength": 0.0})
    env.reset()
    assert np.all(env.physics.model.actuator_gear[:, 0] == 0)
