"""The test of the tests: plant plausible one-line errors in the recipe, one at a time, and check that the
test suite catches each (DEVELOPERS' rule: a test that survives every such error proves only that the code
runs). Each error is applied to a fresh copy of the repository, so the working tree is never touched.

    python benchmarks/plant_errors.py                 # every error, the recipe tests (a few minutes each)
    python benchmarks/plant_errors.py --only 1 5      # some errors
    python benchmarks/plant_errors.py --all-tests     # the whole suite per error (slow)
    python benchmarks/plant_errors.py --machinery     # errors in checkpoints, signals, logs, envs, evaluation
    python benchmarks/plant_errors.py --only 25 --tests "head_targets"   # does one test catch an error?

Prints one line per error: caught (by which test), SURVIVED, or NO TEST (the planted code broke pytest's
collection, so no test judged it); exits 1 unless every error was caught.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent

# The tests of L_TC (--ctx.objective tc), which its errors run instead of RECIPE_TESTS (they are among those too).
TC_TESTS = "fsq or spc_written or mask_the_temporal or exactly_g_and or moves_only_by or rolls_out_from_each_step"
# The records' episode step is pinned by the mid-episode resume test of a deep agent (a train.py run; slower).
STEP_TESTS = "interrupted_mid_episode_resumes_bit_identically and deep and update"
# (file, exact text, replacement, what the error is[, the tests to run]). The text must occur exactly once in the file.
ERRORS = [
    ("actor_critic.py", "    return -weight * ((ret - value) / scale + eta * entropy)", "    return weight * ((ret - value) / scale + eta * entropy)", "actor loss sign flipped"),
    ("actor_critic.py", "            return clip_action(dist.rsample())", "            return clip_action(dist.rsample().detach())", "dynamics gradient cut (rsample().detach())"),
    ("rssm.py", "    unimix: float = 0.01", "    unimix: float = 0.0", "unimix set to 0"),
    ("rssm.py", "        update = torch.sigmoid(update - 1)", "        update = torch.sigmoid(update)", "GRU update bias of -1 removed"),
    ("rssm.py", "        x = [state[\"stoch\"], keep * action]", "        x = [state[\"stoch\"], action]", "previous action not zeroed at is_first (obs_step; observe below)"),
    ("actor_critic.py", "        scale = self.retnorm(ret)", "        scale = self.retnorm(ret) * 0 + 1", "return normalisation fixed to 1"),
    ("actor_critic.py", "                slow.lerp_(fast, self.cfg.slow_critic_fraction)", "                slow.copy_(fast)", "slow critic replaced by a hard copy"),
    ("actor_critic.py", "        weight = imagination_weights(start_cont, gamma * cont)  # (H, N)", "        weight = torch.ones_like(ret)  # (H, N)", "imagination loss weights replaced by ones"),
    ("actor_critic.py", "        losses = {\"actor\": actor_loss(ret, value[:-1], scale", "        losses = {\"actor\": actor_loss(ret, value[:-1].detach(), scale", "actor baseline detached"),
    ("world_model.py", "        cont = (self.cont_head(feat[1:]).squeeze(-1) > 0).to(feat.dtype)  # (H, N)", "        cont = torch.sigmoid(self.cont_head(feat[1:]).squeeze(-1))  # (H, N)", "imagined continuation: probability instead of mode"),
    ("actor_critic.py", "            return clip_action(dist.rsample())", "            return dist.rsample()", "imagined actions not scaled into [-1, 1]"),
    ("actor_critic.py", "    return -weight * ((ret - value) / scale + eta * entropy)", "    return -weight * ((ret - value) / scale - eta * entropy)", "entropy bonus sign flipped"),
    ("actor_critic.py", "        last = reward[t] + disc[t] * ((1 - lam) * value[t + 1] + lam * last)", "        last = reward[t] + disc[t] * (lam * value[t + 1] + (1 - lam) * last)", "lambda and 1 - lambda swapped in the returns"),
    ("actor_critic.py", "        gamma = 1.0 - 1.0 / cfg.return_horizon", "        gamma = 1.0 - 1.0 / (cfg.return_horizon + 1)", "discount off by one"),
    ("dali.py", "        seq = sequence_context(now, batch[\"is_first\"][:, P:], ctx[:, P - 1].detach())  # P >= K >= 1", "        seq = now", "DALI-D (per-step variant) sequence model reads ctx_t (sees o_t)"),
    ("dali.py", "            return held, held, pieces", "            return held, sequence_context(ctx, batch[\"is_first\"])[:, P:].detach(), pieces", "DALI-D: per-step ctx_{t-1} into the sequence model in training (the leak)"),
    ("context_window.py", "        refresh = (self.step % self.refresh == 0)[:, None]  # (N, 1)", "        refresh = torch.ones_like(self.step, dtype=torch.bool)[:, None]  # (N, 1)", "DALI-D acting refreshes ctx every step"),
    ("dali.py", "    r = torch.arange(L, device=step.device) - (step.long() % refresh)  # (B, L)", "    r = torch.arange(L, device=step.device) - (step.long() % refresh) + 1  # (B, L)", "DALI-D held ctx one step late (reads o_r)"),
    ("train.py", "        ep_step = np.where(done, 0, ep_step + 1).astype(np.int32)", "        ep_step = (ep_step + 1).astype(np.int32)", "DALI-D episode step not reset at an episode start", STEP_TESTS),
    ("dali.py", "        now = ctx[:, P:].detach()  # (B, T, X)", "        now = ctx[:, P:]  # (B, T, X)", "ctx not detached where the world model consumes it"),
    ("dali.py", "        fd = forward_dynamics_loss(self.ctx_encoder, x[:, P:-1], x[:, P + 1 :], batch[\"action\"][:, P + 1 :]", "        fd = forward_dynamics_loss(self.ctx_encoder, x[:, P:-1], x[:, P:-1], batch[\"action\"][:, P + 1 :]", "L_FD target o_t instead of o_{t+1}"),
    ("dali.py", "        fd = forward_dynamics_loss(self.ctx_encoder, x[:, P:-1], x[:, P + 1 :], batch[\"action\"][:, P + 1 :]", "        fd = forward_dynamics_loss(self.ctx_encoder, x[:, P:-1], x[:, P + 1 :], batch[\"action\"][:, P:-1]", "L_FD action a_{t-1} instead of a_t"),
    ("context_encoder.py", "        band = (offset >= 0) & (offset < K)  # (L, L)", "        band = (offset >= -1) & (offset < K)  # (L, L)", "context window sees the next token (off by one)"),
    ("context_encoder.py", "        band = (offset >= 0) & (offset < K)  # (L, L)", "        band = (offset >= 0) & (offset <= K)  # (L, L)", "context window one token too long"),
    ("context_window.py", "            self.prev_obs, is_first = obs, torch.ones_like(is_first)", "            self.prev_obs = obs", "fabricated token at the prefill handover"),
    ("cross_modal.py", "    return ((ctx - cross.state_to_ctx(state.detach())) ** 2).mean(-1)", "    return ((ctx - cross.state_to_ctx(state)) ** 2).mean(-1)", "L_cross's context term trains the world model"),
    ("cross_modal.py", "    return ((state - cross.ctx_to_state(ctx.detach()).detach()) ** 2).mean(-1)", "    return ((state.detach() - cross.ctx_to_state(ctx.detach()).detach()) ** 2).mean(-1)", "L_cross's state term never trains the world model"),
    ("dali.py", "        cross_scale = ctx_cfg.cross_weight if learned else 0.0", "        cross_scale = 0.0", "L_cross's state term left out of the world model's loss"),
    ("cross_modal.py", "    return fd + cross_weight * target_dims * cross", "    return fd + cross_weight * cross", "L_cross's context term at 1/O of the release's weight against L_FD"),
    ("rssm.py", "    dyn = kl(post_logits.detach(), prior_logits)", "    dyn = kl(post_logits, prior_logits)", "dynamics KL without its stop-gradient"),
    ("rssm.py", "    return torch.clamp(dyn, min=free), torch.clamp(rep, min=free)", "    return dyn, torch.clamp(rep, min=free)", "free bits dropped from the dynamics KL"),
    # World-model targets and inputs, the actor's distribution, and what imagination feeds (added with the split)
    ("world_model.py", "            target = symlog(obs) if ctx is None else torch.cat([symlog(obs), ctx], -1)",
     "            target = torch.sign(obs) * torch.expm1(obs.abs()) if ctx is None else torch.cat([torch.sign(obs) * torch.expm1(obs.abs()), ctx], -1)",
     "decoder target symexp(o_t) instead of symlog(o_t)"),
    ("world_model.py", "            target = symlog(obs) if ctx is None else torch.cat([symlog(obs), ctx], -1)",
     "            target = obs if ctx is None else torch.cat([obs, ctx], -1)", "decoder target o_t without symlog"),
    ("world_model.py", "            target = symlog(obs) if ctx is None else torch.cat([symlog(obs), ctx], -1)",
     "            target = symlog(obs.roll(-1, 1)) if ctx is None else torch.cat([symlog(obs.roll(-1, 1)), ctx], -1)", "decoder reconstructs o_{t+1}"),
    ("world_model.py", "            target = symlog(obs) if ctx is None else torch.cat([symlog(obs), ctx], -1)",
     "            target = symlog(obs) if ctx is None else torch.cat([symlog(obs), torch.zeros_like(ctx)], -1)", "cRSSM-S decoder does not reconstruct the true context"),
    ("world_model.py", "        loss = ((pred - (obs.float() / 255 - 0.5)) ** 2).sum((-3, -2, -1))",
     "        loss = ((pred - (obs.float() / 255)) ** 2).sum((-3, -2, -1))", "pixel decoder target o_t / 255 (no - 0.5)"),
    ("world_model.py", "            x = obs.reshape(-1, *obs.shape[-3:]).permute(0, 3, 1, 2).float() / 255 - 0.5  # (N, 3, 64, 64)",
     "            x = obs.reshape(-1, *obs.shape[-3:]).permute(0, 3, 1, 2).float() / 255  # (N, 3, 64, 64)", "pixel encoder input o_t / 255 (no - 0.5)"),
    ("world_model.py", "        x = symlog(obs) if ctx is None else torch.cat([symlog(obs), ctx], -1)",
     "        x = obs if ctx is None else torch.cat([obs, ctx], -1)", "feature encoder input without symlog"),
    ("world_model.py", "            \"rew\": twohot_loss(self.reward_head(feat), batch[\"reward\"].float(), self.bins),",
     "            \"rew\": twohot_loss(self.reward_head(feat), batch[\"reward\"].roll(-1, 1).float(), self.bins),", "reward target r_{t+1} instead of r_t"),
    ("world_model.py", "            \"rew\": twohot_loss(self.reward_head(feat), batch[\"reward\"].float(), self.bins),",
     "            \"rew\": twohot_loss(self.reward_head(feat.roll(-1, 1)), batch[\"reward\"].float(), self.bins),", "reward head reads the next state s_{t+1}"),
    ("layers.py", "    return -(twohot(symlog(target), bins) * F.log_softmax(logits, -1)).sum(-1)",
     "    return -(twohot(target, bins) * F.log_softmax(logits, -1)).sum(-1)", "two-hot targets (reward, critic) without symlog"),
    ("world_model.py", "                self.cont_head(feat).squeeze(-1), 1.0 - batch[\"is_terminal\"].float(), reduction=\"none\"",
     "                self.cont_head(feat).squeeze(-1), batch[\"is_terminal\"].float(), reduction=\"none\"", "continue target not inverted (is_terminal)"),
    ("world_model.py", "                self.cont_head(feat).squeeze(-1), 1.0 - batch[\"is_terminal\"].float(), reduction=\"none\"",
     "                self.cont_head(feat).squeeze(-1), 1.0 - batch[\"is_first\"].float(), reduction=\"none\"", "continue target 1 - is_first"),
    ("world_model.py", "        feat = self.feat(post, ctx)  # (B, T, F)", "        feat = self.feat(post, seq_ctx)  # (B, T, F)", "deep heads read ctx_{t-1} in training"),
    ("actor_critic.py", "0.9 * torch.sigmoid(raw_std + 2) + 0.1)", "torch.sigmoid(raw_std + 2) + 0.1)", "actor sigma: 0.9 scale dropped"),
    ("actor_critic.py", "0.9 * torch.sigmoid(raw_std + 2) + 0.1)", "0.9 * torch.sigmoid(raw_std) + 0.1)", "actor sigma: + 2 shift dropped"),
    ("actor_critic.py", "0.9 * torch.sigmoid(raw_std + 2) + 0.1)", "0.9 * torch.sigmoid(raw_std + 2) + 0.01)", "actor sigma floor 0.01 instead of 0.1"),
    ("actor_critic.py", "        return torch.distributions.Normal(torch.tanh(mu), ", "        return torch.distributions.Normal(mu, ", "actor mean without tanh"),
    ("world_model.py", "        feat = self.feat(states, None if ctx is None else ctx.expand(horizon + 1, -1, -1))  # (H+1, N, F)",
     "        feat = self.feat(states, None if ctx is None else torch.zeros_like(ctx).expand(horizon + 1, -1, -1))  # (H+1, N, F)",
     "imagination: heads and critic fed a zero ctx"),
    ("world_model.py", "        states, _ = self.rssm.imagine(start, policy, horizon, ctx if self.ctx_deep else None)  # (H+1, N, ...)",
     "        states, _ = self.rssm.imagine(start, policy, horizon, torch.zeros_like(ctx) if self.ctx_deep else None)  # (H+1, N, ...)",
     "imagination: sequence model fed a zero ctx"),
    ("actor_critic.py", "        start_ctx = None if ctx is None else ctx.flatten(0, 1)  # (N, X)",
     "        start_ctx = None if ctx is None else ctx.roll(1, 1).flatten(0, 1)  # (N, X)", "imagination: ctx of the previous step (shifted) held"),
    ("actor_critic.py", "            dist = self.actor(wm.feat(state, start_ctx).detach())",
     "            dist = self.actor(wm.feat(state, start_ctx if start_ctx is None else torch.zeros_like(start_ctx)).detach())",
     "imagination: actor fed a zero ctx"),
    ("world_model.py", "        reward = twohot_mean(self.reward_head(feat[1:]), self.bins)  # (H, N)",
     "        reward = twohot_mean(self.reward_head(feat[:-1]), self.bins)  # (H, N)", "imagined rewards read from s_0..s_{H-1}"),
    ("actor_critic.py", "        slow = twohot_mean(self.slow_critic(feat), self.bins)", "        slow = twohot_mean(self.critic(feat), self.bins)",
     "critic regularised towards itself, not the slow critic"),
    ("actor_critic.py", "torch.tensor([0.05, 0.95], device=ret.device)", "torch.tensor([0.0, 1.0], device=ret.device)", "return scale from min-max, not 5-95 percentiles"),
    ("dali.py", "    return ctx_cfg.window + (ctx_cfg.refresh if ctx_cfg.refresh > 0 else 1)", "    return ctx_cfg.window + (ctx_cfg.refresh - 1 if ctx_cfg.refresh > 0 else 1)",
     "DALI-D batches hold K + R - 1 history records (the held ctx of the first step pools K - 1)"),
    ("dali.py", "        self.ctx_post = X if (learned and cfg.integration == \"shallow\") else 0  # DALI-S",
     "        self.ctx_post = X if learned else 0  # DALI-S", "DALI-D posterior reads ctx_t too"),
    # L_TC (--ctx.objective tc, temporal_consistency.py)
    ("temporal_consistency.py", "        return self._quantise(self.target, obs)[1]", "        return self._quantise(self.encoder, obs)[1]", "L_TC targets from the online encoder, not the EMA target", TC_TESTS),
    ("temporal_consistency.py", "        logits = self.transition(torch.cat([code, action, ctx], -1))", "        logits = self.transition(torch.cat([code, action, torch.zeros_like(ctx)], -1))", "L_TC transition model reads no ctx", TC_TESTS),
    ("temporal_consistency.py", "    rounded = bounded + (torch.round(bounded) - bounded).detach()", "    rounded = torch.round(bounded)", "FSQ without straight-through gradient", TC_TESTS),
    ("temporal_consistency.py", "        mask = mask & valid[:, k - 1 : k - 1 + N]", "        mask = valid[:, k - 1 : k - 1 + N]", "L_TC mask per step, not cumulative over the rollout", TC_TESTS),
    ("temporal_consistency.py", "            target.lerp_(online, tau)", "            target.copy_(online)", "L_TC target encoder copied, not an EMA", TC_TESTS),
    ("temporal_consistency.py", "        loss = loss + rho ** (k - 1) * mask", "        loss = loss + rho**k * mask", "L_TC step k weighted rho^k", TC_TESTS),
    ("temporal_consistency.py", "        logits, code = model.step(code, action[:, k - 1 : k - 1 + N], ctx", "        logits, code = model.step(code, action[:, k : k + N], ctx", "L_TC rollout step k reads a_{t+k}", TC_TESTS),
    ("dali.py", "ctx[:, P:-1], valid, self.ctx_cfg.tc_horizon", "ctx[:, P:-1].detach(), valid, self.ctx_cfg.tc_horizon", "L_TC does not reach g (ctx detached)", TC_TESTS),
    ("dali.py", "x[:, P:], batch[\"action\"][:, P + 1 :], ctx[:, P:-1]", "x[:, P:], batch[\"action\"][:, P:-1], ctx[:, P:-1]", "L_TC rollout from o_t reads a_{t-1} (record t's action)", TC_TESTS),
    ("dali.py", "x[:, P:], batch[\"action\"][:, P + 1 :], ctx[:, P:-1]", "x[:, P:], batch[\"action\"][:, P + 1 :], ctx[:, P + 1 :]", "L_TC rollout from o_t reads ctx_{t+1} (sees o_{t+1})", TC_TESTS),
    ("dali.py", "        valid = pieces[\"valid\"][:, P:]  # (B, T - 1)", "        valid = pieces[\"valid\"][:, P - 1 : -1]  # (B, T - 1)", "L_TC episode mask one step early", TC_TESTS),
]
# Errors in the run machinery (checkpoints, signals, logs, envs, evaluation), each with the tests that guard it.
MACHINERY = [
    ("checkpoint.py", "torch.load(path, map_location=\"cpu\", weights_only=True)", "torch.load(path, map_location=\"cpu\", weights_only=False)", "checkpoints loaded with pickle (weights_only off)", "pickled_callable"),
    ("run_log.py", "    if ckpt is None and logs:", "    if False:", "a fresh run appends to an old run's logs", "without_checkpoint or bad_checkpoints"),
    ("train.py", 'while not (c["env_steps"] >= args.steps and at_boundary) and not stop.signum:', 'while not (c["env_steps"] >= args.steps and at_boundary):', "a signal no longer stops training", "signal_saves"),
    ("config.py", 'if k.split(".")[0] not in RESUMABLE and saved.get(k) != new.get(k)', 'if k.split(".")[0] not in RESUMABLE and saved.get(k) != new.get(k) and False', "resume accepts any changed flag", "lists_every_conflict or bad_checkpoints"),
    ("envs.py", "        if self.context_in_obs:\n            out[", "        if True:\n            out[", "the true context leaks into the observation", "true_context_is_in_info or pixels_shape or gymnasium"),
    ("envs.py", "        if (action < self.action_low).any() or (action > self.action_high).any()", "        if False", "out-of-range actions pass silently", "gymnasium"),
    ("train.py", '"context": info["final_context_vector"][i], **(', '"context": info["context_vector"][i], **(', "an episode's last record gets the next episode's context", "replay_records"),
    ("evaluate.py", "        path.parent.mkdir(parents=True, exist_ok=True)", "        pass", "output folders not created", "grid_evaluation"),
    ("world_model.py", "        require_finite({f\"wm/{k}\": v.mean() for k, v in losses.items()})\n", "", "a non-finite world-model loss is trained on", "non_finite"),
    ("rollout.py", "agent.act({k: torch.as_tensor(v, device=device) for k, v in o.items()}, state, sample=sample, context=oracle)", "agent.act({k: torch.as_tensor(v, device=device) for k, v in o.items()}, getattr(agent, 'carried', state), sample=sample, context=oracle); agent.carried = state", "evaluation carries the agent state across batches", "fresh_agent_state"),
    ("study_runs.py", "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n        except BlockingIOError:\n            os.close(fd)\n            return False",
     "            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)\n        except BlockingIOError:\n            os.close(fd)\n            return False",
     "two processes can take the same study run", "one_sweep_per_directory"),
    ("counterfactual.py", "    return writable_output(Path(given) if given else Path(src.checkpoint).parent / name)",
     "    return Path(given) if given else Path(src.checkpoint).parent / name", "counterfactual outputs unchecked until after the work", "counterfactual_subcommands"),
    ("film.py", "* train_args.action_repeat * args.every", "* train_args.action_repeat", "a film with --every n plays n times too fast", "film"),
    ("checkpoint.py", "\"agent\": agent, \"counters\"", "\"agent\": agent, \"optimizers\": ckpt[\"optimizers\"], \"counters\"", "export keeps the optimisers' state", "pretrained"),
    ("checkpoint.py", "        agent.load_state_dict(ckpt[\"agent\"])", "        agent.load_state_dict({k: v for k, v in ckpt[\"agent\"].items() if not k.startswith(\"wm.\")}, strict=False)",
     "the world model's weights are not loaded", "shipped"),
    ("supervisor.py", "        job_stop = signum in GROUP_STOPS or bool(signal.sigpending() & GROUP_STOPS)", "        job_stop = signum in GROUP_STOPS",
     "a runner's death with the job's SIGTERM pending forwards a second SIGTERM", "supervisor_gives"),
    ("supervisor.py", "            if os.getppid() != supervisor or pending_in(supervisor) & GROUP_STOPS:", "            if os.getppid() != supervisor:",
     "a job stop that lands before the fork is lost: the child starts", "before_the_fork"),
    ("config.py", "    ratio = TRAIN_RATIO.get((size, task), TRAIN_RATIO.get((size, None), Args.train_ratio))", "    ratio = TRAIN_RATIO.get((size, None), Args.train_ratio)",
     "walker's train ratio falls back to the preset's", "size_presets"),
]

# The second half of "previous action not zeroed" (the sequence loop), applied together with the first.
PAIRED = {4: ("rssm.py", "        seq_rest = [keep * action]", "        seq_rest = [action]")}

RECIPE_TESTS = (
    "papers_constants or prior_step or episode_start or loss_weights or return_normaliser or imagination or imagined_actions "
    "or slow_critic or deep_prior or fresh_window or cross_modal or hidden_dynamics or pixel_agent_trains or lambda_return "
    "or kl_free_bits or fast_observe or rssm_shapes or update_changes or context_is_causal or encode_last or acting_window "
    "or only_the_forward_dynamics or context_unaware or checkpoint_round_trip or head_targets or actor_distribution "
    "or per_step_deep or held or same_inputs or version_1 or wiring or fsq or spc_written or mask_the_temporal or exactly_g_and "
    "or moves_only_by"
)


@dataclass(frozen=True)
class Args:
    """Plant each error in a copy of the repository and run the tests."""

    only: tuple[int, ...] = ()
    """1-based numbers of the errors to plant (default: all)."""
    all_tests: bool = False
    """Run the whole suite per error instead of the recipe tests."""
    list: bool = False
    """Only list the errors."""
    machinery: bool = False
    """Plant the errors of the run machinery (checkpoints, signals, logs, envs, evaluation) instead."""
    tests: str = ""
    """A pytest -k expression to run instead of each error's own tests (e.g. to ask which errors one test catches)."""


