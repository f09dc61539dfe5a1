"""The figures of evaluate.py and counterfactual.py: the paper's zero-shot panel (IQM bars per regime with
95% CIs, and a probability-of-improvement panel; DALI Sec. 6, after Agarwal et al. 2021) and the
counterfactual dreams (DALI Sec. 6.3): decoded features over time, or side-by-side frames as a GIF; and
the learning curves of benchmarks/learning_curve.py and benchmarks/study_report.py. Each method has one
colour in every figure (METHOD_COLORS); return axes start at 0.
Matplotlib is imported on first use (train.py imports evaluate.py and should not pay for it) and draws
off-screen (Agg), so no display is needed."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# One colour per method in every figure of the project: the DALI release's (anaylsis/plot_rliable.py
# COLOR_MAP, Okabe-Ito), plus the methods it does not plot; any other label gets a grey.
METHOD_COLORS = {
    "Dreamer-DR": "#0072B2",  # blue
    "DALI-S": "#009E73",  # green
    "DALI-S-chi": "#E69F00",  # orange
    "DALI-S-TC": "#56B4E9",  # sky blue (Okabe-Ito; the release has no L_TC)
    "cRSSM-S": "#CC79A7",  # pink
    "cRSSM-D": "#D55E00",  # vermillion
    "DALI-D": "#882255",  # wine
    "DALI-D-chi": "#999933",  # olive
}


def method_color(method: str) -> str:
    """The colour of a method (METHOD_COLORS); a label that is no method's name gets a grey."""
    return METHOD_COLORS.get(method, "#666666")


def _xerr(v: dict) -> list | None:
    """Error-bar extents of {"value", "ci"}; None (no bar) for a single run's missing CI."""
    return [[v["value"] - v["ci"][0]], [v["ci"][1] - v["value"]]] if v["ci"] else None


