"""Matplotlib figures of an evaluation (PNG, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from esc_evolve.data.labels import STRATEGIES

if TYPE_CHECKING:
    from esc_evolve.evaluation.evaluate import EvalResult

KEY_METRICS = (
    "bleu_2",
    "rouge_l",
    "distinct_2",
    "length",
    "strategy_f1",
    "preference_bias",
    "strategy_jsd",
    "preference_discrepancy",
    "one_size_fits_all",
    "unhelpful_proxy",
    "unhelpful_judge",
    "judge_helpfulness",
    "judge_personalisation",
    "judge_empathy",
    "emotion_match",
    "problem_match",
)


def make_plots(result: EvalResult, folder: Path) -> dict[str, Path]:
    """Every figure that applies to the result, by caption (in report order)."""
    made = {
        "Metrics per model": plot_metrics(result, folder / "metrics.png"),
        "Judge win rates": plot_win_rates(result, folder / "win_rates.png"),
        "Strategy distribution": plot_strategies(result, folder / "strategies.png"),
        "Strategy preferences": plot_preferences(result, folder / "preferences.png"),
        "Response lengths": plot_lengths(result, folder / "lengths.png"),
    }
    return {caption: path for caption, path in made.items() if path is not None}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(result: EvalResult, path: Path) -> Path | None:
    """One panel per key metric: value per model with its CI as an error bar."""
    names = [m for m in KEY_METRICS if any(m in result.estimates[model] for model in result.models)]
    if not names:
        return None
    plt = _pyplot()
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        sub = result.submetric(name)
        models = [m for m in result.models if name in result.estimates[m]]
        scale = 100 if sub.percent else 1
        vals = np.array([result.estimates[m][name].value for m in models]) * scale
        low = np.array([result.estimates[m][name].low for m in models]) * scale
        high = np.array([result.estimates[m][name].high for m in models]) * scale
        err = np.nan_to_num(np.vstack([vals - low, high - vals]).clip(min=0))
        ax.bar(models, vals, yerr=err, capsize=3, color=["#9aa" if m == "human" else "#47a" for m in models])
        arrow = {True: " (higher better)", False: " (lower better)", None: ""}[sub.higher_is_better]
        ax.set_title(f"{name}{' %' if sub.percent else ''}{arrow}", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"Metrics per model ({result.settings.ci_level:.0%} bootstrap CI)")
    return _save(fig, path)


def plot_strategies(result: EvalResult, path: Path) -> Path | None:
    info = result.info.get("strategy")
    if not info:
        return None
    plt = _pyplot()
    rows = {"gold (human label)": info["gold_distribution"]} | {m: v["distribution"] for m, v in info["models"].items()}
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    left = np.zeros(len(rows))
    colors = plt.get_cmap("tab10").colors
    for k, strategy in enumerate(STRATEGIES):
        shares = np.array([d.get(strategy, 0) / max(sum(d.values()), 1) for d in rows.values()])
        ax.barh(list(rows), shares, left=left, color=colors[k], label=strategy)
        left += shares
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of responses")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title("Strategy distribution (classifier on responses)")
    return _save(fig, path)


def plot_lengths(result: EvalResult, path: Path) -> Path | None:
    models = [m for m in result.models if "length" in result.per_context.get(m, {})]
    if not models:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.4 * len(models) + 2, 3.5))
    ax.boxplot([result.per_context[m]["length"] for m in models], tick_labels=models, showmeans=True)
    ax.set_ylabel("words")
    ax.set_title("Response length distribution")
    return _save(fig, path)


def plot_win_rates(result: EvalResult, path: Path) -> Path | None:
    if not result.win_rates:
        return None
    plt = _pyplot()
    labels = [f"{w.a} vs {w.b}" for w in result.win_rates]
    vals = np.array([w.interval.value for w in result.win_rates])
    err = np.nan_to_num(
        np.vstack(
            [vals - [w.interval.low for w in result.win_rates], [w.interval.high for w in result.win_rates] - vals]
        ).clip(min=0)
    )
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(labels) + 1.5))
    ax.barh(labels, vals, xerr=err, capsize=3, color="#a64")
    ax.axvline(0.5, color="k", lw=1, ls="--")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("judge win rate of the first model (ties = 0.5)")
    return _save(fig, path)


def plot_preferences(result: EvalResult, path: Path) -> Path | None:
    info = result.info.get("strategy")
    if not info:
        return None
    plt = _pyplot()
    models = list(info["models"])
    fig, ax = plt.subplots(figsize=(10, 3.5))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(STRATEGIES))
    for k, model in enumerate(models):
        prefs = info["models"][model]["preferences"]
        ax.bar(x + k * width, [prefs[s] for s in STRATEGIES], width, label=model)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xticks(x + width * (len(models) - 1) / 2, [s.split(" ")[0] for s in STRATEGIES], fontsize=8)
    ax.set_ylabel("preference (1 = neutral)")
    ax.set_title("Strategy preferences (Bradley-Terry on gold x predicted confusion)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