def stale_texts(repo: Path) -> list[str]:
    """Every planted error (recipe, machinery, paired) whose text does not occur exactly once in its file."""
    edits = [e[:4] for e in ERRORS + MACHINERY] + [(*e, "paired") for e in PAIRED.values()]
    return [f"{file}: {what}" for file, old, _, what in edits if (repo / file).read_text().count(old) != 1]


def plant(repo: Path, number: int) -> None:
    for file, old, new in [ERRORS[number][:3]] + ([PAIRED[number]] if number in PAIRED else []):
        path = repo / file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"error: error {number + 1} ({ERRORS[number][3]}): the text occurs {text.count(old)} times in {file}, not once")
        path.write_text(text.replace(old, new))


def main(args: Args) -> int:
    global ERRORS, PAIRED
    if args.machinery:
        ERRORS, PAIRED = MACHINERY, {}
    chosen = [n - 1 for n in args.only] if args.only else list(range(len(ERRORS)))
    if args.list:
        for n in chosen:
            print(f"{n + 1:>2} {ERRORS[n][3]}")
        return 0
    survived = []
    for n in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp) / "repo"
            shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache", "docs"))
            plant(repo, n)
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", "test_dali.py"]
            if args.tests:
                cmd += ["-k", args.tests]
            elif not args.all_tests:
                cmd += ["-k", ERRORS[n][4] if len(ERRORS[n]) > 4 else RECIPE_TESTS]
            out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
            # a failed test, or one whose fixture failed (ERROR test_dali.py::name); a collection error has no "::"
            failed = [line.split("::")[1].split(" ")[0] for line in out.stdout.splitlines() if line.startswith(("FAILED", "ERROR")) and "::" in line]
            if out.returncode == 0:
                survived.append(n)
                print(f"{n + 1:>2} SURVIVED  {ERRORS[n][3]}", flush=True)
            elif not failed:  # the planted code broke the collection itself: no test has judged the error
                survived.append(n)
                print(f"{n + 1:>2} NO TEST   {ERRORS[n][3]}: pytest failed before any test did: {out.stdout[-300:]}", flush=True)
            else:
                print(f"{n + 1:>2} caught    {ERRORS[n][3]}: {', '.join(failed)}", flush=True)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} planted errors caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args, description=__doc__)))
