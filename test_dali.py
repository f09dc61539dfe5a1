"""Tests for the DALI reference implementation: real MuJoCo physics, no mocks, CPU only.

Run:  python -m pytest -q test_dali.py
Sections follow the files: envs.py (contextual DMC tasks with CARL semantics).
"""

from __future__ import annotations

import numpy as np
import pytest

import envs
from vector_env import VectorEnv

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


def test_true_context_is_in_info_not_in_the_observation():
    env = _env("walker", {"gravity": 4.9, "actuator_strength": 1.5})
    obs, info = env.reset()
    assert set(obs) == {"obs"} and obs["obs"].dtype == np.float32 and obs["obs"].shape == (24,)
    np.testing.assert_allclose(info["context_vector"], [-1.0, 1.0], atol=1e-6)
    assert info["context"] == {"gravity": 4.9, "actuator_strength": 1.5}
    obs, _, _, _, info = env.step(np.zeros(6))
    np.testing.assert_allclose(info["context_vector"], [-1.0, 1.0], atol=1e-6)
    assert envs.normalize_context("ball_in_cup", {"gravity": 9.8, "distance": 0.3}) == pytest.approx([0, 0], abs=1e-6)
    visible = envs.make_env("walker", contexts=[{"gravity": 4.9, "actuator_strength": 1.5}], context_in_obs=True)
    obs, _ = visible.reset()
    np.testing.assert_allclose(obs["context"], [-1.0, 1.0], atol=1e-6)  # only where asked for


@pytest.mark.parametrize("obs", ["features", "pixels"])
def test_env_is_a_gymnasium_env_that_passes_check_env(obs):
    import gymnasium
    from gymnasium.utils.env_checker import check_env

    env = envs.make_env("ball_in_cup", obs, envs.train_contexts("ball_in_cup", "single_0", 5), seed=0)
    assert isinstance(env, gymnasium.Env)
    check_env(env, skip_render_check=obs == "features")
    o, info = env.reset(seed=3, options={"context": {"gravity": 2.0}})
    assert info["context"] == {"gravity": 2.0, "distance": 0.3} and env.observation_space.contains(o)
    assert env.action_space.shape == (2,) and env.action_space.low.min() == -1 and env.action_space.high.max() == 1
    with pytest.raises(ValueError, match=r"action \[1.5, 0.0\] outside the action space \[-1, 1\]"):
        env.step(np.array([1.5, 0.0]))
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"gravity": 2.0})
    wrapped = gymnasium.wrappers.RecordEpisodeStatistics(env)  # standard wrappers work
    wrapped.reset(seed=0)
    assert "obs" in wrapped.step(np.zeros(2))[0] or obs == "pixels"


def test_pixels_shape_change_over_episode_and_differ_between_contexts():
    frames = {}
    for d in [0.15, 0.6]:
        env = envs.make_env("ball_in_cup", obs="pixels", contexts=[{"distance": d}], seed=0)
        obs, _ = env.reset()
        assert set(obs) == {"image"}  # the true context is in info, not in the observation
        assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
        first = obs["image"]
        for _ in range(20):
            obs, *_ = env.step(np.array([1.0, 0.0]))
        assert np.abs(obs["image"].astype(int) - first).sum() > 0  # the scene moves
        frames[d] = first
    assert np.abs(frames[0.15].astype(int) - frames[0.6]).sum() > 0  # same seed, other string: other picture


def test_vector_env_batches_and_auto_resets():
    vec = VectorEnv([envs.make_env("ball_in_cup", seed=i, action_repeat=4) for i in range(3)])
    obs, info = vec.reset()
    assert obs["obs"].shape == (3, 8) and info["context_vector"].shape == (3, 2) and obs["is_first"].all() and "context" not in obs
    assert not np.array_equal(obs["obs"][0], obs["obs"][1])  # envs are seeded apart
    for t in range(envs.EPISODE_STEPS // 4):
        obs, rew, term, trunc, info = vec.step(np.zeros((3, 2)))
        assert rew.shape == (3,) and not term.any()
        assert obs["is_first"].all() == trunc.all() == (t == envs.EPISODE_STEPS // 4 - 1)
    assert sorted(info["final_obs"]) == sorted(info["final_context_vector"]) == [0, 1, 2]


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


def test_reward_belongs_to_the_observation_it_arrives_with():
    """One convention everywhere: step() returns o_{t+1} with r_{t+1} = reward of the state o_{t+1} shows."""
    env = envs.make_env("walker", seed=0, action_repeat=1)
    env.reset()
    for _ in range(20):
        _, reward, *_ = env.step(np.full(6, 0.2))
        assert reward == env._env.task.get_reward(env.physics)


# ----------------------------------------------------------------------------------------------------
# rssm.py, world_model.py, actor_critic.py and dali.py: the DreamerV3 maths
# ----------------------------------------------------------------------------------------------------

import copy  # noqa: E402
import dataclasses  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)  # robust beside other jobs: spin-waiting threads collapse on a busy machine

import actor_critic  # noqa: E402
import context_encoder  # noqa: E402
import context_window  # noqa: E402
import cross_modal  # noqa: E402
import dali  # noqa: E402
import layers  # noqa: E402
import rssm  # noqa: E402
import checkpoint  # noqa: E402
import config  # noqa: E402
import train  # noqa: E402

TINY_RSSM = rssm.RSSMConfig(deter=32, hidden=32, stoch=4, classes=4)
TINY_AGENT = dict(hidden=32, layers=1, cnn_depth=4)


def test_symlog_symexp_inverse():
    x = torch.tensor([-1e6, -100.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 100.0, 1e6], dtype=torch.float64)
    torch.testing.assert_close(layers.symexp(layers.symlog(x)), x)
    torch.testing.assert_close(layers.symlog(layers.symexp(x[2:-2])), x[2:-2])


def test_twohot_round_trip_and_loss_minimum():
    bins = torch.linspace(-20, 20, 255, dtype=torch.float64)
    x = torch.empty(1000, dtype=torch.float64).uniform_(-19.9, 19.9)
    enc = layers.twohot(x, bins)
    assert torch.allclose(enc.sum(-1), torch.ones(1000, dtype=torch.float64))
    assert ((enc > 0).sum(-1) <= 2).all()
    torch.testing.assert_close((enc * bins).sum(-1), x)  # decode(encode(x)) == x
    # the loss is minimised by logits that put the two-hot mass on the target: mean recovers the target
    target = torch.tensor([3.7, -250.0, 0.0], dtype=torch.float64)
    logits = torch.log(layers.twohot(layers.symlog(target), bins) + 1e-12)
    torch.testing.assert_close(layers.twohot_mean(logits, bins), target, rtol=1e-6, atol=1e-6)


def test_lambda_return_equals_naive_n_step_expansion():
    torch.manual_seed(0)
    H, N, lam = 6, 5, 0.8
    reward, disc, value = torch.randn(H, N), torch.rand(H, N), torch.randn(H + 1, N)
    ret = actor_critic.lambda_return(reward, disc, value, lam)

    def n_step(t, n):  # G_t^(n) = sum_k (prod_{j<k} d_{t+j}) r_{t+k} + (prod_{j<n} d_{t+j}) v_{t+n}
        g, p = torch.zeros(N), torch.ones(N)
        for k in range(n):
            g = g + p * reward[t + k]
            p = p * disc[t + k]
        return g + p * value[t + n]

    for t in range(H):
        m = H - t
        naive = sum((1 - lam) * lam ** (n - 1) * n_step(t, n) for n in range(1, m)) + lam ** (m - 1) * n_step(t, m)
        torch.testing.assert_close(ret[t], naive)


def test_kl_free_bits_and_stop_gradients():
    torch.manual_seed(0)
    post = torch.randn(2, 3, 4, 5, requires_grad=True)
    prior = torch.randn(2, 3, 4, 5, requires_grad=True)
    lp, lq = torch.log_softmax(post, -1), torch.log_softmax(prior, -1)
    dyn, rep = rssm.kl_loss(lp, lq, free=1.0)
    manual = (lp.exp() * (lp - lq)).sum((-2, -1))
    torch.testing.assert_close(dyn, manual.clamp(min=1.0))
    torch.testing.assert_close(rep, manual.clamp(min=1.0))
    same_dyn, same_rep = rssm.kl_loss(lp, lp, free=1.0)
    assert (same_dyn == 1.0).all() and (same_rep == 1.0).all()  # below free bits: clipped to 1 nat
    (g_post,) = torch.autograd.grad(dyn.sum(), post, retain_graph=True, allow_unused=True)
    assert g_post is None or g_post.abs().sum() == 0  # dyn trains only the prior
    (g_prior,) = torch.autograd.grad(rep.sum(), prior, allow_unused=True)
    assert g_prior is None or g_prior.abs().sum() == 0  # rep trains only the posterior


def test_fast_observe_equals_stepping_obs_step():
    """rssm.observe precomputes input projections and the prior outside its loop: it must equal the
    straightforward loop over obs_step (same random numbers), in values and in gradients."""
    torch.manual_seed(0)
    model = rssm.RSSM(TINY_RSSM, embed=7, action=3, ctx_seq=2, ctx_post=5).double()
    B, T = 3, 9
    embed = torch.randn(B, T, 7, dtype=torch.float64, requires_grad=True)
    action, cs, cp = torch.randn(B, T, 3).double(), torch.randn(B, T, 2).double(), torch.randn(B, T, 5).double()
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = is_first[1, 4] = True
    torch.manual_seed(1)
    post, prior = model.observe(embed, action, is_first, ctx_seq=cs, ctx_post=cp)
    torch.manual_seed(1)
    state, ref_post, ref_prior = model.initial(B), [], []
    for t in range(T):
        state, p = model.obs_step(state, action[:, t], embed[:, t], is_first[:, t], cs[:, t], cp[:, t])
        ref_post.append(state)
        ref_prior.append(p)
    for k in ("deter", "stoch", "logits"):
        torch.testing.assert_close(post[k], torch.stack([s[k] for s in ref_post], 1))
    for k in ("deter", "logits"):
        torch.testing.assert_close(prior[k], torch.stack([s[k] for s in ref_prior], 1))
    loss = lambda po, pr: (po["logits"].exp() * (po["logits"] - pr["logits"])).sum() + po["stoch"].square().sum()  # noqa: E731
    (fast,) = torch.autograd.grad(loss(post, prior), embed)
    ref = {k: torch.stack([s[k] for s in ref_post], 1) for k in ("stoch", "logits")}
    (slow,) = torch.autograd.grad(loss(ref, {"logits": torch.stack([s["logits"] for s in ref_prior], 1)}), embed)
    torch.testing.assert_close(fast, slow)


def test_rssm_shapes_and_is_first_resets_state():
    torch.manual_seed(0)
    model = rssm.RSSM(TINY_RSSM, embed=7, action=3)
    B, T = 2, 6
    embed, action = torch.randn(B, T, 7), torch.randn(B, T, 3)
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = is_first[0, 3] = True
    post, prior = model.observe(embed, action, is_first)
    assert post["deter"].shape == (B, T, 32) and post["stoch"].shape == (B, T, 16) and post["logits"].shape == (B, T, 4, 4)
    assert model.feat(post).shape == (B, T, model.feat_size)
    # Where is_first, h_t forgets the past: equal to a fresh sequence started at t
    fresh, _ = model.observe(embed[:, 3:], action[:, 3:], torch.ones(B, T - 3, dtype=torch.bool))
    torch.testing.assert_close(post["deter"][0, 3], fresh["deter"][0, 0])
    assert not torch.allclose(post["deter"][1, 3], fresh["deter"][1, 0])
    states, actions = model.imagine({k: v[:, -1] for k, v in post.items()}, lambda s: torch.tanh(s["deter"][:, :3]), horizon=5)
    assert states["deter"].shape == (6, B, 32) and states["stoch"].shape == (6, B, 16) and actions.shape == (6, B, 3)


def _agent(context="none", integration="shallow", obs="features", ctx_window=4, **kw):
    spaces = dali.Spaces(action=2, obs=8 if obs == "features" else 0, image=(64, 64, 3) if obs == "pixels" else None, context=2)
    cfg = dali.AgentConfig(context=context, integration=integration, **{**TINY_AGENT, **kw})
    ctx_cfg = context_encoder.ContextEncoderConfig(window=ctx_window, units=16, heads=2, fd_units=16)
    return dali.Agent(cfg, TINY_RSSM, spaces, ctx_cfg)


def _batch(B=3, T=8, obs="features", seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "action": torch.rand(B, T, 2, generator=g) * 2 - 1,
        "reward": torch.rand(B, T, generator=g),
        "is_first": torch.zeros(B, T, dtype=torch.bool),
        "is_terminal": torch.zeros(B, T, dtype=torch.bool),
        "context": torch.rand(B, T, 2, generator=g) * 2 - 1,
    }
    batch["is_first"][:, 0] = True
    batch["step"] = dali.episode_steps(batch["is_first"])  # (recount after changing is_first)
    if obs == "features":
        batch["obs"] = torch.randn(B, T, 8, generator=g)
    else:
        batch["image"] = torch.randint(0, 256, (B, T, 64, 64, 3), generator=g, dtype=torch.uint8)
    return batch


@pytest.mark.parametrize("obs", ["features", "pixels"])
def test_update_changes_every_parameter_and_loss_keys_match_scales(obs):
    torch.manual_seed(0)
    agent = _agent("oracle", "deep", obs)
    before = {k: v.detach().clone() for k, v in agent.named_parameters()}
    losses, _ = agent.wm.loss(_batch(obs=obs), *agent.context(_batch(obs=obs))[:2])
    assert losses.keys() == agent.wm.loss_scales.keys()
    # two updates: the zero-initialised output layers of reward head and critic block gradients to their
    # hidden layers on the first one
    for seed in range(2):
        metrics = agent.update(_batch(obs=obs, seed=seed))
    assert all(torch.isfinite(v) for v in metrics.values())
    unchanged = [k for k, v in agent.named_parameters() if v.requires_grad and torch.equal(v, before[k])]
    assert unchanged == []
    assert not torch.equal(agent.ac.slow_critic[-1].weight, torch.zeros_like(agent.ac.slow_critic[-1].weight))


@pytest.mark.parametrize("integration", ["shallow", "deep"])
def test_context_unaware_agent_ignores_true_context_and_oracle_reads_it(integration):
    for context, should_change in [("none", False), ("learned", False), ("oracle", True)]:
        torch.manual_seed(0)
        agent = _agent(context, integration, ctx_window=4)
        batch = _batch(T=8 + agent.context_prefix)
        garbage = {**batch, "context": torch.full_like(batch["context"], 123.0)}
        outputs = []
        for b in (batch, garbage):
            torch.manual_seed(1)
            ctx, seq_ctx, _ = agent.context(b)
            losses, post = agent.wm.loss({k: v[:, agent.context_prefix :] for k, v in b.items()}, ctx, seq_ctx)
            state, actions = agent.initial_state(3), []
            for t in range(4):  # a few steps, so a learned agent's window fills
                obs = {"obs": b["obs"][:, t], "context": b["context"][:, t], "is_first": b["is_first"][:, t]}
                action, state = agent.act(obs, state, sample=False, context=b["context"][:, t])
                actions.append(action.flatten())
            outputs.append(torch.cat([torch.stack([v.sum() for v in losses.values()]), *actions]))
        assert (not torch.equal(*outputs)) == should_change, context


def test_agent_checkpoint_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    agent = _agent("oracle", "deep")
    agent.update(_batch())
    checkpoint.save_checkpoint(tmp_path / "a.pt", {"agent": agent.state_dict()})
    clone = _agent("oracle", "deep")
    clone.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True)["agent"])
    b = _batch(seed=5)
    obs = {"obs": b["obs"][:, 0], "context": b["context"][:, 0], "is_first": b["is_first"][:, 0]}
    for model in (agent, clone):
        torch.manual_seed(3)
        model.out = (model.act(obs, model.initial_state(3), sample=True, context=b["context"][:, 0])[0], model.wm.loss(b, *model.context(b)[:2])[0]["dec"])
    torch.testing.assert_close(agent.out, clone.out, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# The recipe, against references written out from the papers (DreamerV3 2023, DALI): each test fails when a
# plausible one-line error (a sign, a stop-gradient, a constant, an off-by-one) enters the recipe.
# ----------------------------------------------------------------------------------------------------


def test_defaults_are_the_papers_constants():
    """DreamerV3 (2023) Table B.1 and DALI App. B; a wrong constant here is a wrong recipe everywhere."""
    cfg, r, c = dali.AgentConfig(), rssm.RSSMConfig(), context_encoder.ContextEncoderConfig()
    paper = dict(horizon=15, return_horizon=333.0, lam=0.95, entropy=3e-4, free_nats=1.0, dyn_scale=0.5, rep_scale=0.1,
                 slow_critic_fraction=0.02, slow_critic_reg=1.0, retnorm_decay=0.99, model_lr=1e-4, model_eps=1e-8,
                 model_clip=1000.0, ac_lr=3e-5, ac_eps=1e-5, ac_clip=100.0, imag_starts=0)  # fmt: skip
    assert {k: getattr(cfg, k) for k in paper} == paper
    assert (r.stoch, r.classes, r.unimix, r.norm_eps) == (32, 32, 0.01, 1e-3)
    assert (c.window, c.dim) == (64, 8)
    agent = _agent()
    torch.testing.assert_close(agent.wm.bins, torch.linspace(-20, 20, 255))
    torch.testing.assert_close(agent.ac.bins, torch.linspace(-20, 20, 255))
    assert agent.wm.loss_scales == {"dec": 1.0, "rew": 1.0, "cont": 1.0, "dyn": 0.5, "rep": 0.1}
    assert torch.equal(agent.wm.reward_head[-1].weight, torch.zeros_like(agent.wm.reward_head[-1].weight))  # zero-initialised
    assert torch.equal(agent.ac.critic[-1].weight, torch.zeros_like(agent.ac.critic[-1].weight))


def _layer_norm(x, norm):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, 1e-3)


def _reference_prior_step(model, deter, stoch, action):
    """DreamerV3's sequence model and prior written out (2023, App. B): Dense(z, a) -> GRU with LayerNorm on
    the gates [reset, candidate, update] and update-gate bias -1 -> Dense -> logits of S x C categoricals,
    mixed with 1% uniform."""
    silu, sig = torch.nn.functional.silu, torch.sigmoid
    x = silu(_layer_norm(torch.cat([stoch, action], -1) @ model.img_in[0].weight.T, model.img_in[1]))
    D = deter.shape[-1]
    gates = _layer_norm(torch.cat([x, deter], -1) @ model.gru.weight.T, model.gru_norm)
    reset, cand, update = sig(gates[:, :D]), gates[:, D : 2 * D], sig(gates[:, 2 * D :] - 1.0)
    deter = update * torch.tanh(reset * cand) + (1 - update) * deter
    hidden = silu(_layer_norm(deter @ model.img_out[0][0].weight.T, model.img_out[0][1]))
    raw = (hidden @ model.img_out[1].weight.T + model.img_out[1].bias).unflatten(-1, (TINY_RSSM.stoch, TINY_RSSM.classes))
    probs = 0.99 * torch.softmax(raw, -1) + 0.01 / TINY_RSSM.classes
    return deter, probs.log()


