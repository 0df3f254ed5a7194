"""The report's figures (matplotlib's Agg canvas: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.world.vocabulary import CATEGORIES

# --- plots (matplotlib's Agg canvas: no display needed) ------------------------------------


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # a PNG renderer, independent of pyplot's global backend
    return fig, fig.subplots(1, ncols)


def plot_category_scores(scores: dict[str, dict[str, float]], title: str, path: Path) -> Path:
    """Grouped bars: gold score per category, one bar per stage. ``scores[stage][category]``."""
    stages = list(scores)
    categories = [c for c in CATEGORIES if any(c in scores[s] for s in stages)]
    fig, ax = _figure(8, 4)
    width = 0.8 / max(1, len(stages))
    for i, stage in enumerate(stages):
        xs = [j + (i - (len(stages) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, [scores[stage].get(c, 0.0) for c in categories], width, label=stage)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("mean gold score")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_stage_scores(scores: dict[str, float], title: str, path: Path) -> Path:
    """Bars: one value per stage (the mean RM score when no gold judge applies)."""
    fig, ax = _figure(6, 4)
    ax.bar(list(scores), list(scores.values()))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("mean RM score")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def read_history(path: Path) -> list[dict]:
    """PPO's ``history.jsonl``: one JSON object per update."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_rl_history(histories: dict[str, list[dict]], path: Path) -> Path:
    """Reward (the score the policy is trained on) and KL to the reference over the updates of
    each RL stage. The score is the configured reward: the normalised RM score by default,
    minus the missing-EOS penalty, plus any other sources.

    ``histories[stage]``: one dict per update, in order, with ``objective/scores`` and
    ``objective/kl``; the x axis is the update number.
    """
    fig, (reward_ax, kl_ax) = _figure(10, 4, ncols=2)
    for stage, history in histories.items():
        updates = range(1, len(history) + 1)
        reward_ax.plot(updates, [h["objective/scores"] for h in history], label=stage)
        kl_ax.plot(updates, [h["objective/kl"] for h in history], label=stage)
    for ax, title in ((reward_ax, "score (objective/scores)"), (kl_ax, "KL to the SFT reference (objective/kl)")):
        ax.set_xlabel("update")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_curves(curves: dict[str, dict], path: Path) -> Path:
    """The over-optimisation curve (Gao et al. 2023): one panel per scorer present (proxy = the
    run's RM, gold = the world's judge, judge = the independent judge), its mean score against
    sqrt(KL) to SFT, one point per snapshot (SFT itself at 0), a line per RL stage.

    ``curves[stage]``: ``{"points": [{"sqrt_kl", "proxy", "gold", "judge", "update"}, ...], "origin"}``
    as pipeline/eval/curve.py builds them."""
    titles = {"proxy": "proxy: the run's RM", "gold": "gold: the world's judge", "judge": "independent judge"}
    keys = [k for k in titles if any(p[k] is not None for c in curves.values() for p in c["points"])]
    fig, axes = _figure(5 * max(1, len(keys)), 4, ncols=max(1, len(keys)))
    axes = axes if len(keys) > 1 else [axes]
    for ax, key in zip(axes, keys):
        for stage, curve in curves.items():
            points = ([curve["origin"]] if curve["origin"] and curve["origin"][key] is not None else []) \
                + [p for p in curve["points"] if p[key] is not None]
            ax.plot([p["sqrt_kl"] for p in points], [p[key] for p in points], marker="o", label=stage)
            for p in points:  # each point named by its update (0: SFT)
                ax.annotate(str(p["update"]), (p["sqrt_kl"], p[key]), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)
        ax.set_xlabel("sqrt(KL to SFT) (nats^1/2)")
        ax.set_ylabel("mean score")
        ax.set_title(titles[key])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