def zeroshot_figure(summary: dict, path: str, title: str = "") -> None:
    """IQM bars with 95% CIs per regime, and P(X > Y) with CIs in extrapolation (the paper's headline regime;
    over all contexts when the grid has no extrapolation)."""
    plt = _pyplot()
    regimes = list(summary["metrics"])
    methods = list(summary["metrics"][regimes[0]])
    colors = {m: method_color(m) for m in methods}
    top = max((v["IQM"]["ci"] or [v["IQM"]["value"]])[-1] for reg in regimes for v in summary["metrics"][reg].values())
    xmax = 1.0 if top > 0.5 else max(0.05, 1.2 * top)  # weak agents: zoom in rather than show empty bars
    pairs_n = len(methods) * (len(methods) - 1)  # rows of the P(X > Y) panel, two label lines each
    fig, axes = plt.subplots(1, len(regimes) + 1, figsize=(3.0 * (len(regimes) + 1) + 1, max(0.5 * len(methods), 0.32 * pairs_n) + 1.8))
    for ax, reg in zip(axes, regimes):
        for i, m in enumerate(methods):
            v = summary["metrics"][reg][m]["IQM"]
            ax.barh(i, v["value"], color=colors[m], alpha=0.75)
            ax.errorbar(v["value"], i, xerr=_xerr(v), color="k", capsize=3)
        ax.set_yticks(range(len(methods)), methods if ax is axes[0] else [""] * len(methods))
        ax.set_xlim(0, xmax)
        ax.set_title(reg)
        ax.set_xlabel("IQM normalised score")
    headline = "extrapolation" if "extrapolation" in summary["improvement"] else "all"
    ax, pairs = axes[-1], summary["improvement"].get(headline, {})
    for i, (pair, v) in enumerate(pairs.items()):
        ax.errorbar(v["value"], i, xerr=_xerr(v), fmt="o", color=colors[pair.split(" > ")[0]], capsize=3)
    ax.axvline(0.5, color="gray", ls="--", lw=1)
    ax.set_yticks(range(len(pairs)), [p.replace(" > ", " > \n") for p in pairs], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_title(f"P(X > Y), {'extrapolation' if headline == 'extrapolation' else 'all contexts'}")
    seeds = sorted(set(summary["seeds"].values())) if not title else []
    fig.suptitle(title or f"{summary['task']}, {summary['setting']}: zero-shot, {'/'.join(map(str, seeds))} seeds per method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def return_by_context(returns: dict[str, np.ndarray], contexts: list[dict], features: dict, path: str, title: str,
                      random: np.ndarray | None = None) -> None:  # fmt: skip
    """Mean return against each varied feature, one line per method (the mean over seeds) with the seeds'
    range as a band, the training range shaded: where each method breaks. returns[method] (seeds, contexts),
    contexts: the grid in order; features: {name: contexts.ContextFeature} of the varied features; random
    (contexts,): random_c, drawn dashed. A feature's panel shows the contexts where the others are at default."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(features), figsize=(5.2 * len(features), 3.6), squeeze=False)
    for ax, (name, f) in zip(axes[0], features.items()):
        others = [n for n in features if n != name]
        cols = [i for i, c in enumerate(contexts) if all(c[n] == features[n].default for n in others)]
        cols.sort(key=lambda i: contexts[i][name])
        x = np.asarray([contexts[i][name] for i in cols])
        ax.axvspan(*f.train_range, color="gray", alpha=0.15, label="training range")
        for method, r in returns.items():
            ax.plot(x, r[:, cols].mean(0), marker="o", ms=3, color=method_color(method), label=f"{method} ({len(r)} seed{'s' if len(r) > 1 else ''})")
            ax.fill_between(x, r[:, cols].min(0), r[:, cols].max(0), color=method_color(method), alpha=0.2)
        if random is not None:
            ax.plot(x, random[cols], color="k", ls="--", lw=1, label="uniform random policy")
        ax.set_xlabel(name)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("mean return (band: seeds' range)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study_learning_curves(curves: dict[str, dict], path: str) -> None:
    """Evaluation return on the training contexts against env steps, one line per run labelled METHOD_sSEED:
    the method's colour (METHOD_COLORS), a line style per seed. curves[label] = {"steps", "return"} lists."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]  # one per seed, one colour per method
    for name, c in curves.items():
        method, seed = name.rsplit("_s", 1)
        ax.plot([s / 1000 for s in c["steps"]], c["return"], color=method_color(method), ls=styles[int(seed) % len(styles)],
                marker="o", ms=2, lw=1, label=name)  # fmt: skip
    ax.set_xlabel("env steps (thousands)")
    ax.set_ylabel("evaluation return (training contexts)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dream_figure(decoded: np.ndarray, real: np.ndarray, shifts, title: str, path: str, names: list[str] | None = None) -> None:
    """One panel per observation feature: the real continuation and the dream for every shift m."""
    plt = _pyplot()
    O = decoded.shape[-1]
    cols = min(4, O)
    fig, axes = plt.subplots((O + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.4 * ((O + cols - 1) // cols)), squeeze=False)
    colors = plt.cm.coolwarm(np.linspace(0, 1, len(shifts)))
    for i, ax in enumerate(axes.flat):
        if i >= O:
            ax.axis("off")
            continue
        ax.plot(real[:, i], color="k", lw=2, label="real")
        for m, c, d in zip(shifts, colors, decoded):
            ax.plot(d[:, i], color=c, lw=1, ls="-" if m else "--", label=f"m = {m:g}")
        ax.set_title(names[i] if names else f"obs[{i}]", fontsize=9)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.supxlabel("imagined step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def dream_gif(decoded: np.ndarray, real: np.ndarray, path: str) -> None:
    """Frames: the real continuation, then each counterfactual, side by side. decoded (M, L, H, W, 3) in [0, 1]."""
    from PIL import Image

    frames = []
    for t in range(decoded.shape[1]):
        row = [real[min(t, len(real) - 1)]] + [(d[t] * 255).astype(np.uint8) for d in decoded]
        frames.append(Image.fromarray(np.concatenate(row, 1)).resize((64 * len(row) * 2, 128), Image.NEAREST))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)


def learning_curves(curves: dict[str, dict[str, np.ndarray]], threshold: float, title: str, path: str) -> None:
    """Evaluation return against env steps and against wall-clock hours, one line per run:
    curves[label] = {"steps": (N,), "hours": (N,), "return": (N,)}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for label, c in curves.items():
        for ax, x in zip(axes, (c["steps"] / 1000, c["hours"])):
            ax.plot(x, c["return"], marker="o", ms=3, label=label)
    for ax, xlabel in zip(axes, ("env steps (thousands)", "wall-clock hours")):
        ax.axhline(threshold, color="gray", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("evaluation return")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