def test_prior_step_equals_dreamerv3_written_out_and_samples_its_distribution():
    torch.manual_seed(0)
    model = rssm.RSSM(TINY_RSSM, embed=7, action=3).double()
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0, so that they count
        for norm in (model.img_in[1], model.gru_norm, model.img_out[0][1]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    B, S, C = 64, TINY_RSSM.stoch, TINY_RSSM.classes
    deter = torch.randn(B, TINY_RSSM.deter, dtype=torch.float64)
    stoch = torch.nn.functional.one_hot(torch.randint(0, C, (B, S)), C).double().flatten(-2)
    action = torch.rand(B, 3, dtype=torch.float64) * 2 - 1
    out = model.img_step({"deter": deter, "stoch": stoch}, action)
    ref_deter, ref_logits = _reference_prior_step(model, deter, stoch, action)
    torch.testing.assert_close(out["deter"], ref_deter)
    torch.testing.assert_close(out["logits"], ref_logits)
    # samples are one-hot, distributed as the (unimix) probabilities, with straight-through gradients
    logits = ref_logits[:1].expand(20000, S, C)
    samples = model._sample(logits).unflatten(-1, (S, C))
    values = samples.detach()  # one-hot up to rounding: onehot + probs - sg(probs)
    torch.testing.assert_close(values, values.round(), rtol=0, atol=1e-12)
    assert (values.round().sum(-1) == 1).all()
    torch.testing.assert_close(samples.mean(0), logits[0].exp(), atol=0.015, rtol=0)
    raw = torch.randn(S * C, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(S * C, dtype=torch.float64)
    (grad,) = torch.autograd.grad((model._sample(model._dist_logits(raw)) * probe).sum(), raw)
    (expected,) = torch.autograd.grad((model._dist_logits(raw).exp().flatten() * probe).sum(), raw)
    torch.testing.assert_close(grad, expected)


def test_an_episode_start_ignores_the_previous_state_and_action():
    """At is_first, h_t restarts from the learned initial state with a zeroed previous action (DreamerV3), in
    the sequence loop (observe), the single step (obs_step, used when acting) and their agreement."""
    torch.manual_seed(0)
    model = rssm.RSSM(TINY_RSSM, embed=7, action=3)
    B, T = 2, 6
    embed, action = torch.randn(B, T, 7), torch.randn(B, T, 3)
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = is_first[:, 3] = True
    zeroed = action.clone()
    zeroed[is_first] = 0.0
    torch.manual_seed(1)
    post, _ = model.observe(embed, action, is_first)
    torch.manual_seed(1)
    ref, _ = model.observe(embed, zeroed, is_first)
    for k in post:
        torch.testing.assert_close(post[k], ref[k])
    fresh = model.initial(B)
    torch.manual_seed(2)
    stepped, _ = model.obs_step({k: v[:, 2] for k, v in post.items()}, action[:, 3], embed[:, 3], is_first[:, 3])
    torch.manual_seed(2)
    start, _ = model.obs_step(fresh, torch.zeros(B, 3), embed[:, 3], torch.zeros(B, dtype=torch.bool))
    for k in stepped:
        torch.testing.assert_close(stepped[k], start[k])
    # and an is_first step does depend on its embedding
    torch.manual_seed(2)
    other, _ = model.obs_step(fresh, torch.zeros(B, 3), embed[:, 3] + 1, torch.zeros(B, dtype=torch.bool))
    assert not torch.allclose(other["logits"], start["logits"])


def test_world_model_loss_weights_the_papers_terms():
    torch.manual_seed(0)
    agent = _agent()
    metrics = agent.update(_batch())
    m = {k: float(v) for k, v in metrics.items()}
    total = m["wm/dec"] + m["wm/rew"] + m["wm/cont"] + 0.5 * m["wm/dyn"] + 0.1 * m["wm/rep"]
    assert m["wm/loss"] == pytest.approx(total, rel=1e-5)
    assert m["wm/dyn"] >= 1.0 and m["wm/rep"] >= 1.0  # free bits


def test_return_normaliser_tracks_the_5_to_95_percentile_range():
    """DreamerV3 eq. 11: S = max(1, EMA_0.99(P95) - EMA_0.99(P5)), the EMAs starting at 0."""
    norm = actor_critic.ReturnNorm(0.99)
    returns = torch.linspace(0, 100, 1001)  # P5 = 5, P95 = 95
    scales = [float(norm(returns)) for _ in range(600)]
    assert scales[0] == 1.0  # 0.01 * 90 < 1: the floor
    assert scales[99] == pytest.approx(90 * (1 - 0.99**100), rel=1e-4)
    assert scales[-1] == pytest.approx(90 * (1 - 0.99**600), rel=1e-4)
    assert float(norm.lo) == pytest.approx(5 * (1 - 0.99**600), rel=1e-4)
    small = actor_critic.ReturnNorm(0.99)
    assert all(float(small(torch.linspace(0, 0.5, 101))) == 1.0 for _ in range(300))  # narrow returns: S = 1


def _randomise_heads(agent, seed=0):
    """Zero-initialised reward head and critic predict 0 everywhere; give them outputs that vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (agent.wm.reward_head, agent.ac.critic, agent.ac.slow_critic):
            head[-1].weight.copy_(torch.randn(head[-1].weight.shape, generator=g) * 0.3)
        agent.wm.cont_head[-1].bias.fill_(0.3)


def _reference_imagination(agent, post, is_terminal, lo, hi):
    """DreamerV3's (2023) imagination and actor-critic losses, written out step by step from the paper and
    the 2023 code: actions scaled into [-1, 1] by a * sg(1 / max(1, |a|)); rewards, values and the continue
    head's mode on the imagined states; lambda-returns (eq. 7); weights = cumprod(gamma c) starting at the
    start state's continue flag; S from EMAs of the 5th/95th percentiles; actor loss -w ((R - v) / S + eta H)
    with the gradient through R and v (backprop); critic: two-hot cross-entropy to sg(R) and to the slow
    critic's value."""
    H, lam, gamma, eta = agent.cfg.horizon, 0.95, 1 - 1 / 333, 3e-4
    bins = torch.linspace(-20, 20, 255)
    mean = lambda logits: layers.symexp((torch.softmax(logits, -1) * bins).sum(-1))  # noqa: E731
    state = {k: post[k].detach().flatten(0, 1) for k in ("deter", "stoch")}
    feats, entropy = [], []
    for t in range(H + 1):
        feat = torch.cat([state["deter"], state["stoch"]], -1)
        feats.append(feat)
        dist = agent.ac.actor(feat.detach())
        entropy.append(dist.entropy().sum(-1))
        a = dist.rsample()
        a = a * (1 / torch.clamp(a.abs(), min=1)).detach()
        if t < H:
            state = agent.wm.rssm.img_step(state, a)
    feat = torch.stack(feats)  # (H+1, N, F)
    reward, value = mean(agent.wm.reward_head(feat[1:])).squeeze(-1), mean(agent.ac.critic(feat))
    cont = (agent.wm.cont_head(feat[1:]).squeeze(-1) > 0).float()
    returns = [value[H]]
    for t in reversed(range(H)):  # R_t = r_{t+1} + gamma c_{t+1} ((1 - lam) v_{t+1} + lam R_{t+1})
        returns.insert(0, reward[t] + gamma * cont[t] * ((1 - lam) * value[t + 1] + lam * returns[0]))
    ret = torch.stack(returns[:-1])
    weight = [1.0 - is_terminal.flatten().float()]
    for t in range(1, H):
        weight.append(weight[-1] * gamma * cont[t - 1])
    weight = torch.stack(weight)
    q = torch.quantile(ret.detach(), torch.tensor([0.05, 0.95]))
    scale = torch.clamp((0.99 * hi + 0.01 * q[1]) - (0.99 * lo + 0.01 * q[0]), min=1.0)
    actor = -weight * ((ret - value[:-1]) / scale + eta * torch.stack(entropy[:-1]))
    x = feat[:-1].detach()
    log_p = torch.log_softmax(agent.ac.critic(x), -1)
    ce = lambda target: -(layers.twohot(layers.symlog(target.detach()), bins) * log_p).sum(-1)  # noqa: E731
    critic = weight * (ce(ret) + ce(mean(agent.ac.slow_critic(x))))
    return actor, critic, scale


def test_imagination_and_actor_critic_losses_equal_dreamerv3_written_out():
    torch.manual_seed(0)
    agent = _agent()
    _randomise_heads(agent)
    batch = _batch(B=4, T=6)
    batch["is_terminal"][0, 2] = batch["is_terminal"][2, 5] = True  # terminal start states weigh 0
    _, post = agent.wm.loss(batch, None)
    with torch.no_grad():
        agent.ac.retnorm.lo.fill_(-5.0)
        agent.ac.retnorm.hi.fill_(20.0)  # S about 25: normalisation matters
    lo, hi = agent.ac.retnorm.lo.clone(), agent.ac.retnorm.hi.clone()
    torch.manual_seed(3)
    losses, metrics = agent.ac.loss(agent.wm, post, None, batch["is_terminal"])
    torch.manual_seed(3)
    actor, critic, scale = _reference_imagination(agent, post, batch["is_terminal"], lo, hi)
    assert float(scale) > 20 and float(metrics["ac/return_scale"]) == pytest.approx(float(scale), rel=1e-5)
    torch.testing.assert_close(losses["actor"], actor, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["critic"], critic, rtol=1e-4, atol=1e-5)
    assert (actor[:, 2] == 0).all() and (actor[:, 2 * 6 + 5] == 0).all()
    params = list(agent.ac.actor.parameters())
    ours = torch.autograd.grad(losses["actor"].mean(), params, retain_graph=True)
    ref = torch.autograd.grad(actor.mean(), params)
    for g, r in zip(ours, ref):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-7)
    # the actor's gradient comes through the frozen dynamics and heads, and only the actor receives it
    assert all(p.grad is None for p in agent.wm.parameters()) and all(p.grad is None for p in agent.ac.critic.parameters())
    entropy_only = torch.autograd.grad((-3e-4 * torch.stack([agent.ac.actor(torch.zeros(1, agent.wm.rssm.feat_size)).entropy().sum()])).sum(), params)
    assert sum((g - e).abs().sum() for g, e in zip(ours, entropy_only)) > 0


def _record_calls(module, calls):
    """Record (input, output) of every forward call of `module`, detached copies, in `calls`."""
    return module.register_forward_hook(lambda m, args, out: calls.append((args[0].detach().clone(), out)))


@pytest.mark.parametrize("case", ["features", "oracle_shallow", "pixels"])
def test_head_targets_and_encoder_input_are_the_papers_at_the_same_step(case):
    """Each world-model head is trained towards its own record's target (DreamerV3 eq. 4, 9-10), read back
    from the loss's gradient at the head's output: decoder -> symlog(o_t) (features; cRSSM-S also the true
    context c_t) or o_t / 255 - 0.5 (pixels), the MSE's gradient being 2 (pred - target); reward head ->
    twohot(symlog(r_t)), the cross-entropy's gradient being softmax - target; continue head -> 1 -
    is_terminal_t, the logistic loss's gradient being sigmoid - target. Each head reads s_t of the same step,
    and the encoder's network reads symlog(o_t) (features) or o_t / 255 - 0.5 (pixels)."""
    torch.manual_seed(0)
    obs = "pixels" if case == "pixels" else "features"
    agent = _agent("oracle" if case == "oracle_shallow" else "none", "shallow", obs)
    batch = _batch(B=3, T=7, obs=obs)
    g = torch.Generator().manual_seed(1)
    batch["reward"] = torch.randn(3, 7, generator=g) * 8  # symlog, identity and symexp all differ here
    batch["is_terminal"][0, 3] = batch["is_terminal"][2, 6] = True
    if obs == "features":
        batch["obs"] = batch["obs"] * 4
    enc, dec, rew, cont = [], [], [], []
    hooks = [_record_calls(agent.wm.encoder.net, enc), _record_calls(agent.wm.decoder.net, dec), _record_calls(agent.wm.reward_head, rew),
             _record_calls(agent.wm.cont_head, cont)]  # fmt: skip
    ctx, seq_ctx, _ = agent.context(batch)
    losses, post = agent.wm.loss(batch, ctx, seq_ctx)
    for h in hooks:
        h.remove()
    if obs == "features":
        expected = layers.symlog(batch["obs"])
        torch.testing.assert_close(enc[0][0], expected if case == "features" else torch.cat([expected, batch["context"]], -1))
    else:
        torch.testing.assert_close(enc[0][0].permute(0, 2, 3, 1).reshape(batch["image"].shape), batch["image"].float() / 255 - 0.5)
    feat = agent.wm.rssm.feat(post)  # s_t = [h_t, z_t] (B, T, F)
    for calls in (rew, cont) + ((dec,) if obs == "features" else ()):
        assert len(calls) == 1
        torch.testing.assert_close(calls[0][0], feat, rtol=0, atol=0)  # s_t, not s_{t+1}
    # decoder
    (grad,) = torch.autograd.grad(losses["dec"].sum(), dec[0][1], retain_graph=True)
    target = dec[0][1] - grad / 2
    if obs == "features":
        torch.testing.assert_close(target[..., :8], layers.symlog(batch["obs"]), rtol=1e-5, atol=1e-5)
        if case == "oracle_shallow":
            torch.testing.assert_close(target[..., 8:], batch["context"], rtol=1e-5, atol=1e-5)
        else:
            assert target.shape[-1] == 8
    else:
        pixels = target.permute(0, 2, 3, 1).reshape(batch["image"].shape)  # (B*T, 3, 64, 64) -> (B, T, 64, 64, 3)
        torch.testing.assert_close(pixels, batch["image"].float() / 255 - 0.5, rtol=1e-5, atol=1e-5)
    # reward head
    bins = torch.linspace(-20, 20, 255)
    (grad,) = torch.autograd.grad(losses["rew"].sum(), rew[0][1], retain_graph=True)
    target = torch.softmax(rew[0][1], -1) - grad  # (B, T, 255)
    torch.testing.assert_close(target, layers.twohot(layers.symlog(batch["reward"]), bins), rtol=0, atol=1e-5)
    torch.testing.assert_close(layers.symexp((target * bins).sum(-1)), batch["reward"], rtol=1e-4, atol=1e-4)
    # continue head
    (grad,) = torch.autograd.grad(losses["cont"].sum(), cont[0][1])
    target = torch.sigmoid(cont[0][1].squeeze(-1)) - grad.squeeze(-1)
    torch.testing.assert_close(target, 1.0 - batch["is_terminal"].float(), rtol=0, atol=1e-6)


def test_actor_distribution_is_normal_tanh_mu_and_bounded_sigma():
    """DreamerV3 App. B: pi(a | s) = Normal(tanh(mu), 0.9 sigmoid(x + 2) + 0.1), written out; the acting mode is
    tanh(mu), and the entropy H[pi] of the actor loss is this Normal's."""
    torch.manual_seed(0)
    agent = _agent()
    actor = agent.ac.actor
    feat = torch.randn(5, agent.wm.feat_size)
    raw = torch.tensor([[-3.0, 0.4, -10.0, 0.0], [0.5, -1.2, 10.0, -2.0], [2.0, 0.0, 1.5, -4.0]])  # [mu (A=2), x (A=2)]
    for out in raw:
        with torch.no_grad():
            actor.net[-1].weight.zero_()
            actor.net[-1].bias.copy_(out)
        dist = actor(feat)
        mu, x = out[:2].expand(5, 2), out[2:].expand(5, 2)
        sigma = 0.9 * torch.sigmoid(x + 2.0) + 0.1
        torch.testing.assert_close(dist.mean, torch.tanh(mu))
        torch.testing.assert_close(dist.stddev, sigma)
        torch.testing.assert_close(dist.entropy(), 0.5 * torch.log(2 * torch.pi * torch.e * sigma**2))
        b = _batch(B=5, T=1)
        action, _ = agent.act({"obs": b["obs"][:, 0], "is_first": b["is_first"][:, 0]}, agent.initial_state(5), sample=False)
        torch.testing.assert_close(action, torch.tanh(mu))


@pytest.mark.parametrize("context, integration", [("none", "shallow"), ("oracle", "shallow"), ("oracle", "deep"), ("learned", "shallow"), ("learned", "deep")])
def test_same_inputs_in_training_and_imagination(context, integration):
    """One real update, every input recorded. Training: encoder, posterior and sequence model read their
    ctx (ctx_t, ctx_t, ctx_{t-1}; ctx_t at an episode start), and decoder, reward and continue heads read
    s_t = [h_t, z_t (, ctx_t when deep)]. Imagination from s_t: the actor and critic read at the start
    exactly the s_t the heads read in training; with deep integration, every imagined step's sequence model,
    heads, actor and critic read ctx_t, held, which is also what the sequence model read in training on its
    step out of s_t (ctx_{(t+1)-1}). Without deep integration nothing in imagination reads a ctx."""
    torch.manual_seed(0)
    agent = _agent(context, integration, ctx_window=3)
    P, B, T, H = agent.context_prefix, 2, 6, agent.cfg.horizon
    batch = _batch(B=B, T=P + T)
    batch["is_first"][1, P + 3] = True  # an episode starts inside the training steps
    batch["step"] = dali.episode_steps(batch["is_first"], first=torch.tensor([40, 7]))  # refresh steps inside the segment
    per_episode = torch.rand(B, 3, 2) * 2 - 1  # the true context is constant within an episode
    batch["context"] = per_episode[torch.arange(B)[:, None], batch["is_first"].cumsum(1)]
    is_first = batch["is_first"][:, P:]
    if context == "oracle":
        all_ctx = batch["context"]
    elif context == "learned":  # the weights of the update's start (with grad: no_grad takes attention's other kernel)
        all_ctx = agent.ctx_encoder.segment(batch["obs"], batch["action"], batch["is_first"])[0].detach()
    X = agent.ctx_deep
    ctx = None if context == "none" else all_ctx[:, P:]  # ctx_t of the T training steps
    if agent.holds_context:  # DALI-D: one value per refresh interval, for the heads and the sequence model alike
        ctx = dali.held_context(dali.sequence_context(all_ctx, batch["is_first"]), batch["step"], agent.ctx_cfg.refresh)[:, P:]
    wm, ac = agent.wm, agent.ac
    calls = {name: [] for name in ("reward", "cont", "decoder", "actor", "critic", "img_in", "encoder_ctx", "observe")}
    hooks = [_record_calls(module, calls[name]) for name, module in (("reward", wm.reward_head), ("cont", wm.cont_head), ("decoder", wm.decoder.net),
             ("actor", ac.actor), ("critic", ac.critic), ("img_in", wm.rssm.img_in))]  # fmt: skip
    hooks.append(wm.encoder.register_forward_hook(lambda m, args, out: calls["encoder_ctx"].append(args[1] if len(args) > 1 else None)))
    observe = wm.rssm.observe

    def observe_spy(*args, **kwargs):  # the sequence model's and the posterior's ctx inputs, and the posterior
        calls["observe"].append((kwargs, observe(*args, **kwargs)))
        return calls["observe"][-1][1]

    wm.rssm.observe = observe_spy
    try:
        agent.update(batch)
    finally:
        for h in hooks:
            h.remove()
        del wm.rssm.observe
    # Training
    (kw, (post, _)), = calls["observe"]  # fmt: skip
    feat = wm.rssm.feat(post).detach()  # [h_t, z_t] (B, T, D + S*C)
    s_t = torch.cat([feat, ctx], -1) if X else feat  # what the heads read
    for name in ("reward", "cont", "decoder"):
        torch.testing.assert_close(calls[name][0][0], s_t, rtol=0, atol=0, msg=name)
    assert (kw["ctx_post"] is not None) == (context == "learned" and integration == "shallow")
    if kw["ctx_post"] is not None:
        torch.testing.assert_close(kw["ctx_post"], ctx, rtol=0, atol=0)
    encoder_ctx = calls["encoder_ctx"][0]
    assert (encoder_ctx is not None) == (context == "oracle" and integration == "shallow")
    if encoder_ctx is not None:
        torch.testing.assert_close(encoder_ctx, ctx, rtol=0, atol=0)
    if agent.holds_context:
        torch.testing.assert_close(kw["ctx_seq"], ctx, rtol=0, atol=0)
    elif X:
        # ctx_{t-1}; the oracle has no history records (its ctx_0 stands in: step 0 starts an episode)
        previous = all_ctx[:, P - 1 : P + T - 1] if P else torch.cat([ctx[:, :1], ctx[:, :-1]], 1)
        torch.testing.assert_close(kw["ctx_seq"], torch.where(is_first[..., None], ctx, previous), rtol=0, atol=0)
    else:
        assert kw["ctx_seq"] is None
    # Imagination: N = B * T starts, n = b * T + t
    starts = s_t.flatten(0, 1)  # (N, F)
    actor_in, (value_in, _) = [c[0] for c in calls["actor"]], calls["critic"][0]
    assert len(actor_in) == H + 1 and value_in.shape[:2] == (H + 1, B * T)
    torch.testing.assert_close(actor_in[0], starts, rtol=0, atol=0)
    torch.testing.assert_close(value_in[0], starts, rtol=0, atol=0)
    img_in = [x for x, _ in calls["img_in"]]
    assert len(img_in) == H and all(x.shape[-1] == feat.shape[-1] - wm.rssm.cfg.deter + 2 + X for x in img_in)
    imagined = [calls["reward"][1][0], calls["cont"][1][0], value_in, *actor_in]  # (H or H+1, N, F) or (N, F)
    assert all(x.shape[-1] == s_t.shape[-1] for x in imagined) and calls["reward"][1][0].shape[:2] == (H, B * T)
    imagined += img_in  # (N, S*C + A + X)
    if X:
        held = ctx.flatten(0, 1)  # (N, X)
        for x in imagined:
            torch.testing.assert_close(x[..., -X:], held.expand_as(x[..., -X:]), rtol=0, atol=0)
        # the step out of s_t: training's sequence model read ctx_{(t+1)-1} = ctx_t there (unless t+1 starts an
        # episode; held: the same held value, unless t+1 is a refresh step)
        follows = ~is_first[:, 1:]  # (B, T-1)
        if agent.holds_context:
            follows &= batch["step"][:, P + 1 :] % agent.ctx_cfg.refresh != 0
            assert follows.any() and not follows.all()
        torch.testing.assert_close(img_in[0][..., -X:].view(B, T, X)[:, :-1][follows], kw["ctx_seq"][:, 1:][follows], rtol=0, atol=0)


def test_imagined_actions_are_scaled_into_the_action_range_keeping_their_gradient():
    a = torch.tensor([-4.2, -1.0, -0.3, 0.0, 0.7, 1.0, 2.5], requires_grad=True)
    clipped = actor_critic.clip_action(a)
    torch.testing.assert_close(clipped, torch.tensor([-1.0, -1.0, -0.3, 0.0, 0.7, 1.0, 1.0]))
    (grad,) = torch.autograd.grad(clipped.sum(), a)
    torch.testing.assert_close(grad, 1 / torch.clamp(a.detach().abs(), min=1))  # sg(1 / max(1, |a|)): scaled, not zero


def test_slow_critic_is_an_exponential_moving_average_of_the_critic():
    torch.manual_seed(0)
    agent = _agent()
    _randomise_heads(agent)
    slow = [p.detach().clone() for p in agent.ac.slow_critic.parameters()]
    agent.update(_batch())
    for s, new, fast in zip(slow, agent.ac.slow_critic.parameters(), agent.ac.critic.parameters()):
        torch.testing.assert_close(new, s + 0.02 * (fast.detach() - s))


def test_deep_prior_never_sees_the_observation_it_predicts():
    """DALI-D: the sequence model's step into h_t reads ctx_{t-1} (transitions up to o_{t-1}), so changing
    o_t leaves h_t and p(z_t | h_t) unchanged, in training and when acting; the posterior does see o_t."""
    torch.manual_seed(0)
    agent = _agent("learned", "deep")
    P, t = agent.context_prefix, 5
    batch = _batch(T=8 + P)
    batch["is_first"][:, 0] = True
    changed = {**batch, "obs": batch["obs"].clone()}
    changed["obs"][:, P + t] += 2.0

    def prior_post(b):
        torch.manual_seed(1)
        ctx, seq_ctx, _ = agent.context(b)
        trimmed = {k: v[:, P:] for k, v in b.items()}
        embed = agent.wm.encoder(trimmed["obs"])
        post, prior = agent.wm.rssm.observe(embed, trimmed["action"], trimmed["is_first"], ctx_seq=seq_ctx)
        return prior["logits"], post["logits"]

    (prior_a, post_a), (prior_b, post_b) = prior_post(batch), prior_post(changed)
    torch.testing.assert_close(prior_a[:, : t + 1], prior_b[:, : t + 1])
    assert not torch.allclose(post_a[:, t], post_b[:, t])
    assert not torch.allclose(prior_a[:, t + 1], prior_b[:, t + 1])  # o_t reaches h_{t+1}
    # acting: h_t (the returned deter) does not depend on o_t either
    state = agent.initial_state(3)
    for s in range(t):
        _, state = agent.act({"obs": batch["obs"][:, s], "is_first": batch["is_first"][:, s]}, state, sample=False)
    copies = [(state[0], state[1], copy.deepcopy(state[2])) for _ in range(2)]
    deters = [agent.act({"obs": o, "is_first": batch["is_first"][:, t]}, st, sample=False)[1][0]["deter"]
              for o, st in zip((batch["obs"][:, t], batch["obs"][:, t] + 2.0), copies)]  # fmt: skip
    torch.testing.assert_close(deters[0], deters[1])


def _act_through(agent, episode: dict) -> tuple[list, list]:
    """Act on recorded records one step at a time (agent.act, fed the recorded actions); returns, per step, the window's held ctx and
    the ctx columns of the actor's input (N, X) each."""
    X, held, actor_ctx = agent.ctx_deep, [], []
    hook = agent.ac.actor.register_forward_hook(lambda m, args, out: actor_ctx.append(args[0][..., -X:].clone()))
    state = agent.initial_state(episode["obs"].shape[0])
    try:
        for t in range(episode["obs"].shape[1]):
            state = (state[0], episode["action"][:, t], state[2])  # the recorded a_{t-1}, not the agent's own
            _, state = agent.act({"obs": episode["obs"][:, t], "is_first": episode["is_first"][:, t]}, state, sample=False)
            held.append(state[2].held.clone())
    finally:
        hook.remove()
    return held, actor_ctx


def test_deep_training_reads_the_held_context_acting_reads_from_the_same_history():
    """DALI-D (held ctx, --ctx.refresh R): the ctx that the sequence model and the heads read at every training
    step of a replayed segment, wherever the segment starts and across an episode start inside it, is the
    ctx that acting held at that step of the same records, and the ctx the actor read then; it changes only
    at refresh steps (every R steps of an episode), where it pools the K transitions up to the step before.
    A per-step ctx_{t-1} in training (or a refresh at every acting step) fails this."""
    torch.manual_seed(0)
    K, R, T = 4, 3, 7
    agent = _agent("learned", "deep", ctx_window=K)
    agent = dali.Agent(agent.cfg, TINY_RSSM, agent.spaces, dataclasses.replace(agent.ctx_cfg, refresh=R))
    assert agent.holds_context and agent.context_prefix == K + R
    with torch.no_grad():  # untrained but not degenerate: position biases and output layer away from init
        agent.ctx_encoder.position.normal_()
        agent.ctx_encoder.out[-1].weight.normal_()
    P, L = agent.context_prefix, 40
    episode = _batch(B=2, T=L)
    episode["is_first"][0, 26] = True  # env 0 starts a second episode
    episode["step"] = dali.episode_steps(episode["is_first"])
    held, actor_ctx = _act_through(agent, episode)
    held, actor_ctx = torch.stack(held, 1), torch.stack(actor_ctx, 1)  # (B, L, X)
    torch.testing.assert_close(actor_ctx, held, rtol=0, atol=0)
    refresh = episode["step"] % R == 0
    changes = (held[:, 1:] != held[:, :-1]).any(-1)  # (B, L-1)
    assert not changes[~refresh[:, 1:]].any() and changes[refresh[:, 1:] & (episode["step"][:, 1:] > 0)].all()
    for s in range(L - P - T + 1):  # every segment start
        segment = {k: v[:, s : s + P + T] for k, v in episode.items()}
        ctx, seq_ctx, _ = agent.context(segment)
        torch.testing.assert_close(seq_ctx, ctx, rtol=0, atol=0)
        torch.testing.assert_close(ctx, held[:, s + P : s + P + T], rtol=1e-5, atol=1e-5, msg=f"segment start {s}")


def test_a_held_deep_context_never_reads_an_observation_of_its_interval():
    """The held ctx of a refresh interval [r, r + R) pools transitions up to o_{r-1}: changing o_r .. o_{r+R-1}
    changes none of the interval's sequence-model ctx (training and acting), so no prior of the interval and
    no rollout imagined from it gets an observation that imagination would not have."""
    torch.manual_seed(0)
    K, R = 4, 5
    base = _agent("learned", "deep", ctx_window=K)
    agent = dali.Agent(base.cfg, TINY_RSSM, base.spaces, dataclasses.replace(base.ctx_cfg, refresh=R))
    P = agent.context_prefix
    episode = _batch(B=2, T=P + 12)
    r = next(t for t in range(P, P + 12) if episode["step"][0, t] % R == 0)
    changed = {**episode, "obs": episode["obs"].clone()}
    changed["obs"][:, r : r + R] += 3.0
    (a, _, _), (b, _, _) = agent.context(episode), agent.context(changed)
    i = r - P
    torch.testing.assert_close(a[:, i : i + R], b[:, i : i + R], rtol=0, atol=0)
    assert not torch.allclose(a[:, i + R], b[:, i + R])  # the next interval does read them
    torch.testing.assert_close(torch.stack(_act_through(agent, episode)[0], 1)[:, r : r + R],
                               torch.stack(_act_through(agent, changed)[0], 1)[:, r : r + R], rtol=0, atol=0)  # fmt: skip


def test_configurations_saved_before_the_held_context_keep_what_they_trained_with():
    """Args saved without --ctx.refresh load as the code that wrote them trained: a learned deep agent per
    step (0), any other agent with today's default (it does not read it), so that its resume is not refused."""
    saved = dataclasses.asdict(config.preset("cpu", "ball_in_cup"))
    for context, integration, refresh in [("learned", "deep", 0), ("learned", "shallow", 16), ("oracle", "deep", 16), ("none", "shallow", 16)]:
        old = {**saved, "agent": {**saved["agent"], "context": context, "integration": integration}}
        old["ctx"] = {k: v for k, v in old["ctx"].items() if k != "refresh"}
        args = config.args_from_dict(old)
        assert args.ctx.refresh == refresh, (context, integration)
        assert config.config_conflicts(config.migrate_args(old), dataclasses.asdict(args)) == []


def test_per_step_deep_context_still_reads_ctx_t_minus_1_with_the_full_window_of_acting():
    """--ctx.refresh 0, the per-step variant kept for older agents: the sequence model reads ctx_{t-1}. At the
    first training step of a replayed batch that ctx pools the same K transitions as the acting window did one
    step earlier (K + 1 history records)."""
    torch.manual_seed(0)
    K, T, s = 4, 5, 3  # s: the segment starts mid-episode
    base = _agent("learned", "deep", ctx_window=K)
    agent = dali.Agent(base.cfg, TINY_RSSM, base.spaces, dataclasses.replace(base.ctx_cfg, refresh=0))
    assert not agent.holds_context and agent.context_prefix == K + 1
    P = agent.context_prefix
    with torch.no_grad():
        agent.ctx_encoder.position.normal_()
        agent.ctx_encoder.out[-1].weight.normal_()
    episode = _batch(B=2, T=s + P + T)  # is_first only at record 0
    batch = {k: v[:, s : s + P + T] for k, v in episode.items()}
    _, seq_ctx, pieces = agent.context(batch)
    window = context_window.ContextWindow(agent.ctx_encoder, 2, "cpu")
    for t in range(s + P):  # act up to the record before the first training step, s + P
        acted = window.update(episode["obs"][:, t], episode["action"][:, t], episode["is_first"][:, t])
    assert (window.valid.sum(-1) == K).all()
    torch.testing.assert_close(seq_ctx[:, 0], acted, rtol=1e-5, atol=1e-5)
    agent.update(batch)  # and the update takes the longer batch


def test_imagination_from_a_posterior_state_repeats_the_training_step():
    """Imagining from s_t with ctx_t held (ActorCritic.loss, WorldModel.imagine) is the computation observe did for h_{t+1}."""
    torch.manual_seed(0)
    for context, integration in [("learned", "deep"), ("oracle", "deep"), ("learned", "shallow")]:
        agent = _agent(context, integration)
        P = agent.context_prefix
        batch = _batch(T=8 + P)
        ctx, seq_ctx, _ = agent.context(batch)
        trimmed = {k: v[:, P:] for k, v in batch.items()}
        embed = agent.wm.encoder(trimmed["obs"], ctx if agent.ctx_enc else None)
        post, _ = agent.wm.rssm.observe(embed, trimmed["action"], trimmed["is_first"], ctx_seq=seq_ctx if agent.ctx_deep else None,
                                     ctx_post=ctx if agent.ctx_post else None)  # fmt: skip
        for t in range(7):
            state = {k: post[k][:, t] for k in ("deter", "stoch")}
            step_ctx = ctx[:, t] if agent.ctx_deep else None  # what WorldModel.imagine holds fixed from the start
            imagined = agent.wm.rssm.img_step(state, trimmed["action"][:, t + 1], step_ctx)
            torch.testing.assert_close(imagined["deter"], post["deter"][:, t + 1], msg=f"{context} {integration} t={t}")


def test_a_fresh_window_treats_its_first_step_as_an_episode_start():
    """The policy takes over from random prefill mid-episode with an empty window: no transition (o_t, 0, o_t)
    may be fabricated from the missing previous observation."""
    enc = _encoder(K=4)
    window = context_window.ContextWindow(enc, 2, "cpu")
    o0, o1 = torch.randn(2, 3), torch.randn(2, 3)
    ctx0 = window.update(o0, torch.zeros(2, 2), torch.zeros(2, dtype=torch.bool))  # mid-episode, first call
    assert not window.valid.any()
    torch.testing.assert_close(ctx0, enc.empty.expand(2, -1))
    a = torch.randn(2, 2)
    ctx1 = window.update(o1, a, torch.zeros(2, dtype=torch.bool))
    assert window.valid[:, -1].all() and window.valid.sum() == 2
    L = torch.stack([o0, o1], 1)
    ref, _ = enc.segment(L, torch.stack([torch.zeros(2, 2), a], 1), torch.tensor([[True, False]] * 2))
    torch.testing.assert_close(ctx1, ref[:, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("integration", ["shallow", "deep"])
def test_cross_modal_loss_has_two_terms_each_training_its_own_side(integration):
    """L_cross (DALI-chi, the release's reconstruct_wm_state_loss): the state term ||[h_t; z_t] - sg(W ctx_t)||^2
    reaches the world model (RSSM, encoder) and never g, W or V; the context term ||ctx_t - V sg([h_t; z_t])||^2
    reaches g and V and never the world model or W. W is fixed; an agent's updates lower both terms."""
    torch.manual_seed(0)
    spaces = dali.Spaces(action=2, obs=8, context=2)
    cfg = dali.AgentConfig(context="learned", integration=integration, **TINY_AGENT)
    ctx_cfg = context_encoder.ContextEncoderConfig(window=4, units=16, heads=2, fd_units=16, cross_weight=1.0)
    agent = dali.Agent(cfg, TINY_RSSM, spaces, ctx_cfg)
    assert agent.wm.loss_scales["cross"] == 1.0
    batch = _batch(T=8 + agent.context_prefix)
    P = agent.context_prefix
    ctx, seq_ctx, pieces = agent.context(batch)
    losses, post = agent.wm.loss({k: v[:, P:] for k, v in batch.items()}, ctx, seq_ctx, cross=agent.cross)
    state = agent.wm.rssm.feat(post)
    assert state.shape[-1] == agent.cross.ctx_to_state.out_features == TINY_RSSM.deter + TINY_RSSM.stoch * TINY_RSSM.classes
    groups = {
        "g": list(agent.ctx_encoder.parameters()),
        "W": list(agent.cross.ctx_to_state.parameters()),
        "V": list(agent.cross.state_to_ctx.parameters()),
        "rssm": list(agent.wm.rssm.parameters()),
        "encoder": list(agent.wm.encoder.parameters()),
        "heads": [p for m in (agent.wm.decoder, agent.wm.reward_head, agent.ac) for p in m.parameters() if p.requires_grad],
    }
    assert not any(p.requires_grad for p in groups["W"])  # W: a fixed random projection, as in the release
    for p in groups["W"]:
        p.requires_grad_(True)  # only to prove that no gradient path reaches it

    def reached(loss) -> set[str]:
        params = [p for ps in groups.values() for p in ps]
        grads = iter(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))
        return {name for name, ps in groups.items() if sum(float(g.abs().sum()) for g in (next(grads) for _ in ps) if g is not None) > 0}

    state_term = losses["cross"].mean()
    context_term = cross_modal.cross_modal_context_loss(agent.cross, pieces["ctx"][:, P:], state).mean()
    assert reached(state_term) == {"rssm", "encoder"}
    assert reached(context_term) == {"g", "V"}
    for p in groups["W"]:
        p.requires_grad_(False)
    W = [p.clone() for p in groups["W"]]
    metrics = [agent.update(batch) for _ in range(40)]
    assert all(torch.equal(a, b) for a, b in zip(W, groups["W"]))
    m = metrics[-1]  # g's objective: L_FD (summed over the 8 observation dims) + lambda * 8 * the context term (its mean
    # over X): the release's balance, where both are means over their dimensions
    assert torch.allclose(m["ctx/loss"], m["ctx/fd_loss"] + 1.0 * 8 * m["ctx/cross_loss"])
    for key in ("ctx/cross_loss", "wm/cross"):
        assert float(metrics[-1][key]) < 0.7 * float(metrics[0][key]), key


def test_train_cli_with_cross_modal_loss_trains_the_encoder(tmp_path):
    """--ctx.cross-weight > 0 for real: a train.py run logs both L_cross terms; g and V end where they did not
    start, W where it did."""
    import json

    flags = [*TINY_FLAGS, "--steps", "2000", "--contexts", "single_0", "--ctx.cross-weight", "0.5", "--logdir", str(tmp_path)]
    args = train.cli(flags)
    torch.manual_seed(args.seed)
    init = checkpoint.build_agent(args, envs.make_env(args.task)).state_dict()  # the run's initial weights (same seed)
    train.main(args)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(row.get("ctx/cross_loss", np.nan)) for row in rows) and any(np.isfinite(row.get("wm/cross", np.nan)) for row in rows)
    trained = checkpoint.load_checkpoint(tmp_path)["agent"]
    for name in ("cross.state_to_ctx.weight", "ctx_encoder.attention.in_proj_weight", "ctx_encoder.embed.0.weight"):
        assert not torch.equal(trained[name], init[name]), name
    assert torch.equal(trained["cross.ctx_to_state.weight"], init["cross.ctx_to_state.weight"])


def _synthetic_batch(B, L, seed):
    """Episodes of a system whose next state depends on a hidden per-episode parameter c = +-1:
    o' = 0.5 o + c a. (B, L) records in the replay convention (record t: o_t, a_{t-1})."""
    g = torch.Generator().manual_seed(seed)
    c = (torch.randint(0, 2, (B, 1), generator=g) * 2 - 1).float()
    a = torch.rand(B, L, 2, generator=g) * 2 - 1  # a_t
    obs = [torch.randn(B, 2, generator=g) * 0.3]
    for t in range(L - 1):
        obs.append(0.5 * obs[-1] + c * a[:, t])
    batch = {
        "obs": torch.stack(obs, 1),
        "action": torch.cat([torch.zeros(B, 1, 2), a[:, :-1]], 1),
        "reward": torch.zeros(B, L),
        "is_first": torch.zeros(B, L, dtype=torch.bool),
        "is_terminal": torch.zeros(B, L, dtype=torch.bool),
        "context": c.expand(B, L)[..., None],
    }
    batch["is_first"][:, 0] = True
    return batch


def test_a_learned_context_agents_update_infers_a_hidden_dynamics_parameter():
    """The agent's own update (not a standalone loop) trains g and f on a system o' = 0.5 o + c a with a
    hidden per-episode c: L_FD falls, and the ctx of an episode predicts its own transitions far better than
    the ctx of another episode (g inferred c from the window; measured 0.19 against 0.49). Fails if L_FD's
    targets or actions are misaligned (o_t instead of o_{t+1}, a_{t-1} instead of a_t), or if g is not
    trained."""
    torch.manual_seed(0)
    cfg = dali.AgentConfig(context="learned", integration="shallow", **TINY_AGENT)
    ctx_cfg = context_encoder.ContextEncoderConfig(window=6, units=32, heads=2, fd_units=32)
    agent = dali.Agent(cfg, TINY_RSSM, dali.Spaces(action=2, obs=2, context=1), ctx_cfg)
    P = agent.context_prefix
    g_before = {k: v.detach().clone() for k, v in agent.ctx_encoder.named_parameters()}
    losses = [float(agent.update(_synthetic_batch(16, P + 10, seed))["ctx/fd_loss"]) for seed in range(150)]
    moved = [k for k, v in agent.ctx_encoder.named_parameters() if not torch.equal(v, g_before[k])]
    assert any(k.startswith("forward_model") for k in moved) and any(k.startswith("attention") for k in moved)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20]), (losses[:5], losses[-5:])
    test = _synthetic_batch(64, P + 10, seed=10_000)
    with torch.no_grad():
        _, _, pieces = agent.context(test)
        x, ctx, valid = pieces["x"], pieces["ctx"], pieces["valid"]

        def fd(c):
            return context_encoder.forward_dynamics_loss(agent.ctx_encoder, x[:, P:-1], x[:, P + 1 :], test["action"][:, P + 1 :], c[:, P:-1], valid[:, P:]).mean()

        own, other = fd(ctx), fd(ctx.roll(1, 0))
    assert own < 0.5 * other, (float(own), float(other))


