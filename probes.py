"""What a learned context encodes, measured against the true physics (DALI, Röder et al., arXiv:2508.20294,
Sec. 6.3): linear probes and correlations of ctx with the true context, and the physical plausibility of
counterfactual dreams (real-env rollouts from the same states, the gravity a dream looks like, Spearman
rank correlations with bootstrap CIs over start states). counterfactual.py runs these on a trained agent.

Shapes: E episodes, P probe steps, X ctx dims, F context features, M shifts, N start states, H horizon,
O observation features, A action dims, G gravities, S steps.
"""

from __future__ import annotations

import numpy as np

import envs

BALL_DIMS = (2, 3, 6, 7)  # ball_in_cup features: the ball's position and velocity (qpos: cup x, cup z, ball x, ball z; then qvel)


def random_rollouts(task: envs.Task, setting: str, episodes: int, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniform-random-action episodes, one per training context in turn (probes of the context encoder).
    Returns obs (E, S+1, O) float32, actions (E, S+1, A) with a_{t-1} at t (zeros at t = 0, the replay
    convention of dali.py) and the normalised true context of each episode (E, X)."""
    env = envs.make_env(task, contexts=envs.train_contexts(task, setting, seed=seed), seed=seed)
    rng = np.random.default_rng(seed)
    obs = np.zeros((episodes, steps + 1, env.obs_size), np.float32)
    actions = np.zeros((episodes, steps + 1, env.action_size), np.float32)
    contexts = np.zeros((episodes, len(env.features)), np.float32)
    for e in range(episodes):
        o, info = env.reset()
        obs[e, 0], contexts[e] = o["obs"], info["context_vector"]
        for t in range(1, steps + 1):
            actions[e, t] = rng.uniform(-1, 1, env.action_size)
            obs[e, t] = env.step(actions[e, t])[0]["obs"]
    return obs, actions, contexts


def linear_r2(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """R^2 on held-out data of a least-squares linear probe (with bias) from x (N, D) to each column of y."""
    fit = lambda x: np.concatenate([x, np.ones((len(x), 1))], 1)  # noqa: E731
    w = np.linalg.lstsq(fit(x_train), y_train, rcond=None)[0]
    pred = fit(x_test) @ w
    total = ((y_test - y_test.mean(0)) ** 2).sum(0)
    # nan for a column that does not vary (e.g. gravity at its default in single_1). Its range, not `total`,
    # decides: the mean of equal float32 values can differ from them by rounding, leaving a tiny total that
    # a probe matches as tinily, which read as R^2 = 1.0.
    varies = y_test.max(0) > y_test.min(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(varies, 1 - ((pred - y_test) ** 2).sum(0) / total, np.nan)


def probe_table(ctx: np.ndarray, true: np.ndarray, held_out: np.ndarray, names: list[str], inside: np.ndarray | None = None) -> dict:
    """Correlation of every ctx dim with every true feature and the held-out linear-probe R^2 of each feature.
    ctx (E, P, X) at P probe steps per episode, true (E, F), held_out (E,) bool: episodes of test contexts;
    inside (E,) bool: episodes whose context lies in the training range. Over the whole evaluation grid
    (gravity 0.98 to 19.6) the spread of the true values inflates R^2, so it is also reported with probe
    and test episodes both inside the training range (`r2_linear_train_range`)."""
    X, F = ctx.shape[-1], true.shape[-1]
    y = np.repeat(true[:, None], ctx.shape[1], 1)  # (E, P, F)
    corr, best = correlations(ctx, true, names)

    def r2(train, test):
        return linear_r2(ctx[train].reshape(-1, X), y[train].reshape(-1, F), ctx[test].reshape(-1, X), y[test].reshape(-1, F))

    nan_to_none = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731  (JSON has no nan)
    table = {"features": names, "corr": [nan_to_none(row) for row in corr], "r2_linear": dict(zip(names, nan_to_none(r2(~held_out, held_out))))}
    if inside is not None and (inside & ~held_out).any() and (inside & held_out).any():
        table["r2_linear_train_range"] = dict(zip(names, nan_to_none(r2(inside & ~held_out, inside & held_out))))
    return {**table, "best_dim": best}


def correlations(ctx: np.ndarray, true: np.ndarray, names: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Pearson correlation (X, F) of ctx (E, P, X) with the true context (E, F) over all windows, and for every
    feature that varies, the dimension with the largest |correlation|."""
    X = ctx.shape[-1]
    y = np.repeat(true[:, None], ctx.shape[1], 1).reshape(-1, true.shape[-1])
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant feature has no correlation (nan)
        corr = np.corrcoef(ctx.reshape(-1, X).T, y.T)[:X, X:]
    best = {n: int(np.nanargmax(np.abs(corr[:, f]))) for f, n in enumerate(names) if true[:, f].max() > true[:, f].min()}  # varies: as linear_r2
    return corr, best


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation, ties sharing their average rank; nan when either side is constant."""

    def rank(v):
        v = np.asarray(v, float)
        r = np.empty(len(v))
        r[np.argsort(v, kind="stable")] = np.arange(len(v))
        for value in np.unique(v):
            r[v == value] = r[v == value].mean()
        return r

    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def implied_gravity(decoded: np.ndarray, env: envs.ContextualDMC, contexts: list[dict], physics: np.ndarray, actions: np.ndarray,
                    grid: np.ndarray) -> np.ndarray:  # fmt: skip
    """The gravity a dream looks like: for each dream, the gravity of the grid whose real rollout (same start
    state, same actions, the episode's other context features) is closest to the dream's ball trajectory.
    decoded (M, N, H + 1, O) ball_in_cup features, contexts (N,), physics (N, P) start states, actions
    (N, H, A), grid (G,) -> (M, N). Real rollouts passed in as dreams give back their own gravity (tested)."""
    ball = list(BALL_DIMS)
    implied = np.zeros(decoded.shape[:2])
    for n, context in enumerate(contexts):
        runs = np.stack([real_rollout(env, {**context, "gravity": float(g)}, physics[n], actions[n]) for g in grid])  # (G, H+1, O)
        error = ((decoded[:, n][:, None][..., ball] - runs[None][..., ball]) ** 2).sum((-2, -1))  # (M, G)
        implied[:, n] = grid[error.argmin(-1)]
    return implied


def bootstrap_rank_corr(x: np.ndarray, y: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman correlation over the M shifts of x and y averaged over N start states, (M, N) each, with a
    95% percentile-bootstrap CI from resampling the start states: (point, low, high). Five shift values
    alone carry no uncertainty; the start states do."""
    rng = np.random.default_rng(seed)
    point = spearman(x.mean(1), y.mean(1))
    draws = []
    for _ in range(reps):
        n = rng.integers(0, x.shape[1], x.shape[1])
        draws.append(spearman(x[:, n].mean(1), y[:, n].mean(1)))
    draws = np.asarray(draws)
    draws = draws[~np.isnan(draws)]
    if len(draws) == 0:
        return point, float("nan"), float("nan")
    return point, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def real_rollout(env: envs.ContextualDMC, context: dict, physics_state: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """The real env's features (H + 1, O), started from `physics_state` in `context` and driven by `actions`
    (H, A). One env serves every rollout: each one resets it, patches the context, and sets the state."""
    env.reset()
    env.apply_context(context)
    env.physics.set_state(physics_state)
    env.physics.forward()
    obs = [np.concatenate([env.physics.data.qpos, env.physics.data.qvel]).astype(np.float32)]  # ball_in_cup's features
    for a in actions:
        obs.append(env.step(a)[0]["obs"])
    return np.stack(obs)