def test_learned_context_pixel_agent_trains_end_to_end():
    """DALI with pixels: tokens are the world model's detached embeddings; one update trains every part
    (world model, actor, critic, g and f) and repeated updates lower L_FD."""
    torch.manual_seed(0)
    for integration in ("shallow", "deep"):
        agent = _agent("learned", integration, "pixels")
        before = {k: v.detach().clone() for k, v in agent.named_parameters()}
        batch = _batch(T=8 + agent.context_prefix, obs="pixels")
        batch["is_first"][:, agent.context_prefix + 3] = True  # an episode start: ctx_t is the "no evidence" vector
        fd = [float(agent.update(batch)["ctx/fd_loss"]) for _ in range(6)]
        unchanged = [k for k, v in agent.named_parameters() if v.requires_grad and torch.equal(v, before[k])]
        assert unchanged == [], integration
        assert fd[-1] < fd[0], (integration, fd)


def test_replay_records_replay_the_real_episodes(tmp_path):
    """train.py's records (o_t, a_{t-1}, r_t, is_first_t, ctx_t) re-simulate exactly: stepping a fresh env of
    the same seed with each record's stored action gives the next record's observation and reward, through
    the random-prefill-to-policy handover, the final observation of an episode and the next reset."""
    train.main(train.cli([*TINY_FLAGS, "--steps", "4000", "--contexts", "single_0", "--logdir", str(tmp_path)]))
    ckpt = checkpoint.load_checkpoint(tmp_path / "ckpt.pt")
    args = config.args_from_dict(ckpt["args"])
    data = {k: v.numpy() for k, v in ckpt["replay"]["data"].items()}
    contexts = envs.train_contexts(args.task, args.contexts, args.num_contexts, args.seed)
    episode = envs.EPISODE_STEPS // args.action_repeat + 1  # records per episode: the first + one per step
    for i in range(args.envs):
        assert int(ckpt["replay"]["count"][i]) == 2 * episode
        env = envs.make_env(args.task, args.obs, contexts, args.seed + i, args.action_repeat)
        for t in range(2 * episode):
            if t % episode == 0:
                o, info = env.reset()
                assert data["is_first"][i, t] and not data["action"][i, t].any() and data["reward"][i, t] == 0
            else:
                o, r, term, trunc, info = env.step(data["action"][i, t])
                assert not data["is_first"][i, t] and data["reward"][i, t] == pytest.approx(r, abs=1e-6)
                assert data["is_terminal"][i, t] == term and trunc == (t % episode == episode - 1)
            np.testing.assert_array_equal(data["obs"][i, t], o["obs"], err_msg=f"env {i} record {t}")
            np.testing.assert_array_equal(data["context"][i, t], info["context_vector"])
    assert args.prefill < episode * args.action_repeat * args.envs  # the handover happened inside episode 1


def test_evaluation_starts_every_episode_from_a_fresh_agent_state():
    from rollout import episode_returns

    agent = _agent("learned", "deep")  # ball_in_cup's sizes: 8 features, 2 action dims
    seen = []
    act = agent.act

    def spy(obs, state, sample=True, context=None):
        latent, prev_action, window = state
        if obs["is_first"].any():
            fresh = agent.wm.rssm.initial(len(prev_action))
            seen.append(all(torch.equal(latent[k][obs["is_first"]], fresh[k][obs["is_first"]]) for k in ("deter", "stoch"))
                        and not prev_action[obs["is_first"]].any() and not window.valid[obs["is_first"]].any()
                        and window.ctx is None)  # fmt: skip
        return act(obs, state, sample, context)

    agent.act = spy
    jobs = [(envs.default_context("ball_in_cup"), seed) for seed in range(3)]
    returns = episode_returns(agent, "ball_in_cup", "features", 50, jobs, batch=2)
    assert len(returns) == 3 and seen == [True, True]  # two batches, each starting from scratch


def test_implied_gravity_of_real_rollouts_is_their_true_gravity():
    """probes.implied_gravity on a known answer: real rollouts at known gravities, passed in as the
    "dream", are each matched to their own gravity."""
    import probes

    env = envs.make_env("ball_in_cup", "features", None, 0, 2)
    env.reset()
    for _ in range(30):
        env.step(np.array([0.3, -0.2]))
    physics = env.physics.get_state().copy()
    context = envs.default_context("ball_in_cup")
    actions = np.tile(np.array([[0.2, 0.4]]), (12, 1))
    grid = np.array([2.45, 4.9, 9.81, 14.7, 19.6])
    dreams = np.stack([probes.real_rollout(env, {**context, "gravity": g}, physics, actions) for g in (4.9, 19.6, 9.81)])
    implied = probes.implied_gravity(dreams[:, None], env, [context], physics[None], actions[None], grid)
    np.testing.assert_array_equal(implied[:, 0], [4.9, 19.6, 9.81])


def test_ball_in_cup_string_length_semantics_follow_carls_fork():
    """distance d: the tendon's range is (0, d) and the ball body moves up by 0.3 - d, so the observed ball
    position (a joint coordinate) is offset by 0.3 - d, and at short strings the ball starts over-stretched."""
    default = _env("ball_in_cup", {"distance": 0.3})
    default.reset()
    ball_z0 = default.physics.named.model.body_pos["ball", "z"]
    for d in (0.06, 0.3, 0.5):
        env = _env("ball_in_cup", {"distance": d})
        env.reset()
        p = env.physics
        assert tuple(p.named.model.tendon_range["string"]) == pytest.approx((0.0, d))
        assert p.named.model.body_pos["ball", "z"] == pytest.approx(ball_z0 + 0.3 - d)
        world_z = p.named.data.xpos["ball", "z"]
        assert world_z - p.named.data.qpos["ball_z"] == pytest.approx(ball_z0 + 0.3 - d)
        if d < 0.3:
            assert p.named.data.ten_length["string"] > d  # over-stretched at the start


def test_probability_of_improvement_equals_pairwise_counting_and_bootstrap_is_stratified():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, size=(5, 7)).astype(float), rng.integers(0, 4, size=(4, 7)).astype(float)  # many ties
    wins = [np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in x[:, j] for b in y[:, j]]) for j in range(7)]
    assert scores.probability_of_improvement(x, y) == pytest.approx(np.mean(wins))
    # stratified: within one bootstrap sample, each task draws its own runs (whole-run resampling would
    # draw the same run indices for every task)
    runs = np.repeat(np.arange(6.0)[:, None], 8, 1)  # score = run index, in every task
    boot = scores.bootstrap(runs, 500, np.random.default_rng(0))
    same_run_everywhere = (boot == boot[..., :1]).all(-1).mean()
    assert same_run_everywhere < 0.01


def test_a_methods_confidence_intervals_do_not_depend_on_the_other_methods_aggregated():
    # a study's stages finish one by one: adding cRSSM-S to the aggregate must not move DALI-S's CIs
    from results import RunResult, aggregate

    rng = np.random.default_rng(0)
    regimes = ["interpolation"] * 3 + ["extrapolation"] * 4
    run = lambda method, seed: RunResult("", "ball_in_cup", "single_0", method, seed, regimes, rng.uniform(0, 1000, (7, 5)))  # noqa: E731
    a, b, c = [run("DALI-S", s) for s in range(3)], [run("Dreamer-DR", s) for s in range(3)], [run("cRSSM-S", s) for s in range(2)]
    two, three = aggregate(a + b, reps=300), aggregate(a + b + c, reps=300)
    for reg in ("interpolation", "extrapolation", "all"):
        for m in ("DALI-S", "Dreamer-DR"):
            assert three["metrics"][reg][m] == two["metrics"][reg][m], (reg, m)
        assert three["improvement"][reg]["DALI-S > Dreamer-DR"] == two["improvement"][reg]["DALI-S > Dreamer-DR"]
    assert three["metrics"]["all"]["DALI-S"]["IQM"]["ci"] != aggregate(a + b, reps=300, seed=1)["metrics"]["all"]["DALI-S"]["IQM"]["ci"]


def test_a_method_with_one_run_reports_no_confidence_interval(tmp_path):
    # resampling a single run returns it every time: its "CI" would be [x, x], which reads as certainty
    from figures import zeroshot_figure
    from results import RunResult, aggregate, format_table

    rng = np.random.default_rng(0)
    regimes = ["interpolation"] * 3 + ["extrapolation"] * 4
    run = lambda method, seed: RunResult("", "ball_in_cup", "single_0", method, seed, regimes, rng.uniform(0, 1000, (7, 5)))  # noqa: E731
    summary = aggregate([run("walker-like", 0), run("DALI-S", 0), run("DALI-S", 1)], reps=200)
    for reg in ("interpolation", "extrapolation", "all"):
        assert all(v["ci"] is None for v in summary["metrics"][reg]["walker-like"].values())
        assert all(v["ci"][0] < v["ci"][1] for v in summary["metrics"][reg]["DALI-S"].values())
        assert all(v["ci"] is None for v in summary["improvement"][reg].values())  # one side has a single run
    table = format_table(summary)
    assert "(1 run, no CI)" in table and "[" in table
    zeroshot_figure(summary, str(tmp_path / "fig.png"))
    assert (tmp_path / "fig.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------------
# train.py: the real CLI, checkpoints, exact resume, bad input
# ----------------------------------------------------------------------------------------------------

def test_replay_samples_consecutive_records_of_one_env_across_wraparound():
    from replay import Replay

    replay = Replay(capacity=20, num_envs=2, spec={"t": ((), np.int64), "env": ((), np.int64)}, seed=0)
    for t in range(37):  # env 0 wraps its 10-record ring several times; env 1 stops early
        replay.add(0, {"t": t, "env": 0})
        if t < 12:
            replay.add(1, {"t": t, "env": 1})
    batch = replay.sample(64, 6)
    assert batch["t"].shape == (64, 6)
    assert (np.diff(batch["t"], axis=1) == 1).all()  # consecutive, in order
    assert ((batch["env"] == batch["env"][:, :1]).all())  # one env per sequence
    assert batch["t"][batch["env"][:, 0] == 0].min() >= 27  # only the 10 newest records of env 0 remain
    assert set(np.unique(batch["env"][:, 0])) == {0, 1}


TINY_FLAGS = [
    "--task", "ball_in_cup", "--envs", "2", "--action-repeat", "50", "--batch-size", "3", "--batch-length", "8",
    "--prefill", "400", "--train-ratio", "48", "--rssm.deter", "32", "--rssm.hidden", "32", "--rssm.stoch", "4",
    "--rssm.classes", "4", "--hidden", "32", "--eval-every", "2000", "--eval-episodes", "2", "--log-every", "1000",
    "--save-every", "2000", "--no-progress", "--threads", "1", "--ctx.window", "6", "--ctx.units", "16",
    "--ctx.heads", "2", "--ctx.fd-units", "16", "--ctx.refresh", "4",  # DALI-D: a 30-record batch would not fit a 21-record episode
]  # fmt: skip


def test_train_cli_end_to_end_writes_metrics_and_checkpoint(tmp_path):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "train.py", *TINY_FLAGS, "--steps", "4000", "--context", "oracle", "--integration", "deep",
           "--contexts", "single_0", "--logdir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step     4000" in out.stdout
    # the first minutes say what happens: prefill, then learning with the first losses; otherwise one line per log step
    lines = out.stdout.splitlines()
    assert lines[0] == "prefill: uniform random actions until env step 400 fill the replay; learning starts then (one line every 1000 env steps)"
    started = [i for i, line in enumerate(lines) if line.startswith("learning started at env step ")]
    assert len(started) == 1 and "first update wm/loss " in lines[started[0]] and "ac/actor_loss " in lines[started[0]]
    assert [line.split("|")[0].split() for i, line in enumerate(lines) if i not in (0, started[0])] == [["step", str(s)] for s in range(1000, 4001, 1000)]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4000 and {"wm/loss", "ac/actor_loss", "episode/return", "eval/return", "perf/fps"} <= rows[-1].keys()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    ckpt = checkpoint.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["counters"]["env_steps"] == 4000 and ckpt["counters"]["updates"] > 0
    args = config.args_from_dict(json.loads((tmp_path / "args.json").read_text()))
    assert args.agent.context == "oracle" and args.rssm.deter == 32
    env = envs.make_env(args.task)
    checkpoint.build_agent(args, env).load_state_dict(ckpt["agent"])  # saved args rebuild the agent


def _train_checking_devices(tmp_path, monkeypatch, device: str, context: str = "learned") -> list[int]:
    """train.py on `device` with every update checked: each parameter, each tensor of the replay-sampled batch,
    each returned metric and each optimiser moment on `device` (nothing silently on the CPU). The updates seen."""
    seen, update = [], train.checked_update

    def checking(agent, batch, n, env_steps, ckpt_path):
        off = [f"parameter {k}" for k, p in agent.named_parameters() if p.device.type != device]
        off += [f"batch {k}" for k, v in batch.items() if v.device.type != device]
        metrics = update(agent, batch, n, env_steps, ckpt_path)
        off += [f"metric {k}" for k, v in metrics.items() if torch.is_tensor(v) and v.device.type != device]
        off += [f"{name} state {k}" for name, opt in agent.optimizers.items() for st in opt.state.values()
                for k, v in st.items() if torch.is_tensor(v) and k != "step" and v.device.type != device]  # Adam keeps its step count on the CPU  # fmt: skip
        assert not off, off
        seen.append(n)
        return metrics

    monkeypatch.setattr(train, "checked_update", checking)
    flags = [*TINY_FLAGS, "--device", device, "--context", context, "--contexts", "single_0", "--steps", "1000", "--eval-every", "1000"]
    train.main(train.cli([*flags, "--logdir", str(tmp_path)]))
    return seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: torch.cuda.is_available() is False (a CPU build or no CUDA device); the CUDA smoke test runs a few updates on cuda where there is one")
def test_cuda_smoke_every_parameter_and_batch_stays_on_the_gpu(tmp_path, monkeypatch):
    """A few updates of DALI-S and of cRSSM-S (the true context from the replay) on cuda: the agent, every
    replayed batch, the metrics and the optimiser moments live on the GPU; acting and evaluation run too."""
    for context in ("learned", "oracle"):
        assert len(_train_checking_devices(tmp_path / context, monkeypatch, "cuda", context)) >= 5
        monkeypatch.undo()


def test_size_presets_set_their_train_ratio_and_flags_override_it():
    # the CPU preset: 256 on walker (the main command), 128 on ball_in_cup (the study's runs)
    assert train.cli([]).size == "cpu" and train.cli([]).task == "walker" and train.cli([]).train_ratio == 256.0
    assert train.cli(["--task", "ball_in_cup"]).train_ratio == 128.0
    assert train.cli(["--task=ball_in_cup", "--size", "cpu"]).train_ratio == 128.0
    assert train.cli(["--size", "xs"]).train_ratio == 512.0  # DreamerV3's ratio for the paper's sizes
    assert train.cli(["--size", "xs", "--task", "ball_in_cup"]).train_ratio == 512.0
    assert train.cli(["--train-ratio", "64"]).train_ratio == 64.0
    assert train.cli(["--task", "ball_in_cup", "--train-ratio", "300"]).train_ratio == 300.0
    assert train.cli(["--train-ratio", "64", "--size", "xs"]).rssm.hidden == 256
    with pytest.raises(SystemExit, match="unknown --task 'cheetah'; choose one of"):
        train.cli(["--task", "cheetah"])


def test_size_s_has_dreamerv3_s_parameter_count_on_walker_features():
    """--size s is DreamerV3's S as it ran on proprioceptive DMC (danijar/dreamerv3 at 423291a): encoder and
    decoder MLPs 5 x 1024 (its size overrides missed them), RSSM 512 / 512 / 32 x 32, the other MLPs
    2 x 512. The figures are derived from DreamerV3's configs.yaml and nets.py by hand in docs/training.md
    (walker: 24 observation dims, 6 action dims); the slow critic, an EMA copy, is not trained and not counted."""
    args = train.cli(["--size", "s", "--context", "none"])
    agent = checkpoint.build_agent(args, envs.make_env("walker"))
    count = lambda module: sum(p.numel() for p in module.parameters() if p.requires_grad)  # noqa: E731
    parts = {"rssm": agent.wm.rssm, "encoder": agent.wm.encoder, "decoder": agent.wm.decoder, "reward": agent.wm.reward_head,
             "continue": agent.wm.cont_head, "actor": agent.ac.actor, "critic": agent.ac.critic}  # fmt: skip
    assert {k: count(m) for k, m in parts.items()} == {
        "rssm": 4_206_080, "encoder": 4_229_120, "decoder": 5_802_008, "reward": 1_181_439,
        "continue": 1_051_137, "actor": 1_056_780, "critic": 1_181_439,
    }  # fmt: skip
    assert count(agent) == 18_708_003
    # the cpu preset keeps encoder and decoder as wide as its other MLPs (1 x 128): its runs are unchanged
    cpu = train.cli(["--context", "none"]).agent
    assert (cpu.hidden, cpu.layers, cpu.enc_dec_hidden, cpu.enc_dec_layers) == (128, 1, None, None)
    assert count(checkpoint.build_agent(train.cli(["--context", "none"]), envs.make_env("walker"))) == 881_827
    with pytest.raises(SystemExit, match="--enc-dec-layers 0: must be >= 1"):
        config.check_args(train.cli(["--size", "s", "--enc-dec-layers", "0"]))


def test_resume_reproduces_uninterrupted_training(tmp_path):
    full = train.cli([*TINY_FLAGS, "--steps", "6000", "--logdir", str(tmp_path / "full")])
    train.main(full)
    half = train.cli([*TINY_FLAGS, "--steps", "3000", "--logdir", str(tmp_path / "half")])
    train.main(half)
    train.main(train.cli([*TINY_FLAGS, "--steps", "6000", "--logdir", str(tmp_path / "half"), "--resume"]))
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)
    same = lambda c: {k: v for k, v in c.items() if k != "seconds"}  # noqa: E731 (wall-clock is not reproducible)
    assert same(a["counters"]) == same(b["counters"]) and a["counters"]["updates"] > 20
    for k, v in a["agent"].items():
        assert torch.equal(v, b["agent"][k]), k
    for k, v in a["replay"]["data"].items():
        assert np.array_equal(v, b["replay"]["data"][k]), k


def test_a_version_1_checkpoint_resumes_to_the_exact_state_the_old_code_reached(tmp_path):
    """fixtures/dali_s_v1.pt is a DALI-S checkpoint written by the code before the world model and the
    actor-critic became classes of their own (commit 44a2cd4, checkpoint version 1). It loads (keys
    migrated; optimiser states keyed by parameter index, whose order is unchanged) and, resumed for 80
    updates, ends in exactly the state the old code reached: every tensor of agent, optimisers, replay,
    counters and random streams (fixtures/dali_s_v1_resumed.json, from benchmarks/bit_identity.py
    --write-fixture)."""
    import json
    import shutil
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures"
    shutil.copy(fixtures / "dali_s_v1.pt", tmp_path / "ckpt.pt")
    raw = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert raw["version"] == 1 and "world_model.0.net.0.0.weight" in raw["agent"] and "encoder.net.0.0.weight" in raw["agent"]
    ckpt = checkpoint.load_checkpoint(tmp_path)
    assert ckpt["version"] == checkpoint.CHECKPOINT_VERSION == 2
    args, agent, _ = checkpoint.load_agent(tmp_path)  # load_state_dict is strict: every key maps, none is left over
    assert args.agent.context == "learned" and args.agent.integration == "shallow"
    for name, opt in agent.optimizers.items():
        opt.load_state_dict(ckpt["optimizers"][name])
        params = [p for group in opt.param_groups for p in group["params"]]
        assert [opt.state[p]["exp_avg"].shape for p in params] == [p.shape for p in params], name
    reference = json.loads((fixtures / "dali_s_v1_resumed.json").read_text())
    train.main(train.cli(["--logdir", str(tmp_path), "--resume", "--steps", str(reference["steps"][1])]))
    digest = checkpoint.state_digest(checkpoint.load_checkpoint(tmp_path))
    added = {k for k in digest.keys() - reference["digest"].keys() if k.startswith("acting.")}  # the mid-episode acting state, newer
    assert added and digest.keys() - added == reference["digest"].keys()
    digest = {k: v for k, v in digest.items() if k not in added}
    assert digest["counters.updates"] == reference["digest"]["counters.updates"]
    platform = (torch.__version__, torch.backends.cpu.get_cpu_capability())
    if platform != (reference["torch"], reference["cpu"]):
        pytest.skip(f"only the last check skipped: the reference bits come from torch {reference['torch']} on a {reference['cpu']} CPU, "
                    f"this is torch {platform[0]} on {platform[1]}; float reductions sum in another order with another CPU's "
                    "kernels (AVX2 vs AVX512), so bits differ (README: which numbers reproduce where)")  # fmt: skip
    assert [k for k in digest if digest[k] != reference["digest"][k]] == []


def test_bad_checkpoints_and_flags_fail_clearly_and_keep_the_good_checkpoint(tmp_path):
    args = train.cli([*TINY_FLAGS, "--steps", "1000", "--logdir", str(tmp_path)])
    train.main(args)
    ckpt = tmp_path / "ckpt.pt"
    good = ckpt.read_bytes()
    with pytest.raises(SystemExit, match="holds a checkpoint; pass --resume"):
        train.main(args)
    with pytest.raises(SystemExit, match="--rssm.deter: trained with 32, this run asks 64"):
        train.main(train.cli([*TINY_FLAGS, "--rssm.deter", "64", "--logdir", str(tmp_path), "--resume"]))
    with pytest.raises(SystemExit, match="oracle with --contexts default"):
        train.main(train.cli([*TINY_FLAGS, "--context", "oracle", "--contexts", "default", "--logdir", str(tmp_path / "x")]))
    with pytest.raises(SystemExit, match="unknown --size 'huge'"):
        train.cli(["--size", "huge"])
    # a crash while writing leaves the previous checkpoint intact
    with pytest.raises(Exception):
        checkpoint.save_checkpoint(ckpt, {"version": 1, "bad": lambda: None})  # unpicklable
    assert ckpt.read_bytes() == good
    # a truncated file is reported as corrupt, naming it
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(SystemExit, match=f"checkpoint {ckpt} is corrupt or truncated"):
        train.main(train.cli([*TINY_FLAGS, "--logdir", str(tmp_path), "--resume"]))


def test_a_non_finite_loss_stops_the_run_naming_it_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Rewards turned NaN in the replayed batches after the first checkpoint make the reward loss NaN: the run
    stops at that update with an error naming it and the loss, and the checkpoint on disk stays the good one."""
    sample = train.Replay.sample

    def poisoned(self, batch, length):
        out = sample(self, batch, length)
        if (tmp_path / "ckpt.pt").exists():
            out["reward"] = np.full_like(out["reward"], np.nan)
        return out

    monkeypatch.setattr(train.Replay, "sample", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite wm/rew = nan.* at update \d+ \(env step 2\d00\); stopped before training on; the last good checkpoint"):
        train.main(train.cli([*TINY_FLAGS, "--steps", "6000", "--logdir", str(tmp_path)]))
    ckpt = checkpoint.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["counters"]["env_steps"] == 2000 and ckpt["counters"]["updates"] > 0
    assert all(torch.isfinite(v).all() for v in ckpt["agent"].values() if v.is_floating_point())


def test_signals_still_stop_the_process_after_carl_import():
    """carl's import opens a pygame display; SDL must not swallow SIGTERM / SIGINT (schedulers, Ctrl-C)."""
    import signal
    import subprocess
    import sys

    code = "import envs, time; envs.train_contexts('walker', 'double_box', n=2); print('ready', flush=True); time.sleep(60)"
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        try:
            assert proc.wait(timeout=10) != 0
        finally:
            proc.kill()


def test_resume_takes_the_runs_own_configuration_and_lists_every_conflict(tmp_path, capsys):
    run = [*TINY_FLAGS, "--steps", "2000", "--context", "oracle", "--contexts", "single_0", "--rssm.deter", "24"]
    train.main(train.cli([*run, "--logdir", str(tmp_path)]))
    resumed = train.cli(["--logdir", str(tmp_path), "--resume", "--steps", "4000"])  # no other flag repeated
    assert resumed.agent.context == "oracle" and resumed.rssm.deter == 24 and resumed.steps == 4000
    bad = train.cli(["--logdir", str(tmp_path), "--resume", "--rssm.deter", "64", "--seed", "3", "--threads", "2"])
    with pytest.raises(SystemExit) as err:
        train.main(bad)
    message = str(err.value)
    assert "--rssm.deter: trained with 24, this run asks 64" in message and "--seed: trained with 0, this run asks 3" in message
    assert "threads" not in message  # resumable flags may change
    # --steps already reached: a clear notice, nothing written
    before = (tmp_path / "ckpt.pt").read_bytes()
    train.main(train.cli(["--logdir", str(tmp_path), "--resume"]))
    assert "already trained for 2000 env steps >= --steps 2000" in capsys.readouterr().out
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_bad_flags_fail_before_anything_is_written(tmp_path):
    cases = [
        (["--threads", "-1"], "--threads -1: must be >= 0"),
        (["--prefill", "5000", "--steps", "4000"], "--prefill 5000 >= --steps 4000"),
        # 29 // 2 envs = 14 records per env: T = 8 + K = 6 for DALI-S, but DALI-D samples K + R = 6 + 4 of history
        (["--replay-capacity", "29", "--integration", "deep"], r"--replay-capacity 29: must hold --batch-length \+ 10 history records per env"),
        (["--ctx.refresh", "-1", "--integration", "deep"], r"--ctx.refresh -1: must be >= 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: this torch build or machine has no CUDA device"))
    for flags, message in cases:
        with pytest.raises(SystemExit, match=message):
            train.main(train.cli([*TINY_FLAGS, *flags, "--logdir", str(tmp_path / "x")]))
        assert not (tmp_path / "x").exists()


def test_a_checkpoint_carrying_a_pickled_callable_is_refused(tmp_path):
    import os

    good = tmp_path / "run"
    train.main(train.cli([*TINY_FLAGS, "--steps", "1000", "--logdir", str(good)]))
    ckpt = torch.load(good / "ckpt.pt", weights_only=True)  # plain tensors and types: loads safely
    assert ckpt["counters"]["env_steps"] == 2000  # whole episodes: 20 policy steps x 50 repeats x 2 envs
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({**ckpt, "payload": os.getcwd}, evil / "ckpt.pt")  # a callable, run by a plain unpickler
    with pytest.raises(SystemExit, match="holds objects other than tensors and plain types; refused"):
        checkpoint.load_checkpoint(evil / "ckpt.pt")
    with pytest.raises(SystemExit, match="refused"):
        checkpoint.load_agent(evil)  # a run directory is accepted as well as its ckpt.pt


def test_a_run_without_checkpoint_is_refused_and_resume_drops_logs_after_the_checkpoint(tmp_path):
    import json

    (tmp_path / "metrics.jsonl").write_text('{"step": 1000}\n')  # a killed run that never saved
    with pytest.raises(SystemExit, match="holds logs of a run that saved no checkpoint"):
        train.main(train.cli([*TINY_FLAGS, "--steps", "2000", "--logdir", str(tmp_path)]))
    (tmp_path / "metrics.jsonl").unlink()
    train.main(train.cli([*TINY_FLAGS, "--steps", "2000", "--logdir", str(tmp_path)]))
    with open(tmp_path / "metrics.jsonl", "a") as f:  # lines logged after the checkpoint, before a kill
        f.write('{"step": 3000, "wm/loss": 1.0}\n')
    train.main(train.cli(["--logdir", str(tmp_path), "--resume", "--steps", "4000"]))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3000) == 1 and steps[-1] == 4000


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_at_once_mid_episode_and_exits_cleanly(tmp_path, sig):
    """With 1,000 policy steps per episode the next episode boundary is minutes away: the run saves after the
    current step instead, mid-episode, and exits within seconds."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "train.py", *TINY_FLAGS, "--action-repeat", "1", "--steps", "40000", "--log-every", "200",
           "--save-every", "100000", "--logdir", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "wm/loss" not in proc.stdout.readline():  # training has started
            assert proc.poll() is None, proc.stderr.read()[-2000:]
        start = time.time()
        proc.send_signal(getattr(signal, sig))
        rc = proc.wait(timeout=120)
        seconds = time.time() - start
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert rc == 128 + getattr(signal, sig), err[-2000:]
    assert "Traceback" not in err and "continue with --resume" in err
    ckpt = checkpoint.load_checkpoint(tmp_path / "ckpt.pt")
    steps = ckpt["counters"]["env_steps"]
    assert 0 < steps < 40000 and steps % 2000 != 0 and not ckpt["acting"]["at_boundary"]  # mid-episode (2 envs x 1,000 steps)
    assert seconds < 30, seconds


def test_replay_records_around_episode_boundaries_are_what_the_envs_returned(tmp_path, monkeypatch):
    """Every field of every record train.py stores, the old episode's last and the new one's first included,
    against what each env's own reset and step returned: record t = (o_t, a_{t-1}, r_t, is_first_t,
    is_terminal_t, context_t), the first of an episode (reset obs, a zero action, reward 0, is_first, not
    terminal, the new context), the last (the final obs, the action and reward of the step into it, its
    terminal flag, the old context). Walker's reward is dense, so a new episode keeping the old one's last
    reward shows; single_0 changes the context at every episode."""
    events: list[list[tuple]] = []  # per env: ("reset", obs, info) or ("step", action, obs, reward, term, info)
    make_env = envs.make_env

    def recording(*a, **kw):
        env, log = make_env(*a, **kw), []
        events.append(log)
        reset, step = env.reset, env.step

        def logged_reset(*ra, **rkw):
            o, info = reset(*ra, **rkw)
            log.append(("reset", copy.deepcopy(o), copy.deepcopy(info)))
            return o, info

        def logged_step(action):
            o, r, term, trunc, info = step(action)
            log.append(("step", np.array(action), copy.deepcopy(o), r, term, copy.deepcopy(info)))
            return o, r, term, trunc, info

        env.reset, env.step = logged_reset, logged_step
        return env

    monkeypatch.setattr(envs, "make_env", recording)
    flags = [("walker" if f == "ball_in_cup" else f) for f in TINY_FLAGS]
    train.main(train.cli([*flags, "--context", "none", "--prefill", "5900", "--steps", "5901", "--eval-every", "0", "--logdir", str(tmp_path)]))
    replay = checkpoint.load_checkpoint(tmp_path)["replay"]
    for i, log in enumerate(events):
        expected = []
        for event in log:
            if event[0] == "reset":
                _, o, info = event
                expected.append((o["obs"], np.zeros_like(log[1][1]), 0.0, True, False, info["context_vector"]))
            else:
                _, action, o, r, term, info = event
                expected.append((o["obs"], action, r, False, term, info["context_vector"]))
        expected = expected[: int(replay["count"][i])]  # the last step's new episode is not stored: the run ended
        assert len(expected) == 3 * 21 and sum(e[3] for e in expected) == 3  # 3 episodes of 20 steps: 2 boundaries within
        data = {k: v[i].numpy() for k, v in replay["data"].items()}
        for t, (obs, action, reward, is_first, is_terminal, context) in enumerate(expected):
            got = (data["obs"][t], data["action"][t], data["reward"][t], data["is_first"][t], data["is_terminal"][t], data["context"][t])
            want = (obs, action, reward, is_first, is_terminal, context)
            for name, g, w in zip(("obs", "action", "reward", "is_first", "is_terminal", "context"), got, want):
                assert np.array_equal(g, np.asarray(w, g.dtype)), f"env {i} record {t}: {name} {g} stored, {w} returned"
        assert (data["reward"][[21, 42]] == 0).all() and (data["reward"][[20, 41]] != 0).all()  # dense: the zeroing is visible


def test_a_second_train_py_on_a_logdir_in_use_exits_at_once_naming_the_holder(tmp_path):
    """Two train.py on one logdir would interleave metrics.jsonl and race on ckpt.pt.tmp: the second is refused
    while the first runs, with the first's pid, host, start time and command; the lock ends with its holder."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "train.py", *TINY_FLAGS, "--action-repeat", "1", "--steps", "40000", "--log-every", "200",
           "--save-every", "100000", "--logdir", str(tmp_path)]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "prefill:" not in first.stdout.readline():  # it holds the lock from before its first line
            assert first.poll() is None, first.stderr.read()[-2000:]
        start = time.time()
        second = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=120)
        seconds = time.time() - start
        assert first.poll() is None  # the first one runs on, undisturbed
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 128 + signal.SIGINT
    finally:
        first.kill()
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"error: {tmp_path} is in use by another train.py: pid {first.pid} on {socket.gethostname()} since 20" in second.stderr
    assert f"train.py {' '.join(TINY_FLAGS[:4])}" in second.stderr  # the holder's command
    assert seconds < 30, seconds  # at once: python and torch's import, no waiting
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == sorted(json.loads(r)["step"] for r in rows)  # one writer
    os.close(dir_lock.acquire(tmp_path / "train.lock"))  # the lock ended with its holder


def test_a_second_signal_exits_at_once_even_when_both_arrive_during_one_long_c_call():
    """Python runs a signal's handler between bytecodes, so two signals that land during one long torch op
    would call it once: StopRequest counts the deliveries themselves. A first signal asks for a checkpoint
    (signum set, no exit); a second, 50 ms later while the same matmul still runs, exits with 128 + its
    number."""
    import os
    import signal
    import subprocess

    import time

    a = torch.randn(3000, 3000)  # a product takes about a second on one thread: both signals land in one
    stop, sender = train.StopRequest(), None
    try:
        os.kill(os.getpid(), signal.SIGINT)
        a[:10] @ a  # the handler ran: a request, no exit
        assert stop.signum == signal.SIGINT and stop.count == 1
        stop.signum, stop.count = 0, 0
        sender = subprocess.Popen(["sh", "-c", f"sleep 0.3; kill -INT {os.getpid()}; sleep 0.05; kill -INT {os.getpid()}"])
        start = time.time()
        with pytest.raises(SystemExit) as stopped:
            while time.time() - start < 20:
                a @ a
        assert stopped.value.code == 128 + signal.SIGINT
    finally:
        stop.restore()
        if sender is not None:
            sender.wait()


@pytest.mark.parametrize("obs,integration,when,objective", [("features", "deep", "update", "fd"), ("pixels", "shallow", "update", "fd"),
                                                       ("features", "deep", "eval", "fd"), ("features", "shallow", "update", "tc")])  # fmt: skip
def test_a_run_interrupted_mid_episode_resumes_bit_identically(tmp_path, monkeypatch, obs, integration, when, objective):
    """A SIGTERM in the middle of an episode, or during a periodic evaluation, then --resume: parameters,
    optimiser states, replay, counters and every logged metric equal an uninterrupted run's (learned
    context, so the context windows are restored too; with --ctx.objective tc, L_TC's model, its EMA target
    encoder and the random stream of its sampled codes). The evaluation stops at its next step and is redone
    on resume, from the random streams it started with."""
    import json
    import os
    import signal

    episodes = "16" if when == "eval" else "2"  # 16 only where an evaluation is interrupted: pixel ones render each
    flags = [*TINY_FLAGS, "--obs", obs, "--integration", integration, "--ctx.objective", objective, "--steps", "4000", "--eval-episodes", episodes]
    train.main(train.cli([*flags, "--logdir", str(tmp_path / "full")]))
    sample, calls = train.Replay.sample, [0]
    eval_calls = [0]

    def signalling(self, batch, length):  # the 30th batch is drawn at about env step 1,200 of the first 2,000-step episode
        calls[0] += 1
        if calls[0] == 30:
            os.kill(os.getpid(), signal.SIGTERM)
        return sample(self, batch, length)

    class SignallingEval(rollout.VectorEnv):  # the evaluation at env step 2,000: 16 episodes of 20 steps in lockstep
        def step(self, action):
            eval_calls[0] += 1
            if eval_calls[0] == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().step(action)

    if when == "update":
        monkeypatch.setattr(train.Replay, "sample", signalling)
    else:
        monkeypatch.setattr(rollout, "VectorEnv", SignallingEval)  # the evaluation's envs only
    with pytest.raises(SystemExit) as stopped:
        train.main(train.cli([*flags, "--logdir", str(tmp_path / "cut")]))
    assert stopped.value.code == 128 + signal.SIGTERM
    cut = checkpoint.load_checkpoint(tmp_path / "cut")
    if when == "update":
        assert cut["counters"]["env_steps"] % 2000 != 0 and "eval_due" not in cut["acting"]  # mid-episode
    else:  # abandoned at its next step, not after 16 x 20 steps; saved with its redo due, nothing logged at 2,000 yet
        assert eval_calls[0] == 5 and cut["counters"]["env_steps"] == 2000 and cut["acting"]["eval_due"]
        assert all(json.loads(line)["step"] < 2000 for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines())
    monkeypatch.undo()
    train.main(train.cli([*flags, "--logdir", str(tmp_path / "cut"), "--resume"]))
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("full", "cut"))
    same = lambda c: {k: v for k, v in c.items() if k != "seconds"}  # noqa: E731 (wall-clock is not reproducible)
    assert same(a["counters"]) == same(b["counters"])
    for k, v in a["agent"].items():
        assert torch.equal(v, b["agent"][k]), k
    for name in a["optimizers"]:
        for i, s in a["optimizers"][name]["state"].items():
            assert all(torch.equal(v, b["optimizers"][name]["state"][i][k]) for k, v in s.items()), name
    for k, v in a["replay"]["data"].items():
        assert torch.equal(v, b["replay"]["data"][k]), k
    if integration == "deep":  # DALI-D's records hold their step in the episode, 0 at is_first (dali.held_context reads it)
        data = a["replay"]["data"]
        assert data["is_first"][:, 0].all() and data["is_first"].sum() > 2
        assert torch.equal(data["step"].long(), dali.episode_steps(data["is_first"]))
        assert data["step"].max() == envs.EPISODE_STEPS // 50  # the last record of an episode: o_T after T steps
    rows = [[{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("full", "cut")]  # fmt: skip
    assert rows[0] == rows[1]


# ----------------------------------------------------------------------------------------------------
# context_encoder.py and its integration: causality, isolation, no leak, wiring
# ----------------------------------------------------------------------------------------------------


def _encoder(K=5, seed=0):
    torch.manual_seed(seed)
    enc = context_encoder.ContextEncoder(context_encoder.ContextEncoderConfig(window=K, units=16, heads=2, fd_units=16), obs=3, action=2)
    with torch.no_grad():  # untrained but not degenerate: random position biases and output layer
        enc.position.normal_()
        enc.out[-1].weight.normal_()
    return enc.eval()


def test_context_is_causal_windowed_and_episode_local():
    enc, K, L, t = _encoder(K=5), 5, 20, 14
    torch.manual_seed(1)
    obs, action = torch.randn(1, L, 3), torch.randn(1, L, 2)
    is_first = torch.zeros(1, L, dtype=torch.bool)
    is_first[0, 0] = is_first[0, 7] = True  # second episode starts at step 7
    ctx_of = lambda o, a: enc.segment(o, a, is_first)[0][0]  # noqa: E731
    base = ctx_of(obs, action)

    def changed(o=None, a=None):
        return not torch.allclose(ctx_of(obs if o is None else o, action if a is None else a)[t], base[t])

    future_o, future_a = obs.clone(), action.clone()
    future_o[0, t + 1 :] += 5.0  # o_{t+1}, ...: transitions at or after t
    future_a[0, t + 1 :] += 5.0  # a_t, ...  (a_t is stored with record t+1)
    assert not changed(o=future_o) and not changed(a=future_a)
    old = obs.clone()
    old[0, t - K - 1] += 5.0  # one step older than the window
    assert not changed(o=old)
    inside = obs.clone()
    inside[0, t - 2] += 5.0  # within the window
    assert changed(o=inside)
    current = obs.clone()
    current[0, t] += 5.0  # o_t ends transition t-1, the newest one in the window
    assert changed(o=current)
    # right after the episode start: the previous episode does not count
    prev_episode = obs.clone()
    prev_episode[0, 3:7] += 5.0
    assert torch.allclose(ctx_of(prev_episode, action)[8], base[8]) and torch.allclose(ctx_of(prev_episode, action)[7], base[7])
    assert torch.equal(base[7], enc.empty) and torch.equal(base[0], enc.empty)  # no transition yet: learned vector
    assert not torch.allclose(base[8], enc.empty)


def test_encode_last_equals_last_row_of_full_encode():
    """Acting pools only the newest window (1/K of the attention): the same numbers as the full pass,
    for full, partly filled and empty windows."""
    enc, K = _encoder(K=6), 6
    torch.manual_seed(3)
    tokens = torch.randn(5, K, enc.token_size)
    valid = torch.ones(5, K, dtype=torch.bool)
    valid[1, :2] = False  # a short window (episode started 4 transitions ago)
    valid[2, :5] = False  # one transition
    valid[3, -1] = False  # the newest observation starts an episode: empty window
    valid[4] = False
    full = enc.encode(tokens, valid, torch.zeros(5, K, dtype=torch.long))[:, -1]
    last = enc.encode_last(tokens, valid)
    torch.testing.assert_close(last, full)
    assert torch.equal(last[3], enc.empty) and torch.equal(last[4], enc.empty)


def test_acting_window_equals_training_segment():
    """One definition of ctx_t: the per-env window used when acting gives what replay training computes."""
    enc, L = _encoder(K=4), 15
    torch.manual_seed(2)
    obs, action = torch.randn(2, L, 3), torch.randn(2, L, 2)
    is_first = torch.zeros(2, L, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[0, 6] = is_first[1, 9] = True
    ctx, _ = enc.segment(obs, action, is_first)
    window = context_window.ContextWindow(enc, 2, "cpu")
    for t in range(L):
        acted = window.update(obs[:, t], action[:, t], is_first[:, t])
        torch.testing.assert_close(acted, ctx[:, t], rtol=1e-5, atol=1e-5)
    # Training updates g between acting steps: the window's ctx must use the current weights throughout.
    with torch.no_grad():
        enc.embed[0].weight.mul_(1.5)
    obs2, action2 = torch.cat([obs, torch.randn(2, 1, 3)], 1), torch.cat([action, torch.randn(2, 1, 2)], 1)
    acted = window.update(obs2[:, L], action2[:, L], torch.zeros(2, dtype=torch.bool))
    fresh, _ = enc.segment(obs2, action2, torch.cat([is_first, torch.zeros(2, 1, dtype=torch.bool)], 1))
    torch.testing.assert_close(acted, fresh[:, L], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("integration", ["shallow", "deep"])
def test_only_the_forward_dynamics_loss_trains_the_encoder(integration):
    torch.manual_seed(0)
    agent = _agent("learned", integration)
    batch = _batch(T=8 + agent.context_prefix)
    ctx, seq_ctx, pieces = agent.context(batch)
    trimmed = {k: v[:, agent.context_prefix :] for k, v in batch.items()}
    losses, post = agent.wm.loss(trimmed, ctx, seq_ctx)
    ac_losses, _ = agent.ac.loss(agent.wm, post, ctx, trimmed["is_terminal"])
    total = sum(v.mean() for v in losses.values()) + sum(v.mean() for v in ac_losses.values())
    total.backward()
    enc_grads = [p.grad for p in agent.ctx_encoder.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert enc_grads == []  # world model and actor-critic losses give the encoder no gradient
    agent.zero_grad(set_to_none=True)
    P, x = agent.context_prefix, pieces["x"]
    fd = context_encoder.forward_dynamics_loss(agent.ctx_encoder, x[:, P:-1], x[:, P + 1 :], batch["action"][:, P + 1 :], pieces["ctx"][:, P:-1], pieces["valid"][:, P:])
    fd.mean().backward()
    assert agent.ctx_encoder.embed[0].weight.grad.abs().sum() > 0 and agent.ctx_encoder.attention.in_proj_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in agent.wm.parameters())


def test_context_wiring_shallow_vs_deep():
    X, F = 8, rssm.RSSM(TINY_RSSM, 1, 2).feat_size
    shallow, deep = _agent("learned", "shallow"), _agent("learned", "deep")
    # DALI-S: ctx only into the posterior q(z | h, x, ctx)
    assert shallow.wm.rssm.ctx_post_size == X and shallow.wm.rssm.ctx_seq_size == 0
    assert shallow.ac.actor.net[0][0].in_features == F and shallow.ac.critic[0][0].in_features == F
    assert shallow.wm.reward_head[0][0].in_features == F and shallow.wm.cont_head[0][0].in_features == F
    # DALI-D: sequence model, reward, continue, decoder, actor, critic
    assert deep.wm.rssm.ctx_seq_size == X and deep.wm.rssm.ctx_post_size == 0
    for head in (deep.ac.actor.net, deep.ac.critic, deep.wm.reward_head, deep.wm.cont_head, deep.wm.decoder.net):
        assert head[0][0].in_features == F + X
    # cRSSM-S: the true context into the encoder and back out of the decoder; Dreamer-DR: nowhere
    oracle = _agent("oracle", "shallow")
    assert oracle.wm.encoder.net[0][0].in_features == 8 + 2 and oracle.wm.decoder.net[-1].out_features == 8 + 2
    none = _agent("none", "deep")
    assert none.wm.rssm.ctx_seq_size == none.wm.rssm.ctx_post_size == 0 and none.ac.actor.net[0][0].in_features == F


def _linear_probe_r2(x_train, y_train, x_test, y_test):
    from probes import linear_r2  # the probe counterfactual.py reports

    return float(linear_r2(*(a.double().numpy() for a in (x_train, y_train, x_test, y_test)))[0])


def test_context_encoder_learns_gravity_from_random_policy_data():
    """L_FD alone makes ctx encode gravity: a linear probe on held-out episodes (other random states, the
    same 100 training gravities) reaches R^2 >= 0.7, far above the same probe on the untrained encoder.
    About 60 s on 2 cores."""
    torch.manual_seed(0)
    K, L, S = 64, 96, 150
    obs, actions, ctx_true = map(torch.tensor, probes.random_rollouts("ball_in_cup", "single_0", 160, S, seed=0))
    n_train = 120
    cfg = context_encoder.ContextEncoderConfig(window=K)
    enc = context_encoder.ContextEncoder(cfg, obs=8, action=2)
    opt = torch.optim.Adam(enc.parameters(), cfg.lr)

    def probe():
        with torch.no_grad():  # ctx at several steps of each episode, each from a full window
            ts = range(K + 1, S + 1, 20)
            ctx = torch.stack([enc.segment(obs[:, t - K : t + 1], actions[:, t - K : t + 1], torch.zeros(len(obs), K + 1, dtype=torch.bool))[0][:, -1] for t in ts], 1)
        y = ctx_true[:, None, :1].expand(-1, len(ts), -1)
        return _linear_probe_r2(ctx[:n_train].flatten(0, 1), y[:n_train].flatten(0, 1), ctx[n_train:].flatten(0, 1), y[n_train:].flatten(0, 1))

    untrained, before = probe(), [p.detach().clone() for p in enc.parameters()]
    losses = []
    for _ in range(600):
        idx = torch.randint(0, n_train, (32,))
        steps = torch.randint(0, S + 1 - L, (32,))[:, None] + torch.arange(L)
        o, a = obs[idx[:, None], steps], actions[idx[:, None], steps]
        ctx, valid = enc.segment(o, a, torch.zeros(32, L, dtype=torch.bool))
        loss = context_encoder.forward_dynamics_loss(enc, o[:, :-1], o[:, 1:], a[:, 1:], ctx[:, :-1], valid).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    trained = probe()
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])  # L_FD falls
    assert all(not torch.equal(p, b) for p, b in zip(enc.parameters(), before))  # g and f move
    # pooled random features of transitions already say something (R^2 ~0.6); training must cut the
    # unexplained variance at least fourfold (measured: 0.57 -> 0.95)
    assert trained >= 0.7 and (1 - trained) < (1 - untrained) / 4, (untrained, trained)


# ----------------------------------------------------------------------------------------------------
# temporal_consistency.py: SPC's latent temporal consistency L_TC as g's objective (--ctx.objective tc)
# ----------------------------------------------------------------------------------------------------

import torch.nn.functional as F  # noqa: E402

import temporal_consistency  # noqa: E402


def _tc_agent(integration="shallow", objective="tc"):
    spaces = dali.Spaces(action=2, obs=8, image=None, context=2)
    cfg = dali.AgentConfig(context="learned", integration=integration, **TINY_AGENT)
    ctx_cfg = context_encoder.ContextEncoderConfig(window=4, units=16, heads=2, fd_units=16, objective=objective, tc_groups=4, tc_units=16)
    return dali.Agent(cfg, TINY_RSSM, spaces, ctx_cfg)


def _tc_model(seed=0, groups=3):
    torch.manual_seed(seed)
    model = temporal_consistency.TemporalConsistencyModel(obs=3, action=2, ctx=2, groups=groups, units=16)
    with torch.no_grad():  # the target encoder apart from the online one, as after training
        for p in model.target.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def test_fsq_quantises_to_its_levels_and_passes_straight_through_gradients():
    z = (3 * torch.randn(500, 4, 2)).requires_grad_()
    codes, index = temporal_consistency.fsq(z)
    assert set(codes[..., 0].unique().tolist()) == {-1.0, -0.5, 0.0, 0.5, 1.0}  # level 5
    assert set(codes[..., 1].unique().tolist()) == {-1.0, 0.0, 1.0}  # level 3
    half_l, half_width = torch.tensor([2.002, 1.001]), torch.tensor([2.0, 1.0])  # (level - 1)(1 + 1e-3) / 2, level // 2
    bounded = torch.tanh(z.detach()) * half_l
    assert torch.equal(codes.detach(), torch.round(bounded) / half_width)  # the nearest level of the bounded value
    assert torch.equal(temporal_consistency.fsq_codebook()[index], codes.detach())  # index i is codebook row i
    assert index.min() == 0 and index.max() == 14
    w = torch.randn_like(z)
    (codes * w).sum().backward()  # straight-through: the gradient of the bounded value, as if unrounded
    torch.testing.assert_close(z.grad, w * half_l * (1 - torch.tanh(z.detach()) ** 2) / half_width)


def test_temporal_consistency_loss_equals_spc_written_out(monkeypatch):
    """L_TC = 1/H sum_k rho^(k-1) CE(d(c^_{t+k-1}, a_{t+k-1}, ctx_t), index(FSQ(e_bar(o_{t+k})))), c^_t = FSQ(e(o_t)),
    written out per rollout, with the sampled codes made deterministic (argmax) so that both agree."""
    monkeypatch.setattr(temporal_consistency, "straight_through_sample", lambda logits: F.one_hot(logits.argmax(-1), logits.shape[-1]).float())
    model, G = _tc_model(), 3
    B, N, H, rho = 2, 6, 3, 0.9
    g = torch.Generator().manual_seed(1)
    obs, action, ctx = torch.randn(B, N + 1, 3, generator=g), torch.randn(B, N, 2, generator=g), torch.randn(B, N, 2, generator=g)
    loss = temporal_consistency.temporal_consistency_loss(model, obs, action, ctx, torch.ones(B, N, dtype=torch.bool), H, rho)
    codebook = temporal_consistency.fsq_codebook()
    for b in range(B):
        for j in range(N):
            code, total = temporal_consistency.fsq(model.encoder(layers.symlog(obs[b, j])).view(G, 2))[0].flatten(), 0.0
            for k in range(1, min(H, N - j) + 1):  # targets beyond the segment's end do not count
                logits = model.transition(torch.cat([code, action[b, j + k - 1], ctx[b, j]])).view(G, -1)
                target = temporal_consistency.fsq(model.target(layers.symlog(obs[b, j + k])).view(G, 2))[1]  # the EMA encoder's
                total = total + rho ** (k - 1) * F.cross_entropy(logits, target)
                code = codebook[logits.argmax(-1)].flatten()
            torch.testing.assert_close(loss[b, j], total / H)


def test_episode_starts_mask_the_temporal_consistency_loss():
    model = _tc_model()
    B, N, H = 2, 9, 4
    g = torch.Generator().manual_seed(2)
    obs, action, ctx = torch.randn(B, N + 1, 3, generator=g), torch.randn(B, N, 2, generator=g), torch.randn(B, N, 2, generator=g)
    changed_obs, changed_action = obs.clone(), action.clone()
    changed_obs[:, 4:] += 3.0  # o_4 onwards, and a_3 onwards (a_3 is taken at o_3 and leads to o_4)
    changed_action[:, 3:] += 1.0
    split = torch.ones(B, N, dtype=torch.bool)
    split[:, 3] = False  # o_4 starts a new episode

    def loss(o, a, valid):
        torch.manual_seed(0)  # the same sampled codes in every call
        return temporal_consistency.temporal_consistency_loss(model, o, a, ctx, valid, H, 0.99)

    before, after = loss(obs, action, split), loss(changed_obs, changed_action, split)
    assert torch.equal(before[:, :3], after[:, :3])  # rollouts from o_0 .. o_2 stop at o_3, however long H is
    assert (before[:, :3] > 0).all() and (before[:, 3] == 0).all()  # a rollout from o_3 has no valid step
    assert not torch.equal(before[:, 4:], after[:, 4:])
    whole = torch.ones(B, N, dtype=torch.bool)  # without the episode start the change reaches the earlier rollouts
    assert not torch.equal(loss(obs, action, whole)[:, :3], loss(changed_obs, changed_action, whole)[:, :3])


@pytest.mark.parametrize("integration", ["shallow", "deep"])
def test_temporal_consistency_trains_exactly_g_and_its_own_model(integration):
    torch.manual_seed(0)
    fd_agent = _tc_agent(integration, objective="fd")
    torch.manual_seed(0)
    agent = _tc_agent(integration)
    fd_state, state = fd_agent.state_dict(), agent.state_dict()
    assert state.keys() - fd_state.keys() == {k for k in state if k.startswith("tc.")}  # one more model, built last:
    assert all(torch.equal(v, state[k]) for k, v in fd_state.items())  # g, world model, actor-critic start as with L_FD
    batch = _batch(T=8 + agent.context_prefix)
    ctx, seq_ctx, pieces = agent.context(batch)
    fd_ctx, fd_seq_ctx, _ = fd_agent.context(batch)
    assert torch.equal(ctx, fd_ctx) and torch.equal(seq_ctx, fd_seq_ctx)  # ctx reaches the agent as with L_FD
    # world-model and actor-critic losses reach neither g nor L_TC's model
    trimmed = {k: v[:, agent.context_prefix :] for k, v in batch.items()}
    losses, post = agent.wm.loss(trimmed, ctx, seq_ctx)
    ac_losses, _ = agent.ac.loss(agent.wm, post, ctx, trimmed["is_terminal"])
    (sum(v.mean() for v in losses.values()) + sum(v.mean() for v in ac_losses.values())).backward()
    theirs = [*agent.ctx_encoder.parameters(), *agent.tc.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in theirs)
    agent.zero_grad(set_to_none=True)
    # L_TC reaches g and L_TC's encoder and transition model, nothing else (not f, not the target encoder)
    P, x = agent.context_prefix, pieces["x"]
    tc = temporal_consistency.temporal_consistency_loss(agent.tc, x[:, P:], batch["action"][:, P + 1 :], pieces["ctx"][:, P:-1], pieces["valid"][:, P:], 5, 0.99)
    tc.mean().backward()
    reached = {n for n, p in agent.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"ctx_encoder.embed.0.weight", "ctx_encoder.attention.in_proj_weight", "ctx_encoder.out.1.weight", "tc.encoder.0.0.weight", "tc.transition.0.0.weight", "tc.transition.2.weight"} <= reached
    assert all(n.startswith(("ctx_encoder.", "tc.encoder.", "tc.transition.")) and not n.startswith("ctx_encoder.forward_model.") for n in reached), reached
    # g's optimiser holds g (without f) and L_TC's encoder and transition model; the target encoder is in none
    optimised = {id(p) for opt in agent.optimizers.values() for group in opt.param_groups for p in group["params"]}
    in_ctx_opt = {n for n, p in agent.named_parameters() if id(p) in {id(q) for group in agent.ctx_opt.param_groups for q in group["params"]}}
    assert in_ctx_opt == {n for n, _ in agent.named_parameters() if n.startswith(("ctx_encoder.", "tc.encoder.", "tc.transition.")) and not n.startswith("ctx_encoder.forward_model.")}
    assert not any(id(p) in optimised or p.requires_grad for p in agent.tc.target.parameters())


def test_l_tc_rolls_out_from_each_step_with_the_actions_taken_there(monkeypatch):
    """Record t holds (o_t, a_{t-1}, ...): the action taken at o_t is stored in record t + 1. The agent must hand
    L_TC, for each training step t but the last, o_t, then a_t, a_{t+1}, ... (records t + 1, t + 2, ...),
    ctx_t, and whether o_{t+1} continues o_t's episode. Every record is tagged with its index to see which."""
    agent = _tc_agent("shallow")
    P, T = agent.context_prefix, 8
    batch = _batch(T=P + T)
    index = torch.arange(P + T, dtype=torch.float32)[None, :]  # (1, P + T)
    batch["obs"][..., 0], batch["action"][..., 0] = index, index / (P + T)  # actions stay in [-1, 1]
    batch["is_first"][1, P + 3] = True  # seq 1: a new episode starts at record P + 3
    batch["step"] = dali.episode_steps(batch["is_first"])
    _, _, pieces = agent.context(batch)
    seen = {}

    def capture(model, obs, action, ctx, valid, horizon, rho):
        seen.update(obs=obs, action=action, ctx=ctx, valid=valid)
        return (ctx * 0).sum(-1)  # (B, T - 1)

    monkeypatch.setattr(dali, "temporal_consistency_loss", capture)
    agent.update_context_encoder_tc(batch, pieces)
    steps = P + torch.arange(T - 1, dtype=torch.float32)  # t = P .. P + T - 2: each rollout's start
    assert torch.equal(seen["obs"][0, : T - 1, 0], steps)  # the rollout from step t starts at o_t
    assert torch.allclose(seen["action"][0, :, 0] * (P + T), steps + 1)  # a_t: record t + 1
    assert torch.equal(seen["ctx"], pieces["ctx"][:, P : P + T - 1])  # ctx_t, whose window ends at o_t
    assert seen["valid"][1].tolist() == [i != 2 for i in range(T - 1)]  # o_{P+3} starts an episode: no o_{P+2} -> o_{P+3}
    assert seen["valid"][0].all()


def test_the_target_encoder_moves_only_by_its_exponential_moving_average():
    torch.manual_seed(0)
    agent = _tc_agent()
    tc = agent.tc
    assert all(torch.equal(t, e) for t, e in zip(tc.target.parameters(), tc.encoder.parameters()))  # starts as a copy of e
    g_before, f_before = agent.ctx_encoder.embed[0].weight.clone(), agent.ctx_encoder.forward_model[0][0].weight.clone()
    for seed in range(2):
        before = [p.clone() for p in tc.target.parameters()]
        metrics = agent.update(_batch(T=8 + agent.context_prefix, seed=seed))
        assert torch.isfinite(metrics["ctx/tc_loss"])
        for old, new, online in zip(before, tc.target.parameters(), tc.encoder.parameters()):
            torch.testing.assert_close(new, old + 0.005 * (online - old), rtol=0, atol=1e-7)  # e_bar <- e_bar + tau (e - e_bar)
        assert any(not torch.equal(old, new) for old, new in zip(before, tc.target.parameters()))
    assert not torch.equal(agent.ctx_encoder.embed[0].weight, g_before)  # the update trains g through L_TC
    assert torch.equal(agent.ctx_encoder.forward_model[0][0].weight, f_before)  # and leaves f alone


def test_a_checkpoint_of_one_context_objective_is_refused_by_the_other(tmp_path):
    for trained, asked in (("tc", "fd"), ("fd", "tc")):
        logdir = tmp_path / trained
        train.main(train.cli([*TINY_FLAGS, "--steps", "1000", "--ctx.objective", trained, "--logdir", str(logdir)]))
        assert any(k.startswith("tc.") for k in checkpoint.load_checkpoint(logdir)["agent"]) == (trained == "tc")
        with pytest.raises(SystemExit, match=f"--ctx.objective: trained with '{trained}', this run asks '{asked}'"):
            train.main(train.cli([*TINY_FLAGS, "--steps", "2000", "--ctx.objective", asked, "--logdir", str(logdir), "--resume"]))
    with pytest.raises(SystemExit, match="--ctx.cross-weight 1.0 with --ctx.objective tc"):
        train.main(train.cli([*TINY_FLAGS, "--ctx.objective", "tc", "--ctx.cross-weight", "1", "--logdir", str(tmp_path / "x")]))


# ----------------------------------------------------------------------------------------------------
# evaluate.py: rliable's statistics, the grid evaluation, bad results files
# ----------------------------------------------------------------------------------------------------

import evaluate  # noqa: E402
import scores  # noqa: E402


def test_iqm_is_the_25_percent_trimmed_mean_and_other_metrics():
    x = np.random.default_rng(0).uniform(0, 1.2, size=(5, 8))
    flat = np.sort(x.ravel())
    assert np.isclose(scores.iqm(x), flat[10:30].mean())  # 40 scores: the middle 20
    scipy_stats = pytest.importorskip("scipy.stats")
    assert np.isclose(scores.iqm(x), scipy_stats.trim_mean(x, 0.25, axis=None))
    assert np.isclose(scores.median(x), np.median(x.mean(0)))
    assert np.isclose(scores.optimality_gap(x), np.mean(np.maximum(0, 1 - x)))
    batch = np.stack([x, x + 1])  # the metrics broadcast over leading bootstrap axes
    assert np.allclose(scores.iqm(batch), [scores.iqm(x), scores.iqm(x + 1)])


def test_probability_of_improvement_and_bootstrap_intervals():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(4, 6))
    assert scores.probability_of_improvement(x, x) == 0.5  # identical samples: every pair ties or cancels
    assert scores.probability_of_improvement(x + 2, x) == 1.0 and scores.probability_of_improvement(x, x + 2) == 0.0
    # the Mann-Whitney definition on one task: count of wins + half the ties over all pairs
    a, b = np.array([[1.0], [2.0], [3.0]]), np.array([[2.0], [0.0]])
    assert scores.probability_of_improvement(a, b) == (0.5 + 1 + 1 + 1 + 1 + 0) / 6
    for name, metric in scores.METRICS.items():
        est = scores.metric_with_ci(x, metric, 500, np.random.default_rng(0))
        assert est["ci"][0] <= est["value"] <= est["ci"][1], name
    boot = scores.bootstrap(x, 200, np.random.default_rng(0))
    for task in range(6):  # stratified: task j's resampled runs come from task j's column only
        assert np.isin(boot[:, :, task], x[:, task]).all()
    poi = scores.improvement_with_ci(x + 0.1, x, 500, np.random.default_rng(0))
    assert poi["ci"][0] <= poi["value"] <= poi["ci"][1] and poi["value"] > 0.5


# Reference values computed with rliable 1.2.0 itself (metrics.aggregate_*, probability_of_improvement,
# library.get_interval_estimates with 50,000 percentile-bootstrap reps) on these (5 runs x 7 tasks) scores.
# rliable is not a dependency: it imports only with pandas < 3 (its `arch` dependency breaks on pandas 3).
RLIABLE_A = np.array([[0.636962, 0.269787, 0.040974, 0.016528, 0.813270, 0.912756, 0.606636],
     [0.729497, 0.543625, 0.935072, 0.815854, 0.002739, 0.857404, 0.033586],
     [0.729655, 0.175656, 0.863179, 0.541461, 0.299712, 0.422687, 0.028320],
     [0.124283, 0.670624, 0.647190, 0.615385, 0.383678, 0.997210, 0.980835],
     [0.685542, 0.650459, 0.688447, 0.388921, 0.135097, 0.721488, 0.525354]])
RLIABLE_B = np.array([[0.545107, 0.150447, 0.019817, 0.091620, 0.799959, 0.604298, 0.636701],
     [0.718185, 0.513031, 0.774504, 0.621291, 0.147993, 0.881949, 0.207032],
     [0.715235, 0.176263, 0.569711, 0.432724, 0.305417, 0.209314, 0.062168],
     [0.142413, 0.606104, 0.399340, 0.426138, 0.263299, 0.680788, 0.958605],
     [0.498843, 0.553264, 0.524900, 0.469484, 0.240113, 0.640526, 0.199932]])
RLIABLE_REF = {  # metric: (point, CI low, CI high)
    "A": {"IQM": (0.566164, 0.4363, 0.6682), "mean": (0.528282, 0.4376, 0.6165), "median": (0.475630, 0.3844, 0.6503), "optimality gap": (0.471718, 0.3835, 0.5624)},
    "B": {"IQM": (0.454006, 0.3489, 0.5532), "mean": (0.451043, 0.3733, 0.5292), "median": (0.412888, 0.3383, 0.5558), "optimality gap": (0.548957, 0.4708, 0.6267)},
}
RLIABLE_POI = (0.611429, 0.4686, 0.7486)  # P(A > B)


def test_statistics_match_rliable_reference_values():
    rng = np.random.default_rng(0)
    for name, x in (("A", RLIABLE_A), ("B", RLIABLE_B)):
        for metric, (point, lo, hi) in RLIABLE_REF[name].items():
            est = scores.metric_with_ci(x, scores.METRICS[metric], 20_000, rng)
            assert abs(est["value"] - point) < 1e-5, (name, metric)
            assert abs(est["ci"][0] - lo) < 0.02 and abs(est["ci"][1] - hi) < 0.02, (name, metric, est, lo, hi)  # Monte-Carlo noise
    poi = scores.improvement_with_ci(RLIABLE_A, RLIABLE_B, 20_000, rng)
    assert abs(poi["value"] - RLIABLE_POI[0]) < 1e-5
    assert abs(poi["ci"][0] - RLIABLE_POI[1]) < 0.02 and abs(poi["ci"][1] - RLIABLE_POI[2]) < 0.02, poi


@pytest.mark.parametrize("flags,name", [(["--context", "none"], "Dreamer-DR"), (["--context", "oracle", "--integration", "deep"], "cRSSM-D"),
                                        (["--context", "learned", "--integration", "shallow"], "DALI-S"), (["--context", "learned", "--integration", "deep"], "DALI-D"),
                                        (["--context", "learned", "--ctx.cross-weight", "1"], "DALI-S-chi"), (["--context", "learned", "--ctx.objective", "tc"], "DALI-S-TC"),
                                        (["--context", "learned", "--integration", "deep", "--ctx.objective", "tc"], "DALI-D-TC"),
                                        (["--context", "oracle", "--ctx.cross-weight", "1"], "cRSSM-S")])  # fmt: skip
def test_results_files_name_each_variant_apart(flags, name):
    """The method a results line, a figure's legend and a study report carry: every variant its own name, from the
    parsed flags and from the saved args dict (whose older runs lack later fields), so L_TC's runs never pool as DALI-S."""
    args = train.cli([*TINY_FLAGS, *flags])
    saved = dataclasses.asdict(args)
    assert config.method_name(args) == config.method_name(config.args_from_dict(saved)) == name
    del saved["ctx"]["objective"]  # a run from before --ctx.objective: L_FD
    assert config.method_name(config.args_from_dict(saved)) == name.removesuffix("-TC")


TINY_EVAL_FLAGS = [*TINY_FLAGS, "--steps", "2000", "--contexts", "single_0", "--context", "learned", "--integration", "deep"]


@pytest.fixture(scope="module")
def tiny_dali_run(tmp_path_factory):
    """A tiny DALI-D run on ball_in_cup single_0 (20 policy steps per episode): its checkpoint."""
    logdir = tmp_path_factory.mktemp("dali_run")
    train.main(train.cli([*TINY_EVAL_FLAGS, "--logdir", str(logdir)]))
    return logdir / "ckpt.pt"


def test_grid_evaluation_writes_one_line_per_context_and_aggregates(tiny_dali_run, tmp_path):
    import json

    out = tmp_path / "new" / "folder" / "seed0.jsonl"  # folders are created before the evaluation starts
    rows = evaluate.main(["run", "--checkpoint", str(tiny_dali_run.parent), "--setting", "single_0", "--episodes", "2", "--out", str(out),
                          "--no-progress", "--threads", "1"])  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    grid = envs.eval_contexts("ball_in_cup", "single_0")
    assert len(lines) == len(rows) == len(grid) == 14
    for line, (context, regime) in zip(lines, grid):
        assert line["context"] == context and line["regime"] == regime and len(line["returns"]) == 2
        assert line["method"] == "DALI-D" and line["task"] == "ball_in_cup" and np.isclose(line["mean"], np.mean(line["returns"]))
    assert {line["regime"] for line in lines} == {"interpolation", "extrapolation"}
    # a second "seed" and a second method: aggregate them (a copy stands in for another run)
    files = []
    for method, seed in [("A", 0), ("A", 1), ("B", 0), ("B", 1)]:
        f = tmp_path / f"{method}{seed}.jsonl"
        f.write_text("".join(json.dumps({**line, "method": method, "seed": seed, "returns": [r + (seed + 1) * 10 for r in line["returns"]]}) + "\n" for line in lines))
        files.append(str(f))
    summary = evaluate.main(["aggregate", *files, "--out", str(tmp_path / "aggregated" / "agg"), "--reps", "200"])
    assert (tmp_path / "aggregated" / "agg.png").stat().st_size > 10_000 and (tmp_path / "aggregated" / "agg.json").exists()
    assert set(summary["metrics"]) == {"interpolation", "extrapolation", "all"} and summary["seeds"] == {"A": 2, "B": 2}
    assert summary["improvement"]["all"]["A > B"]["value"] == 0.5  # identical score sets


def test_reference_returns_normalise_each_context_by_its_own_random_and_expert_return(tmp_path):
    import json

    flags = ["reference", "--task", "ball_in_cup", "--setting", "single_0", "--episodes", "3", "--action-repeat", "50"]
    measured = evaluate.main([*flags, "--out", str(tmp_path / "new" / "ref.json")])
    again = evaluate.main([*flags, "--out", str(tmp_path / "again.json")])
    assert again["contexts"] == measured["contexts"]  # seeded: a rerun is identical
    grid = envs.eval_contexts("ball_in_cup", "single_0")
    assert [row["context"] for row in measured["contexts"]] == [c for c, _ in grid]
    for row in measured["contexts"]:
        assert len(row["random_returns"]) == 3 and np.isclose(row["random_mean"], np.mean(row["random_returns"])) and row["expert"] == 1000
    # A reference with a different random return per context: "half" closes half of every context's gap to the
    # expert, "random" scores its context's random return; per-context normalisation gives 0.5 and 0 exactly.
    reference = {**measured, "contexts": [{**row, "random_mean": 30.0 * i} for i, row in enumerate(measured["contexts"])]}
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    files = []
    for method, seed in [("half", 0), ("half", 1), ("random", 0), ("random", 1)]:
        rows = []
        for i, (context, regime) in enumerate(grid):
            r = 30.0 * i + (0.5 * (1000 - 30.0 * i) if method == "half" else 0.0)
            rows.append({"task": "ball_in_cup", "setting": "single_0", "method": method, "seed": seed, "context": context, "regime": regime, "returns": [r, r]})
        files.append(tmp_path / f"{method}{seed}.jsonl")
        files[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))
    files = list(map(str, files))
    summary = evaluate.main(["aggregate", *files, "--reference", str(tmp_path / "ref.json"), "--out", str(tmp_path / "agg"), "--reps", "100"])
    assert (tmp_path / "agg_contexts.png").stat().st_size > 10_000  # return against gravity, training range shaded
    for regime in ("interpolation", "extrapolation", "all"):
        assert summary["metrics"][regime]["half"]["IQM"] == {"value": 0.5, "ci": [0.5, 0.5]}
        assert summary["metrics"][regime]["random"]["mean"]["value"] == 0.0
    scalar = evaluate.main(["aggregate", *files, "--out", str(tmp_path / "scalar"), "--reps", "100"])  # R / 1000: not 0.5
    assert scalar["metrics"]["all"]["half"]["mean"]["value"] == pytest.approx(np.mean([0.5 + 0.015 * i for i in range(14)]))
    # a reference of another grid, or one whose expert does not beat random, is refused
    (tmp_path / "short.json").write_text(json.dumps({**reference, "contexts": reference["contexts"][:5]}))
    with pytest.raises(SystemExit, match="its contexts are not the single_0 grid of ball_in_cup"):
        evaluate.main(["aggregate", *files, "--reference", str(tmp_path / "short.json"), "--out", str(tmp_path / "x")])
    (tmp_path / "bad.json").write_text(json.dumps({**reference, "contexts": [{**r, "expert": 0.0} for r in reference["contexts"]]}))
    with pytest.raises(SystemExit, match="expert return <= random return"):
        evaluate.main(["aggregate", *files, "--reference", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")])


def _bare_shell_env() -> dict[str, str]:
    """The environment of a bare shell on a headless machine: no MUJOCO_GL, no display."""
    import os

    return {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY")}


def test_the_readmes_film_command_runs_from_a_bare_shell_without_a_display(tmp_path):
    """The README's film command as written (its --out moved to tmp_path, --every 10 added: every tenth frame
    kept, a fifth of the rendering) with MUJOCO_GL unset and no display: dm_control must not fall back to GLFW
    ("an OpenGL platform library has not been loaded"). About 20 s of CPU (3 x 500 policy steps, 50 frames)."""
    import shlex
    import subprocess
    import sys

    from PIL import Image

    readme = (Path(__file__).parent / "README.md").read_text().splitlines()
    line = next(s.strip() for s in readme if s.strip().startswith("python film.py --checkpoint pretrained/ball_in_cup"))
    argv = shlex.split(line.split("#")[0])
    assert argv[argv.index("--out") + 1].startswith("runs/")  # the README's outputs go under the ignored runs/
    argv[argv.index("--out") + 1] = str(tmp_path / "cup.gif")
    out = subprocess.run([sys.executable, *argv[1:], "--every", "10"], env=_bare_shell_env(), cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    gif = Image.open(tmp_path / "cup.gif")
    assert gif.n_frames == 50 and gif.size == (3 * 128, 128)


def test_every_entry_point_picks_a_headless_gl_backend_without_mujoco_gl():
    """dm_control chooses its GL backend when it is first imported: every entry point must import envs.py
    (which sets MUJOCO_GL) before anything imports dm_control."""
    import subprocess
    import sys

    for entry in ("train", "evaluate", "counterfactual", "sweep", "film"):
        code = f"import {entry}; from dm_control import _render; print(_render.BACKEND)"
        out = subprocess.run([sys.executable, "-c", code], env=_bare_shell_env(), cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.split()[-1] in ("egl", "osmesa"), (entry, out.stdout[-500:], out.stderr[-2000:])


def _github_slugs(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation but - and _ dropped,
    spaces as -, repeats numbered -1, -2, ...; headings inside code blocks are not headings."""
    import re

    slugs, seen, in_code = set(), {}, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def test_every_relative_link_and_anchor_in_the_readme_and_docs_resolves():
    import re

    root = Path(__file__).parent
    assert _github_slugs("# Stage 3, the agent: DALI-D (seed 0)\n## `cpu` preset\n## `cpu` preset") == {"stage-3-the-agent-dali-d-seed-0", "cpu-preset", "cpu-preset-1"}
    dead = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if not dest.exists():
                dead.append(f"{page.relative_to(root)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _github_slugs(dest.read_text()):
                dead.append(f"{page.relative_to(root)}: {target} (no such heading)")
    assert not dead, "\n".join(dead)


def _pool_files(tmp_path, runs, episodes=2, extra=None):
    """Hand-made results files: runs = [(setting, method, seed, score(context_index, context) -> return)], each
    line with `extra` (default: action repeat 2, as `evaluate.py run` records it)."""
    import json

    extra = {"action_repeat": 2} if extra is None else extra
    files = []
    for setting, method, seed, ret in runs:
        rows = [{"task": "ball_in_cup", "setting": setting, "method": method, "seed": seed, "context": c, "regime": r,
                 "returns": [ret(i, c)] * episodes, **extra} for i, (c, r) in enumerate(envs.eval_contexts("ball_in_cup", setting))]  # fmt: skip
        files.append(tmp_path / f"{setting}_{method}_{seed}.jsonl")
        files[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return list(map(str, files))


def _pool_reference(tmp_path, setting, random, action_repeat=2):
    """A hand-made reference file of `setting`: random_c = random(i), expert_c = 1000."""
    import json

    rows = [{"context": c, "regime": r, "random_mean": random(i), "expert": 1000.0} for i, (c, r) in enumerate(envs.eval_contexts("ball_in_cup", setting))]
    path = tmp_path / f"ref_{setting}_{action_repeat}.json"
    path.write_text(json.dumps({"task": "ball_in_cup", "setting": setting, "episodes": 50, "action_repeat": action_repeat, "contexts": rows}))
    return str(path)


def test_pooling_takes_each_settings_contexts_with_their_regimes_and_normalises_each_by_its_own_reference(tmp_path):
    """The release's pooling (anaylsis/plot_rliable.py): single_k contributes the contexts where feature k alone
    changed, as interpolation or extrapolation of that feature; double_box all 84 contexts, a context with one
    feature inside its training range and the other outside being mixed. Each setting's contexts are normalised
    by that setting's reference, context by context."""
    random = {"single_0": lambda i: 10.0 * i, "single_1": lambda i: 600.0 - 40 * i, "double_box": lambda i: 5.0 * i}
    level = {"single_0": 0.2, "single_1": 0.4, "double_box": 0.9}  # B's normalised score in every context of a setting
    runs = []
    for s in level:
        for seed in (0, 1):
            runs.append((s, "A", seed, lambda i, c, s=s: random[s](i) + 0.5 * (1000 - random[s](i))))  # 0.5 everywhere
            runs.append((s, "B", seed, lambda i, c, s=s: random[s](i) + level[s] * (1000 - random[s](i))))
    files = _pool_files(tmp_path, runs)
    refs = [_pool_reference(tmp_path, s, random[s]) for s in level]
    summary = evaluate.main(["aggregate", "--pool", *files, "--reference", *refs, "--out", str(tmp_path / "pooled"), "--reps", "200"])
    # which contexts each setting contributes, and the regime of each
    pooled = summary["contexts"]
    assert [c["context"]["gravity"] for c in pooled["single_0"]] == [0.98, 1.715, 2.45, 3.185, 3.92, 4.9, 7.35, 12.25, 14.7, 15.68, 16.66, 17.64, 18.62, 19.6]
    assert all(c["context"]["distance"] == 0.3 for c in pooled["single_0"]) and all(c["context"]["gravity"] == 9.81 for c in pooled["single_1"])
    assert len(pooled["single_1"]) == 13 and len(pooled["double_box"]) == 84
    count = lambda s, reg: sum(c["regime"] == reg for c in pooled[s])  # noqa: E731
    assert [count("single_0", r) for r in ("interpolation", "extrapolation", "mixed")] == [4, 10, 0]
    assert [count("single_1", r) for r in ("interpolation", "extrapolation", "mixed")] == [4, 9, 0]
    assert [count("double_box", r) for r in ("interpolation", "extrapolation", "mixed")] == [13, 30, 41]
    regime_of = {(c["context"]["gravity"], c["context"]["distance"]): c["regime"] for c in pooled["double_box"]}
    assert regime_of[(0.98, 0.3)] == regime_of[(4.9, 0.6)] == regime_of[(9.81, 0.03)] == "mixed"  # one feature in, one out
    assert regime_of[(0.98, 0.03)] == regime_of[(19.6, 0.6)] == "extrapolation" and regime_of[(9.81, 0.3)] == regime_of[(14.7, 0.15)] == "interpolation"
    # the pool: each regime holds every setting's contexts of that regime, each normalised by its own reference
    m = summary["metrics"]
    assert m["extrapolation"]["B"]["mean"]["value"] == pytest.approx((10 * 0.2 + 9 * 0.4 + 30 * 0.9) / 49)
    assert m["interpolation"]["B"]["mean"]["value"] == pytest.approx((4 * 0.2 + 4 * 0.4 + 13 * 0.9) / 21)
    assert m["mixed"]["B"]["mean"]["value"] == pytest.approx(0.9)  # double_box alone has mixed contexts
    assert m["all"]["B"]["mean"]["value"] == pytest.approx((14 * 0.2 + 13 * 0.4 + 84 * 0.9) / 111)
    for reg in m:
        assert m[reg]["A"]["IQM"] == {"value": pytest.approx(0.5), "ci": [pytest.approx(0.5)] * 2, "ci_seeds": [pytest.approx(0.5)] * 2}
    assert summary["improvement"]["extrapolation"]["A > B"]["value"] == pytest.approx((10 + 9) / 49)  # A beats B on single_0 and single_1 only
    assert summary["settings"]["single_1"]["metrics"]["extrapolation"]["B"]["mean"]["value"] == pytest.approx(0.4)
    # R / 1000: the same contexts, scored by their returns alone
    raw = evaluate.main(["aggregate", "--pool", *files, "--out", str(tmp_path / "raw"), "--reps", "200"])
    expected = [random[s](i) / 1000 + level[s] * (1 - random[s](i) / 1000) for s in level for i, c in enumerate(pooled[s]) if c["regime"] == "mixed"]
    assert raw["metrics"]["mixed"]["B"]["mean"]["value"] == pytest.approx(np.mean(expected))
    assert (tmp_path / "pooled.png").stat().st_size > 10_000 and (tmp_path / "pooled_double_box_contexts.png").exists()
    assert "P(A > B)" in (tmp_path / "pooled.txt").read_text()


def test_pooled_whole_seed_intervals_keep_the_spread_of_a_seed_that_breaks_everywhere(tmp_path):
    """One seed scores 0.9 in every context, the other 0.1: the per-context bootstrap mixes the two seeds across
    contexts and its CI of the mean shrinks around 0.5; resampling whole seeds keeps the all-good and all-bad
    draws. A setting alone reports the same values and stratified CIs as `aggregate` of its files."""
    runs = [(s, m, seed, lambda i, c, seed=seed: 900.0 if seed == 0 else 100.0) for s in ("single_0", "single_1") for m in ("A", "B") for seed in (0, 1)]
    files = _pool_files(tmp_path, runs)
    summary = evaluate.main(["aggregate", "--pool", *files, "--out", str(tmp_path / "p"), "--reps", "400"])
    mean = summary["metrics"]["all"]["A"]["mean"]
    assert mean["value"] == pytest.approx(0.5)
    assert mean["ci"][1] - mean["ci"][0] < 0.25 and mean["ci_seeds"] == [pytest.approx(0.1), pytest.approx(0.9)]
    alone = evaluate.main(["aggregate", *[f for f in files if "single_1" in f], "--out", str(tmp_path / "a"), "--reps", "400"])
    for reg, methods in alone["metrics"].items():
        for method, values in methods.items():
            for name, v in values.items():
                assert {k: summary["settings"]["single_1"]["metrics"][reg][method][name][k] for k in ("value", "ci")} == v


def test_pooling_refuses_different_tasks_protocols_and_incomplete_pools(tmp_path):
    import json

    good = _pool_files(tmp_path, [(s, m, 0, lambda i, c: 500.0) for s in ("single_0", "single_1") for m in ("A", "B")])
    ref0, ref1 = _pool_reference(tmp_path, "single_0", lambda i: 0.0), _pool_reference(tmp_path, "single_1", lambda i: 0.0)
    walker = tmp_path / "walker.jsonl"
    walker.write_text("".join(json.dumps({"task": "walker", "setting": "single_0", "method": "A", "seed": 1, "context": c, "regime": r, "returns": [1.0, 1.0]}) + "\n"
                              for c, r in envs.eval_contexts("walker", "single_0")))  # fmt: skip
    (tmp_path / "e").mkdir()
    three = _pool_files(tmp_path / "e", [("single_0", "A", 1, lambda i, c: 500.0)], episodes=3)
    (tmp_path / "r").mkdir()
    repeat4 = _pool_files(tmp_path / "r", [("single_0", "A", 1, lambda i, c: 500.0)], extra={"action_repeat": 4})
    (tmp_path / "u").mkdir()
    unrecorded = _pool_files(tmp_path / "u", [("single_0", "A", 1, lambda i, c: 500.0)], extra={})
    wrong = tmp_path / "wrong_regime.jsonl"
    wrong.write_text(Path(good[0]).read_text().replace('"regime": "extrapolation"', '"regime": "mixed"', 1))
    cases = [
        ([*good, str(walker)], [], "cannot pool different tasks"),
        ([*good, *three], [], "episodes per context differ"),
        ([*good, *repeat4], [], "action repeats differ"),
        ([*good, *unrecorded], [], "records no action repeat and no train.py args.json lies beside it"),
        (good[1:], [], "A has no run on single_0"),
        ([*good], ["--reference", ref0], "no reference of setting single_1"),
        ([*good], ["--reference", ref0, _pool_reference(tmp_path, "single_1", lambda i: 0.0, action_repeat=1)], "measured with action repeat 1, the runs act with 2"),
    ]
    for files, flags, message in cases:
        with pytest.raises(SystemExit, match=message):
            evaluate.main(["aggregate", "--pool", *files, *flags, "--out", str(tmp_path / "x"), "--reps", "50"])
    with pytest.raises(SystemExit, match="is recorded as mixed, the pooling rule makes it extrapolation"):
        evaluate.main(["aggregate", "--pool", str(wrong), *good[1:], "--out", str(tmp_path / "x"), "--reps", "50"])
    # an unrecorded action repeat: read from the run's train.py args.json beside the file, or stated
    (tmp_path / "u" / "train").mkdir()
    (tmp_path / "u" / "train" / "args.json").write_text(json.dumps({"action_repeat": 2}))
    found = evaluate.main(["aggregate", "--pool", *good, *unrecorded, "--out", str(tmp_path / "x"), "--reps", "50"])
    assert found["action_repeat_source"][unrecorded[0]].startswith("read from") and found["action_repeat"] == 2
    (tmp_path / "u" / "train" / "args.json").unlink()
    stated = evaluate.main(["aggregate", "--pool", *good, *unrecorded, "--action-repeat", "2", "--out", str(tmp_path / "x"), "--reps", "50"])
    assert stated["action_repeat_source"][unrecorded[0]] == "stated by --action-repeat"
    with pytest.raises(SystemExit, match="action repeats differ"):
        evaluate.main(["aggregate", "--pool", *good, *unrecorded, "--action-repeat", "4", "--out", str(tmp_path / "x"), "--reps", "50"])


def test_film_shows_each_context_side_by_side_in_real_time_and_rejects_bad_contexts(tiny_dali_run, tmp_path, capsys):
    """film.py: one panel per context, one frame per `every` policy steps from the first state on, labels with
    the returns; the panels differ because the physics does; impossible or unknown contexts fail clearly."""
    from PIL import Image

    import film

    out = tmp_path / "new" / "v.gif"
    film.main(film.Args(checkpoint=str(tiny_dali_run), contexts=("gravity=2.45", "gravity=17.64"), size=32, every=5, out=str(out)))
    gif = Image.open(out)
    assert gif.n_frames == 4 and gif.size == (64, 32)  # 20 policy steps per episode (action repeat 50), filmed every 5th
    assert gif.info["duration"] == 5000  # 5 policy steps of 50 control steps of 0.02 s: real time
    gif.seek(3)
    last = np.asarray(gif.convert("RGB"))
    assert not np.array_equal(last[:, :32], last[:, 32:])  # low and high gravity have moved the ball differently
    assert "gravity 2.45: " in capsys.readouterr().out
    for bad, message in [("gravity=-1", "gravity.*impossible"), ("mass=2", "not name=value with a feature of ball_in_cup"),
                         ("gravity=abc", "'abc' is not a number")]:  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            film.main(film.Args(checkpoint=str(tiny_dali_run), contexts=(bad,), out=str(tmp_path / "x.gif")))
    with pytest.raises(SystemExit, match="--camera 2: ball_in_cup has cameras 0 to 1"):
        film.main(film.Args(checkpoint=str(tiny_dali_run), camera=2, out=str(tmp_path / "x.gif")))


def test_a_pretrained_agent_is_small_acts_as_the_run_did_and_bad_files_fail_clearly(tiny_dali_run, tmp_path):
    """evaluate.py export: the weights alone, loadable wherever a checkpoint is (the same actions as the full
    checkpoint's agent), refused by train.py --resume; a truncated or incompatible file fails with a clear error."""
    import shutil

    from rollout import episode_returns

    out = tmp_path / "pretrained" / "agent.pt"
    evaluate.main(["export", "--checkpoint", str(tiny_dali_run.parent), "--out", str(out)])
    assert out.stat().st_size < tiny_dali_run.stat().st_size / 2
    pre = checkpoint.load_checkpoint(out)
    assert pre["kind"] == "pretrained" and not {"replay", "optimizers", "rng", "acting"} & pre.keys()
    returns = []
    for path in (tiny_dali_run, out):
        args, agent, _ = checkpoint.load_agent(path)
        torch.manual_seed(0)
        returns.append(episode_returns(agent, "ball_in_cup", "features", args.action_repeat, [(envs.default_context("ball_in_cup"), 7)] * 2, batch=2))
    assert returns[0] == returns[1]
    rows = evaluate.main(["run", "--checkpoint", str(out), "--setting", "single_0", "--episodes", "1", "--out", str(tmp_path / "z.jsonl"), "--no-progress"])
    assert len(rows) == 14
    (tmp_path / "logdir").mkdir()
    shutil.copy(out, tmp_path / "logdir" / "ckpt.pt")
    with pytest.raises(SystemExit, match="is a pretrained agent .* train.py cannot resume it"):
        train.main(train.cli(["--logdir", str(tmp_path / "logdir"), "--resume"]))
    (tmp_path / "cut.pt").write_bytes(out.read_bytes()[:5000])
    with pytest.raises(SystemExit, match="corrupt or truncated"):
        checkpoint.load_agent(tmp_path / "cut.pt")
    odd = torch.load(out, weights_only=True)
    odd["agent"].pop(next(k for k in odd["agent"] if k.startswith("ctx_encoder.")))
    torch.save(odd, tmp_path / "odd.pt")
    with pytest.raises(SystemExit, match="does not fit the agent its configuration builds .*missing \\['ctx_encoder"):
        checkpoint.load_agent(tmp_path / "odd.pt")


def _shipped_agents() -> list:
    from pathlib import Path

    return sorted((Path(__file__).parent / "pretrained").glob("*.pt"))


def test_gitignore_keeps_runs_out_and_result_files_and_shipped_agents_in():
    """Result files of studies (docs/results/**, runs/ folders included) and shipped agents are committed;
    runs, checkpoints and logs are not. (A bare `runs/` pattern once hid docs/results/*/runs/ from git.)"""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    paths = {"docs/results/s/runs/DALI-S_s0.jsonl": False, "docs/results/reference.json": False, "pretrained/a.pt": False,
             "fixtures/a.pt": False, "runs/default/ckpt.pt": True, "runs/x/metrics.jsonl": True, "a/ckpt.pt": True,
             "x/events.out.tfevents.1": True}  # fmt: skip
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=root, capture_output=True, text=True).stdout.split()
    assert {p: p in out for p in paths} == paths


def test_every_planted_error_still_finds_its_line():
    """benchmarks/plant_errors.py plants each error by replacing one exact text; a text the code no longer
    contains would make that error vanish from the test of the tests. Each must occur exactly once."""
    import sys
    from pathlib import Path

    root = Path(__file__).parent
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import plant_errors
    finally:
        sys.path.remove(str(root / "benchmarks"))
    assert plant_errors.stale_texts(root) == []


def test_the_pretrained_folder_lists_exactly_its_files():
    """pretrained/agents.json has an entry, with its command, commit and check, for each shipped file and no other."""
    import json
    from pathlib import Path

    listed = json.loads((Path(__file__).parent / "pretrained" / "agents.json").read_text())
    assert sorted(listed) == [p.name for p in _shipped_agents()]
    for entry in listed.values():
        assert {"trained_by", "code", "env_steps", "check"} <= entry.keys()


@pytest.mark.parametrize("path", _shipped_agents(), ids=lambda p: p.name)
def test_each_shipped_agent_loads_and_does_what_it_is_shipped_for(path):
    """Each file in pretrained/ loads with this commit's code as a pretrained agent of its recorded task and
    still does what it is shipped for, by the checks its agents.json entry lists:
    - min_mean_return: from fixed reset seeds in the check's context, the mean return reaches the bound
      (untrained or mis-loaded weights fall far below it; zeroing DALI-S's ctx alone does not: 871 against
      850 for ball_in_cup_dali_s.pt, so this checks the agent, not its context path);
    - ctx_order: acting in each of several values of one context feature, the agent's own ctx_t (mean of
      ctx[dim] over the second half of `steps` steps, over the seeds) moves strictly monotonically with the
      value, in the direction `sign` (the sign of the probe's correlation): the context path that the
      agent's probes and dreams rely on."""
    import json

    from dreams import inferred_context
    from rollout import episode_returns, record

    check = json.loads((path.parent / "agents.json").read_text())[path.name]["check"]
    assert {"min_mean_return", "ctx_order"} & check.keys(), f"{path.name}: agents.json lists no check"
    assert checkpoint.load_checkpoint(path)["kind"] == "pretrained"
    args, agent, _ = checkpoint.load_agent(path)
    base = envs.default_context(args.task)
    if "min_mean_return" in check:
        context = envs.validate_context(args.task, {**base, **check["context"]})
        torch.manual_seed(0)
        returns = episode_returns(agent, args.task, args.obs, args.action_repeat, [(context, s) for s in check["seeds"]], batch=len(check["seeds"]))
        assert np.mean(returns) >= check["min_mean_return"], (path.name, returns)
    if "ctx_order" in check:
        order = check["ctx_order"]
        values, seeds, steps = order["values"], order["seeds"], order["steps"]
        jobs = [(envs.validate_context(args.task, {**base, order["feature"]: v}), s) for v in values for s in seeds]
        torch.manual_seed(0)
        ctx = inferred_context(agent, record(agent, args.task, args.obs, args.action_repeat, jobs, steps, "cpu"), "cpu")
        mean = ctx[:, steps // 2 :, order["dim"]].mean(1).reshape(len(values), len(seeds)).mean(1)  # (values,)
        assert bool((order["sign"] * mean.diff() > 0).all()), (path.name, order["feature"], values, mean.tolist())


def test_aggregate_rejects_bad_results_files(tiny_dali_run, tmp_path):
    import json

    good = tmp_path / "good.jsonl"
    evaluate.main(["run", "--checkpoint", str(tiny_dali_run), "--setting", "single_0", "--episodes", "1", "--out", str(good), "--no-progress"])
    lines = good.read_text().splitlines()

    def write(name, rows):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
        return str(tmp_path / name)

    truncated = write("truncated.jsonl", lines[:5] + [lines[5][:40]])
    short = write("short.jsonl", lines[:9])
    walker_grid = envs.eval_contexts("walker", "single_0")
    walker = write("walker.jsonl", [json.dumps({**json.loads(x), "task": "walker", "context": c, "regime": r}) for x, (c, r) in zip(lines, walker_grid)])
    seed1 = write("seed1.jsonl", [json.dumps({**json.loads(x), "seed": 1}) for x in lines])
    other = write("other.jsonl", [json.dumps({**json.loads(x), "method": "Dreamer-DR"}) for x in lines])
    cases = [
        ([str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        ([truncated], "truncated.jsonl line 6 is not valid JSON"),
        ([short], "short.jsonl holds 9 contexts, the single_0 grid of ball_in_cup has 14"),
        ([str(good), walker], "mix tasks"),
        ([str(good), str(good)], "DALI-D has seed 0 twice"),
    ]
    for files, message in cases:
        with pytest.raises(SystemExit, match=message):
            evaluate.main(["aggregate", *files, "--out", str(tmp_path / "x")])
    # unequal seed counts are allowed (a reference method run with fewer seeds) and reported per method
    summary = evaluate.main(["aggregate", str(good), seed1, other, "--out", str(tmp_path / "x"), "--reps", "100"])
    assert summary["seeds"] == {"DALI-D": 2, "Dreamer-DR": 1}


# ----------------------------------------------------------------------------------------------------
# counterfactual.py: probe, dreams, plausibility
# ----------------------------------------------------------------------------------------------------

import counterfactual  # noqa: E402
import dreams  # noqa: E402
import probes  # noqa: E402
import rollout  # noqa: E402

CF_FLAGS = ["--steps", "15", "--threads", "1"]


def test_counterfactual_sigma_positive_and_m_zero_reproduces_the_dream(tiny_dali_run):
    args, agent, _ = checkpoint.load_agent(tiny_dali_run)
    jobs = [(c, 7 + i) for i, (c, _) in enumerate(envs.eval_contexts("ball_in_cup", "single_0"))]
    ep = rollout.record(agent, "ball_in_cup", "features", args.action_repeat, jobs, 15, "cpu")
    ctx = dreams.inferred_context(agent, ep, "cpu")
    sigma = dreams.ctx_sigma(ctx, 6)
    assert (sigma > 0).all(), sigma  # windows from many contexts differ in every dimension
    index, actions = torch.tensor([3, 5]), ep.action[[3, 5], 9:15]
    deltas = dreams.shift_deltas([0.0, 1.0, -2.0], 2, sigma, ctx.shape[-1])
    base = dreams.dream(agent, ep, ctx, index, 8, 6, actions, torch.zeros(1, ctx.shape[-1]), seed=0)
    shifted = dreams.dream(agent, ep, ctx, index, 8, 6, actions, deltas, seed=0)
    assert shifted.shape == (3, 2, 7, 8)
    assert torch.equal(shifted[0], base[0])  # m = 0: the unperturbed dream, exactly
    for m in (1, 2):  # decoded with the unshifted ctx: the change came through the imagined dynamics
        assert not torch.allclose(shifted[m], base[0], atol=1e-4)
    through_decoder = dreams.dream(agent, ep, ctx, index, 8, 6, actions, deltas, seed=0, decode_shifted=True)
    assert torch.equal(through_decoder[0], base[0]) and not torch.allclose(through_decoder[1], shifted[1])


def test_counterfactual_subcommands_end_to_end(tiny_dali_run, tmp_path, monkeypatch):
    table = counterfactual.main(["probe", "--checkpoint", str(tiny_dali_run), "--out", str(tmp_path / "probe.json"), *CF_FLAGS])
    assert table["features"] == ["gravity", "distance"] and "gravity" in table["best_dim"] and table["r2_linear"]["distance"] is None
    assert "gravity" in table["r2_linear_train_range"]  # the probe inside the training range, besides the whole grid
    assert len(table["corr"]) == 8 and len(table["sigma"]) == 8
    out = counterfactual.main(["dream", "--checkpoint", str(tiny_dali_run), "--start", "8", "--horizon", "6", "--shifts", "-1", "0", "1",
                               "--out", str(tmp_path / "new" / "dream"), *CF_FLAGS])  # fmt: skip
    assert out["decoded"].shape == (3, 7, 8) and (tmp_path / "new" / "dream.png").stat().st_size > 10_000  # folders created
    res = counterfactual.main(["plausibility", "--checkpoint", str(tiny_dali_run), "--start", "8", "--horizon", "6", "--starts", "3",
                               "--out", str(tmp_path / "p.json"), *CF_FLAGS])  # fmt: skip
    assert len(res["imagined_acceleration"]) == len(res["real_acceleration"]) == len(res["implied_gravity"]) == 5
    assert np.all(np.diff(res["gravity"]) != 0) and -1 <= res["rank_corr_imagined"] <= 1
    assert all(0.98 <= g <= 19.6 for g in res["implied_gravity"])  # means of grid gravities
    for k in ("imagined", "real", "implied"):  # bootstrap CIs over start states
        lo, hi = res[f"rank_corr_{k}_ci95"]
        assert np.isnan(res[f"rank_corr_{k}"]) or lo <= res[f"rank_corr_{k}"] <= hi
    assert np.isnan(probes.spearman([1, 2, 3], [5, 5, 5])) and probes.spearman([1, 2, 3], [3, 2, 1]) == -1
    with pytest.raises(SystemExit, match="needs --context learned"):
        none_run = tmp_path / "none"
        train.main(train.cli([*TINY_FLAGS, "--steps", "1000", "--context", "none", "--logdir", str(none_run)]))
        counterfactual.main(["probe", "--checkpoint", str(none_run / "ckpt.pt"), *CF_FLAGS])
    # bad flags fail before the (slow) recording of episodes
    monkeypatch.setattr(counterfactual, "record", lambda *a, **k: pytest.fail("recorded before checking the flags"))
    with pytest.raises(SystemExit, match="'friction' is not a context feature of ball_in_cup"):
        counterfactual.main(["dream", "--checkpoint", str(tiny_dali_run), "--feature", "friction", "--start", "8", "--horizon", "6", *CF_FLAGS])
    with pytest.raises(SystemExit, match=r"--dim 99 outside the 8 ctx dimensions"):
        counterfactual.main(["dream", "--checkpoint", str(tiny_dali_run), "--dim", "99", "--start", "8", "--horizon", "6", *CF_FLAGS])
    (tmp_path / "file").write_text("")
    for command in ("probe", "dream", "plausibility"):  # an output that cannot be written fails before the work, not after
        with pytest.raises(SystemExit, match="cannot write .*file/x"):
            counterfactual.main([command, "--checkpoint", str(tiny_dali_run), "--out", str(tmp_path / "file" / "x"), *CF_FLAGS])


def test_probe_r2_is_scored_on_held_out_episodes_only():
    """Every R^2 the docs report rests on the split: a ctx that memorises its fitting episodes (a one-hot per
    episode: a linear probe fits them exactly) and is noise elsewhere scores R^2 1 in-sample, and must score
    low held out, on the whole grid and inside the training range alike."""
    rng = np.random.default_rng(0)
    E, P = 40, 4
    held_out = np.arange(E) % 2 == 1
    inside = np.arange(E) % 4 < 2  # half of each split inside the training range
    true = rng.uniform(0.0, 1.0, (E, 1))
    ctx = rng.normal(size=(E, P, E))  # held-out episodes: noise
    ctx[~held_out] = np.eye(E)[~held_out][:, None] * 10.0  # fitting episodes: memorised, one dim each
    fit = ~held_out
    in_sample = probes.linear_r2(ctx[fit].reshape(-1, E), np.repeat(true[fit], P, 0), ctx[fit].reshape(-1, E), np.repeat(true[fit], P, 0))
    assert in_sample[0] > 0.99
    table = probes.probe_table(ctx, true, held_out, ["gravity"], inside)
    assert table["r2_linear"]["gravity"] < 0.3 and table["r2_linear_train_range"]["gravity"] < 0.3, table


def test_probe_reports_no_r2_for_a_feature_that_does_not_vary():
    """In single_1 gravity stays at its default: its probe R^2 is undefined (None, and no best dimension), not
    1.0, however the float32 mean of the equal values rounds (it once read 1.0 for every single_1 agent)."""
    rng = np.random.default_rng(0)
    E, P = 20, 4
    held_out = np.arange(E) % 2 == 1
    length = rng.uniform(-1.0, 1.0, E).astype(np.float32)
    true = np.stack([np.full(E, 0.3, np.float32), length], 1)  # gravity fixed (a value float32 cannot hold exactly)
    ctx = (length[:, None, None] * rng.normal(size=(1, 1, 8)) + 0.1 * rng.normal(size=(E, P, 8))).astype(np.float32)
    table = probes.probe_table(ctx, true, held_out, ["gravity", "distance"], np.ones(E, bool))
    assert table["r2_linear"]["gravity"] is None and table["r2_linear_train_range"]["gravity"] is None, table
    assert "gravity" not in table["best_dim"] and table["r2_linear"]["distance"] > 0.8, table


def test_dream_gif_has_one_frame_per_step_with_real_and_counterfactuals_side_by_side(tmp_path):
    from PIL import Image

    import figures

    decoded = np.random.default_rng(0).uniform(0, 1, size=(3, 5, 64, 64, 3))  # M = 3 shifts, 5 steps
    real = np.zeros((5, 64, 64, 3), np.uint8)
    figures.dream_gif(decoded, real, str(tmp_path / "d.gif"))
    gif = Image.open(tmp_path / "d.gif")
    assert gif.n_frames == 5 and gif.size == (64 * 4 * 2, 128)  # real + 3 counterfactuals, upscaled 2x


# ----------------------------------------------------------------------------------------------------
# sweep.py: bad input fails before anything is launched, a killed local run resumes exactly, and a study
# runs through a real SLURM (benchmarks/slurm_local.sh) with a requeued job that resumes exactly; the
# supervisor's one SIGTERM, the recorded code, one sweep per directory, what aggregate leaves out, and the
# sbatch requests SLURM accepts
# ----------------------------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import code_version  # noqa: E402
import dir_lock  # noqa: E402
import study_executors  # noqa: E402
import study_runs  # noqa: E402
import sweep  # noqa: E402
import supervisor  # noqa: E402

REPO = Path(__file__).resolve().parent
# The tiny run of test_dali.py's TINY_FLAGS, less the flags a study sets itself (task, threads)
TINY = (
    "--envs 2 --action-repeat 50 --batch-size 3 --batch-length 8 --prefill 400 --train-ratio 48 --rssm.deter 32 "
    "--rssm.hidden 32 --rssm.stoch 4 --rssm.classes 4 --hidden 32 --eval-every 2000 --eval-episodes 2 --log-every 1000 "
    "--save-every 2000 --ctx.window 6 --ctx.units 16 --ctx.heads 2 --ctx.fd-units 16"
)
# 6000 env steps: episodes of 2 envs x 20 policy steps x 50 repeats end every 2000 env steps, with a checkpoint
STUDY = ["--study", "bic_gravity", "--steps", "6000", "--seeds", "0", "--eval-episodes", "1", "--train-flags", TINY]


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "sweep.py"), *args]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"sweep.py exited ({proc.returncode}) before {what}:\n{proc.stdout.read() if proc.stdout else ''}")
        if time.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def same_parameters(a: Path, b: Path) -> None:
    """The agent tensors and counters (less wall-clock) of two final checkpoints are identical."""
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    counters = lambda c: {k: v for k, v in c["counters"].items() if k != "seconds"}  # noqa: E731
    assert counters(ca) == counters(cb) and counters(ca)["env_steps"] == 6000
    assert ca["agent"].keys() == cb["agent"].keys()
    for k, v in ca["agent"].items():
        assert torch.equal(v, cb["agent"][k]), k


def launches(log: Path) -> list[str]:
    """The command lines a run's train.log records, one per launch of train.py."""
    return [line for line in log.read_text().splitlines() if line.startswith("$ python")]


def children(pid: int) -> list[int]:
    """Child processes of `pid`, from every one of its threads (the local executor launches from threads)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def train_process(sweep_pid: int) -> int | None:
    """The train.py process under a sweep (sweep -> supervisor -> train.py), if one runs."""
    found = [p for s in children(sweep_pid) for p in children(s) if "train.py" in Path(f"/proc/{p}/cmdline").read_text()]
    return found[0] if found else None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The study's runs uninterrupted (Dreamer-DR and DALI-S, seed 0), started in the background at once."""
    root = tmp_path_factory.mktemp("reference")
    cmd = sweep_cmd("run", *STUDY, "--methods", "Dreamer-DR", "DALI-S", "--workers", "2", "--dir", str(root))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    output: list[str] = []

    def checkpoint(run: str) -> Path:
        if not output:
            output.append(proc.communicate(timeout=600)[0])
        assert proc.returncode == 0, output[0]
        return root / run / "train" / "ckpt.pt"

    yield checkpoint
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_bad_input_fails_clearly_before_anything_is_launched(tmp_path, capsys, monkeypatch):
    d = str(tmp_path / "study")
    # on the command line
    with pytest.raises(SystemExit):
        sweep.main(["run", "--methods", "DALI-X", "--dir", d])
    assert "DALI-X" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["run", "--setting", "triple_box", "--dir", d])
    assert "triple_box" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown --study 'bic_typo'"):
        sweep.main(["run", "--study", "bic_typo"])
    # a study built in Python gets the same checks
    with pytest.raises(SystemExit, match=r"unknown method 'DALI-X'; choose from \['Dreamer-DR', 'DALI-S'"):
        sweep.check_study(sweep.Study(methods=("DALI-X",), dir=d), sweep.Executor())  # type: ignore[arg-type]
    with pytest.raises(SystemExit, match="--setting 'single_2': unknown"):
        sweep.check_study(sweep.Study(setting="single_2", dir=d), sweep.Executor())  # type: ignore[arg-type]
    with pytest.raises(SystemExit, match="cRSSM-S with --setting default: the true context never changes"):
        sweep.main(["run", "--methods", "cRSSM-S", "--setting", "default", "--dir", d])
    with pytest.raises(SystemExit, match="--train-flags sets --seed: the study sets"):
        sweep.main(["run", "--train-flags", "--seed 3", "--dir", d])
    with pytest.raises(SystemExit, match="train.py rejects the flags of Dreamer-DR"):
        sweep.main(["run", "--train-flags", "--batch-sise 3", "--dir", d])
    with pytest.raises(SystemExit, match="prefill 2500 >= --steps 100"):
        sweep.main(["run", "--steps", "100", "--dir", d])
    for bad in ("nan", "inf", "-inf"):  # --mem-gb: finite and >= 0, a clear error rather than a traceback at rendering
        with pytest.raises(SystemExit, match=f"--mem-gb {bad}: must be a finite number >= 0"):
            sweep.main(["run", "--executor", "slurm", "--mem-gb", bad, "--dir", d])
    with pytest.raises(SystemExit, match=r"--mem-gb -1.0: --threads must be >= 1, the others >= 0"):
        sweep.main(["run", "--executor", "slurm", "--mem-gb", "-1", "--dir", d])
    assert not Path(d).exists()  # nothing was written, nothing launched
    # a SLURM executor without SLURM's tools
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="--executor slurm: sbatch, srun, squeue, scontrol not on the PATH"):
        sweep.main(["run", "--executor", "slurm", "--dir", d])
    monkeypatch.undo()
    # a directory of another study configuration is refused, listing the differences; so is a non-study one
    study = sweep.Study(seeds=(0, 1), steps=3000, dir=d)
    sweep.claim_dir(study, "bic_gravity")
    with pytest.raises(SystemExit, match=r"(?s)another configuration.*seeds: \[0, 1\] there, \[0, 1, 2\] asked.*steps: 3000 there, 4000 asked"):
        sweep.main(["run", "--steps", "4000", "--dir", d])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds no study.json: not a study directory"):
        sweep.main(["run", "--dir", str(tmp_path / "other")])
    assert sorted(p.name for p in Path(d).iterdir()) == ["study.json"]
    with pytest.raises(SystemExit, match="is not a study directory"):
        sweep.main(["status", str(tmp_path / "other")])


# ----------------------------------------------------------------------------------------------------
# Local executor: killed and rerun
# ----------------------------------------------------------------------------------------------------


def test_local_run_killed_twice_resumes_to_the_parameters_of_an_uninterrupted_run(tmp_path, reference):
    root = tmp_path / "study"
    cmd = sweep_cmd("run", *STUDY, "--methods", "DALI-S", "--workers", "1", "--dir", str(root))
    run = root / "DALI-S_s0"
    ckpt, metrics = run / "train" / "ckpt.pt", run / "train" / "metrics.jsonl"

    # 1. SIGKILL of the run's train.py after its first checkpoint: the run fails alone, the study goes on
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    wait_for(ckpt.exists, 300, "the first checkpoint", first)
    os.kill(train_process(first.pid), signal.SIGKILL)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 1, out
    assert "DALI-S_s0: FAILED: train.py was stopped (status 137)" in out and "failed" in out
    assert "left out of the aggregate (0 of 1 runs in it):\n  DALI-S: no finished run (DALI-S_s0 failed)" in out
    assert torch.load(ckpt, weights_only=True)["counters"]["env_steps"] < 6000

    # 2. SIGKILL of the sweep itself while the run resumes: its train.py gets SIGTERM (it dies with its parent)
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    resumed = lambda: metrics.exists() and any(json.loads(x)["step"] >= 3000 for x in metrics.read_text().splitlines())  # noqa: E731
    wait_for(lambda: train_process(second.pid) and resumed(), 300, "the resumed run to pass 3000 env steps", second)
    child = train_process(second.pid)
    second.kill()
    second.wait()
    wait_for(lambda: not alive(child), 120, "the orphaned train.py to exit")
    assert "SIGTERM: saved" in (run / "train.log").read_text()  # one SIGTERM: it checkpointed before exiting
    assert not (run / "done").exists()

    # 3. the same command again finishes the run: same parameters as the uninterrupted run
    third = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr
    assert [cmd.endswith("--resume") for cmd in launches(run / "train.log")] == [False, True, True]
    assert (run / "done").exists() and (run / "zeroshot_single_0.jsonl").exists()
    assert (root / "zeroshot_single_0.json").exists() and (root / "zeroshot_single_0.png").exists()
    same_parameters(ckpt, reference("DALI-S_s0"))
    # a fourth call has nothing left to do; every launch recorded this checkout's code
    status = subprocess.run(sweep_cmd("status", str(root)), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert status.returncode == 0 and "1/1 runs done" in status.stdout, status.stdout + status.stderr
    code = code_version.describe(code_version.code_version())
    assert status.stdout.splitlines()[1].endswith(f"  {code}") and "different code" not in status.stdout
    assert [c["env_steps"] > 0 for c in code_version.read_launches(run / "train" / "code.json")] == [False, True, True]
    assert [c["what"] for c in code_version.read_launches(run / "code.json")] == ["train.py"] * 3 + ["evaluate.py"]
    assert code_version.describe(json.loads((root / "study.json").read_text())["code"][-1]) == code


# ----------------------------------------------------------------------------------------------------
# SLURM executor, on a real one-node SLURM
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment of a one-node SLURM started by benchmarks/slurm_local.sh; skips where it cannot start."""
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): `bash benchmarks/slurm_local.sh install` (Debian, root)")
    state = tmp_path_factory.mktemp("slurm")
    script = str(REPO / "benchmarks" / "slurm_local.sh")
    up = subprocess.run(["bash", script, "start", str(state)], capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        pytest.skip(f"SLURM did not start: {up.stderr.strip()[-1000:]}")
    yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["bash", script, "stop", str(state)], capture_output=True, timeout=120)


def test_slurm_study_with_a_requeued_job_finishes_aggregates_and_resumes_exactly(tmp_path, slurm, reference):
    root = tmp_path / "study"
    cmd = sweep_cmd("run", *STUDY, "--methods", "Dreamer-DR", "DALI-S", "--executor", "slurm", "--threads", "1",
                    "--time-min", "30", "--signal-delay-s", "60", "--dir", str(root))  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=slurm)
    run = root / "DALI-S_s0"
    wait_for((run / "train" / "ckpt.pt").exists, 300, "DALI-S's first checkpoint", proc)
    job = (run / "job").read_text().strip()
    # What SLURM sends before a time limit or a preemption: submitit's hook checkpoints and requeues the job
    subprocess.run(["scancel", "--signal=USR2", job], check=True, env=slurm)
    squeue = lambda: subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True, env=slurm).stdout  # noqa: E731
    wait_for(lambda: "PENDING" in squeue(), 120, f"job {job} to be requeued", proc)
    # SLURM holds a requeued job for about two minutes (BeginTime); let it start now, but not within the
    # second of the requeue: slurmd revokes the old run's credential with a timestamp in whole seconds, and
    # refuses a launch in that same second ("Killing non-startable batch JobId=N: Job credential revoked"),
    # which fails the job for good. A cluster's own two minutes never meet this.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env=slurm)
    out, _ = proc.communicate(timeout=600)
    ctld = Path(slurm["SLURM_CONF"]).parent / "slurmctld.log"
    assert proc.returncode == 0, out + "\nslurmctld.log:\n" + "".join(ctld.read_text().splitlines(True)[-40:])
    assert "2/2 runs done" in out and "wrote" in out
    assert (root / "zeroshot_single_0.json").exists() and (root / "zeroshot_single_0.png").exists()
    summary = json.loads((root / "zeroshot_single_0.json").read_text())
    assert set(summary["metrics"]["all"]) == {"Dreamer-DR", "DALI-S"}
    assert [cmd.endswith("--resume") for cmd in launches(run / "train.log")] == [False, True]
    assert (run / "train.log").read_text().count(f"(SLURM job {job})") == 2  # the same job, requeued
    assert "SLURM state" not in out and "different code" not in out
    same_parameters(run / "train" / "ckpt.pt", reference("DALI-S_s0"))
    same_parameters(root / "Dreamer-DR_s0" / "train" / "ckpt.pt", reference("Dreamer-DR_s0"))


def test_sbatch_accepts_the_rendered_requests(tmp_path, slurm, monkeypatch):
    """Every option sweep.py renders, judged by the real sbatch (--test-only: no job is made)."""
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    study = sweep.Study(dir=str(tmp_path / "study"))

    def request(**flags) -> list[str]:
        how = sweep.Executor(executor="slurm", **flags)
        return [line for line in study_executors.sbatch_script(study, how).splitlines() if line.startswith("#SBATCH")]

    lines = request(mem_gb=16, time_min=90, cpus_per_job=2, account="someone", partition="debug")
    for line in ("--mem=16G", "--time=90", "--cpus-per-task=2", "--account=someone", "--partition=debug", "--requeue", "--signal=USR2@300"):
        assert f"#SBATCH {line}" in lines, lines
    study_executors.check_sbatch(study, sweep.Executor(executor="slurm", mem_gb=16, time_min=90, cpus_per_job=2, account="someone", partition="debug"))
    assert "#SBATCH --mem=1536M" in request(mem_gb=1.5)
    study_executors.check_sbatch(study, sweep.Executor(executor="slurm", mem_gb=1.5))
    # what this node cannot give is refused by SLURM, with its reason, before anything is submitted
    with pytest.raises(SystemExit, match=r"(?s)rejects this study's job request:.*partition.*#SBATCH --partition=nope"):
        study_executors.check_sbatch(study, sweep.Executor(executor="slurm", partition="nope"))
    with pytest.raises(SystemExit, match="configuration is not available"):
        study_executors.check_sbatch(study, sweep.Executor(executor="slurm", mem_gb=100_000))
    # GPUs: this node has none, so SLURM refuses the (well-formed) GPU request as unavailable
    assert "#SBATCH --gpus-per-node=1" in request(gpus_per_job=1)
    gres = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, env=slurm).stdout
    if "gpu" not in gres:
        with pytest.raises(SystemExit, match="generic resource"):
            study_executors.check_sbatch(study, sweep.Executor(executor="slurm", gpus_per_job=1))
    assert not Path(study.dir).exists()


# ----------------------------------------------------------------------------------------------------
# The supervisor: one SIGTERM for the child, however the runner ends
# ----------------------------------------------------------------------------------------------------

# The child records every SIGTERM, and like train.py finishes up for a moment after the first; it writes
# EXIT when it ends by itself
SUPERVISED_CHILD = """
import signal, sys, time
out = sys.argv[1]
deadline = time.time() + float(sys.argv[2])
grace = float(sys.argv[3]) if len(sys.argv) > 3 else 1.5  # seconds of finishing up after a SIGTERM
def term(signum, frame):
    global deadline
    open(out, "a").write("TERM\\n")
    deadline = min(deadline, time.time() + grace)
signal.signal(signal.SIGTERM, term)
open(out + ".ready", "w").close()
while time.time() < deadline:
    time.sleep(0.05)
open(out, "a").write("EXIT\\n")
"""

# The runner launches `python -m supervisor` from a worker thread, as the local executor does, with other
# threads alive (each exiting thread of a dying runner would be a parent-death signal of its own)
SUPERVISED_RUNNER = """
import os, signal, subprocess, sys, threading, time
child, out, seconds, stop, grace = sys.argv[1:6]
for _ in range(4):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
def launch():
    p = subprocess.Popen([sys.executable, "-m", "supervisor", str(os.getpid()), child, out, seconds, grace], start_new_session=True)
    open(out + ".pid", "w").write(str(p.pid))
    while not os.path.exists(out + ".ready"):
        time.sleep(0.05)
    for _ in range(int(stop)):  # stop requests, as RunJob.stop sends them
        os.kill(p.pid, signal.SIGUSR1)
    open(out + ".status", "w").write(str(p.wait()))
worker = threading.Thread(target=launch)
worker.start()
worker.join()
"""


def test_supervisor_gives_its_child_exactly_one_sigterm_however_the_runner_ends(tmp_path):
    (tmp_path / "child.py").write_text(SUPERVISED_CHILD)

    def start(name: str, seconds: float = 60, stop: int = 0, grace: float = 1.5) -> tuple[subprocess.Popen, Path]:
        out = tmp_path / name
        runner = subprocess.Popen([sys.executable, "-c", SUPERVISED_RUNNER, str(tmp_path / "child.py"), str(out), str(seconds), str(stop), str(grace)], cwd=REPO)
        wait_for(Path(f"{out}.ready").exists, 60, f"{name}: the child to start")
        return runner, out

    def signals(out: Path) -> list[str]:
        wait_for(lambda: out.exists() and out.read_text().endswith("EXIT\n") or not alive(int(Path(f"{out}.pid").read_text())), 60, "the end")
        time.sleep(0.5)
        return out.read_text().split() if out.exists() else []

    # the runner dies (SIGKILL: no chance to ask for anything); the child checkpoints on one SIGTERM
    runner, out = start("killed")
    runner.kill()
    assert signals(out) == ["TERM", "EXIT"]
    # the runner asks twice for a stop, then dies while the child finishes up
    runner, out = start("stopped", stop=2)
    wait_for(out.exists, 30, "the stop to arrive")
    runner.kill()
    assert signals(out) == ["TERM", "EXIT"]
    # SLURM signals every process of the job: USR2 (the warning, for submitit alone) is ignored, SIGTERM
    # reaches the child directly and is not forwarded again when the runner dies next
    runner, out = start("job signalled")
    pgid = int(Path(f"{out}.pid").read_text())
    os.killpg(pgid, signal.SIGUSR2)
    os.killpg(pgid, signal.SIGTERM)
    wait_for(out.exists, 30, "the SIGTERM to arrive")
    runner.kill()
    assert signals(out) == ["TERM", "EXIT"]
    # the same, with the supervisor not scheduled until both the job's SIGTERM and the runner's death
    # reached it (a loaded machine): it still sees that the SIGTERM came first, whatever the signal numbers
    runner, out = start("job signalled, supervisor late", grace=20)  # the child lives until SIGCONT and after
    pgid = int(Path(f"{out}.pid").read_text())
    os.kill(pgid, signal.SIGSTOP)  # the supervisor leads its session: pgid is its pid
    os.killpg(pgid, signal.SIGTERM)
    wait_for(out.exists, 30, "the SIGTERM to arrive")
    runner.kill()
    runner.wait(timeout=30)
    time.sleep(0.5)  # the parent-death signal is sent as the runner exits
    os.kill(pgid, signal.SIGCONT)
    time.sleep(2)  # a forwarded SIGTERM would have arrived by now; the child is still finishing up
    assert out.read_text().split() == ["TERM"] and alive(pgid)
    os.killpg(pgid, signal.SIGKILL)
    # a runner that lives and asks for nothing: no signal, and the child's exit status comes back
    runner, out = start("undisturbed", seconds=1)
    assert runner.wait(timeout=60) == 0 and signals(out) == ["EXIT"]
    assert Path(f"{out}.status").read_text() == "0"


# A supervisor that does not see the job's SIGTERM before it forks (it lands in between: simulated by
# hiding it from the supervisor's own check) must not start a child the SIGTERM never reached
SUPERVISOR_STOPPED_BEFORE_FORK = """
import os, signal, sys
import supervisor
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
os.kill(os.getpid(), signal.SIGTERM)  # the job's stop, pending
looks = [0]
real = signal.sigpending
def blind_first_look():
    looks[0] += 1
    return set() if looks[0] == 1 else real()
signal.sigpending = blind_first_look
sys.exit(supervisor.Supervisor().run(os.getppid(), sys.argv[1:]))
"""


def test_a_job_stop_that_lands_before_the_fork_starts_no_child(tmp_path):
    (tmp_path / "child.py").write_text(SUPERVISED_CHILD)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", SUPERVISOR_STOPPED_BEFORE_FORK, str(tmp_path / "child.py"), str(out), "3"], cwd=REPO, timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    assert not Path(f"{out}.ready").exists() and not out.exists()  # the child never ran
    # what the child reads: the signals pending for a process, blocked ones included
    sleeper = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); print(flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    sleeper.stdout.readline()
    assert supervisor.pending_in(sleeper.pid) == set()
    sleeper.send_signal(signal.SIGTERM)
    wait_for(lambda: supervisor.pending_in(sleeper.pid) == {signal.SIGTERM}, 10, "the SIGTERM to be pending")
    sleeper.kill()
    sleeper.wait()


# ----------------------------------------------------------------------------------------------------
# Code versions, one sweep per directory, free runs first, what aggregate leaves out
# ----------------------------------------------------------------------------------------------------


def test_code_version_records_the_commit_or_unknown_and_notes_a_resume_under_other_code(tmp_path, monkeypatch):
    probe = "import code_version, json; print(json.dumps(code_version.code_version()))"
    # a tarball install: no git repository
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(REPO / "code_version.py", plain)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=plain, check=True).stdout
    assert json.loads(out) == {"commit": "unknown", "dirty": None, "diff": None}
    # a git checkout: its commit; dirty once a tracked file or an untracked .py changes, not for other files
    if shutil.which("git"):
        git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=plain, check=True, capture_output=True, text=True).stdout  # noqa: E731
        git("init", "-q")
        git("add", "code_version.py")
        git("commit", "-qm", "c")
        head = git("rev-parse", "HEAD").strip()
        version = lambda: json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=plain, check=True).stdout)  # noqa: E731
        assert version() == {"commit": head, "dirty": False, "diff": None}
        (plain / "metrics.jsonl").write_text("{}")
        assert version()["dirty"] is False
        (plain / "new.py").write_text("x = 1")
        first = version()
        (plain / "new.py").write_text("x = 2")
        assert first["dirty"] and version()["dirty"] and first["diff"] != version()["diff"]
    # train.py's record: a fresh run starts the list, a resume under other code is noted
    logdir = tmp_path / "logdir"
    logdir.mkdir()
    monkeypatch.setattr(code_version, "code_version", lambda: {"commit": "a" * 40, "dirty": False, "diff": None})
    assert code_version.record_launch(logdir, 0) is None and code_version.record_launch(logdir, 2000) is None
    monkeypatch.setattr(code_version, "code_version", lambda: {"commit": "b" * 40, "dirty": True, "diff": "1234abcd"})
    note = code_version.record_launch(logdir, 4000)
    assert note and note.startswith("note: resuming at 4000 env steps under code bbbbbbb-dirty.1234abcd; this run was trained so far under aaaaaaa")
    assert [c["env_steps"] for c in code_version.read_launches(logdir / "code.json")] == [0, 2000, 4000]
    assert code_version.record_launch(logdir, 0) is None and len(code_version.read_launches(logdir / "code.json")) == 1


def test_one_sweep_per_directory_and_workers_take_free_runs_first(tmp_path, capsys):
    d = tmp_path / "study"
    sweep.claim_dir(sweep.Study(seeds=(0, 1), dir=str(d)), "bic_gravity")
    # a second `sweep.py run` on a directory in use is refused, naming the holder; nothing is launched
    held = sweep.lock_dir(d)
    try:
        with pytest.raises(SystemExit, match=rf"{d} is in use by another sweep.py: pid {os.getpid()} on "):
            sweep.main(["run", "--seeds", "0", "1", "--dir", str(d)])
    finally:
        os.close(held)
    assert sorted(p.name for p in d.iterdir()) == ["study.json", "sweep.lock"]
    # a worker passes over a run another process holds, and takes it once it is free
    runs = study_runs.expand(sweep.load_study(str(d)))
    other = study_runs.RunJob(runs[0])
    assert other.try_lock()
    free = study_executors.FreeRuns(runs, threads=1)
    assert [free.take().run.name for _ in range(3)] == [r.name for r in runs[1:]]
    assert f"{runs[0].name}: another process works on this run (pid {os.getpid()} on " in capsys.readouterr().out
    threading.Timer(1.0, lambda: os.close(other._lock_fd)).start()
    assert free.take().run.name == runs[0].name and free.take() is None
    for job in free.taken:
        os.close(job._lock_fd)


def test_aggregate_names_what_it_leaves_out(tmp_path, capsys, reference):
    reference("DALI-S_s0")  # the reference study has finished
    source = reference("DALI-S_s0").parents[2]
    d = tmp_path / "study"
    study = sweep.Study(methods=("Dreamer-DR", "DALI-S", "DALI-D"), seeds=(0, 1), dir=str(d))  # type: ignore[arg-type]
    sweep.claim_dir(study, "bic_gravity")
    for name in ("Dreamer-DR_s0", "DALI-S_s0"):
        (d / name).mkdir()
        for f in ("done", "zeroshot_single_0.jsonl"):
            shutil.copy(source / name / f, d / name / f)
    (d / "DALI-S_s1").mkdir()
    (d / "DALI-S_s1" / "failed").write_text("train.py failed with status 1; its output: ...")
    assert sweep.aggregate(study) is not None
    out = capsys.readouterr().out
    assert "left out of the aggregate (2 of 6 runs in it):" in out
    assert "  DALI-D: no finished run (DALI-D_s0 pending, DALI-D_s1 pending)" in out
    assert "  Dreamer-DR_s1: pending" in out and "  DALI-S_s1: failed" in out
    assert set(json.loads((d / "zeroshot_single_0.json").read_text())["metrics"]["all"]) == {"Dreamer-DR", "DALI-S"}
