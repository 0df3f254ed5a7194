"""The report: ``report.json``, its markdown rendering and the flat metrics W&B receives."""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.eval.metrics import GOLD_KEYS, METRICS
from pipeline.world.vocabulary import CATEGORIES


def build_report(run_name: str, num_prompts: int, metrics: dict[str, dict[str, dict]],
                 wins: Optional[dict[str, dict[str, float]]], rm_wins: Optional[dict[str, dict[str, float]]],
                 categories: Optional[dict[str, dict[str, dict]]], health: dict[str, dict[str, float]],
                 skipped: dict[str, str], seconds: float, intervals: Optional[dict] = None,
                 win_ci: Optional[dict] = None, rm_win_ci: Optional[dict] = None) -> dict:
    """``report.json``: ``stages.<stage>.<decoding>.<metric>``, ``win_rate`` (gold judge) and
    ``rm_win_rate`` as ``<a>_vs_<b>.<decoding>``, ``categories.<stage>.<decoding>.<category>``
    (gold judge only; None outside the world), ``health.<stage>.<metric>`` (an RL stage's rollout
    health over its last updates), plus what was skipped and the wall time. 95% intervals:
    ``intervals.<stage>.<decoding>.<rate>`` (Wilson), ``win_rate_ci`` and ``rm_win_rate_ci``
    (bootstrap over prompts), each ``[low, high]``."""
    return {
        "run_name": run_name,
        "num_prompts": num_prompts,
        "judge": "gold" if wins is not None else "rm",
        "stages": metrics,
        "intervals": intervals or {},
        "win_rate": wins,
        "win_rate_ci": win_ci,
        "rm_win_rate": rm_wins,
        "rm_win_rate_ci": rm_win_ci,
        "categories": categories,
        "health": health,
        "skipped": skipped,
        "seconds": seconds,
    }


def response_records(prompts: Sequence[str], categories: Sequence[Optional[str]],
                     texts: dict[str, dict[str, list[str]]], scores: Optional[dict[str, dict[str, list[float]]]],
                     rm_scores: Optional[dict[str, dict[str, list[float]]]]) -> list[dict]:
    """``responses.jsonl`` rows: a prompt, its category and every stage's answer under every
    decoding, ``{"responses": {stage: {decoding: {"response", "gold_score", "rm_score"}}}}``."""
    records = []
    for i, (prompt, category) in enumerate(zip(prompts, categories)):
        responses = {s: {d: {"response": texts[s][d][i],
                             "gold_score": None if scores is None else scores[s][d][i],
                             "rm_score": None if rm_scores is None else rm_scores[s][d][i]}
                         for d in texts[s]}
                     for s in texts}
        records.append({"prompt": prompt, "category": category, "responses": responses})
    return records


def _cell(value: Optional[float], fmt: str, interval=None) -> str:
    """``65.8%``, or ``65.8% [61.5, 69.9]`` with its 95% interval (in the value's own units)."""
    if value is None:
        return "n/a"
    if not interval:
        return fmt.format(value)
    scale, unit = (100, "%") if fmt.endswith("%}") else (1, "")
    return f"{fmt.format(value)} [{interval[0] * scale:.1f}, {interval[1] * scale:.1f}]{unit}"


def _later_pairs(stages: list[str]) -> list[tuple[str, str]]:
    """(later, earlier) pairs, e.g. ppo vs sft: the other direction is 1 minus it."""
    return [(a, b) for i, a in enumerate(stages) for b in reversed(stages[:i])]


def _win_table(title: str, wins: dict, stages: list[str], decodings: list[str], ci: Optional[dict]) -> list[str]:
    pairs = _later_pairs(stages)
    if not pairs:
        return []
    lines = [f"## {title}, 95% interval", "", "| pair | " + " | ".join(decodings) + " |",
             "|---|" + "---:|" * len(decodings)]
    for a, b in pairs:
        row, bounds = wins[f"{a}_vs_{b}"], (ci or {}).get(f"{a}_vs_{b}", {})
        lines.append(f"| {a} vs {b} | " + " | ".join(_cell(row[d], "{:.1%}", bounds.get(d)) for d in decodings) + " |")
    return lines + [""]


def render_markdown(report: dict) -> str:
    """``report.md``: per decoding a table with stages as columns, then the win rates and the
    RL stages' rollout health."""
    stages = list(report["stages"])
    decodings = list(report["stages"][stages[0]])
    judge = ("the gold judge" if report["judge"] == "gold"
             else "the run's reward model (these prompts are not the embedded world's: no gold judge)")
    lines = [f"# Evaluation of run `{report['run_name']}` on {report['num_prompts']} held-out prompts", "",
             f"Judged by {judge}.", ""]
    for dec in decodings:
        lines += [f"## {dec}", "", "| metric | " + " | ".join(stages) + " |",
                  "|---|" + "---:|" * len(stages)]
        for key, label, fmt in METRICS:
            if key in GOLD_KEYS and report["judge"] != "gold":
                continue
            lines.append(f"| {label} | " + " | ".join(
                _cell(report["stages"][s][dec][key], fmt, report["intervals"].get(s, {}).get(dec, {}).get(key))
                for s in stages) + " |")
        if report["categories"] is not None:
            for category in CATEGORIES:
                cells = [report["categories"][s][dec].get(category) for s in stages]
                lines.append(f"| score: {category} | " + " | ".join(_cell(c, "{:+.3f}") for c in cells) + " |")
        lines.append("")
    if report["win_rate"] is not None:
        lines += _win_table("Win rates (gold judge, ties count half)", report["win_rate"], stages, decodings,
                            report["win_rate_ci"])
    if report["rm_win_rate"] is not None:
        lines += _win_table("Win rates (reward model, ties count half)", report["rm_win_rate"], stages, decodings,
                            report["rm_win_rate_ci"])
    if report["health"]:
        names = sorted({k for h in report["health"].values() for k in h})
        lines += ["## Rollout health (mean of the last updates)", "",
                  "| metric | " + " | ".join(report["health"]) + " |", "|---|" + "---:|" * len(report["health"])]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(_cell(h.get(name), "{:.4g}") for h in report["health"].values())
                         + " |")
        lines.append("")
    lines += rm_agreement_lines(report) + judge_lines(report) + curve_lines(report)
    if report["skipped"]:
        lines += ["Not in this report:", *(f"- {stage}: {why}" for stage, why in report["skipped"].items())]
    return "\n".join(lines).rstrip() + "\n"


def flat_metrics(report: dict) -> dict[str, float]:
    """``{"<stage>/<decoding>/<metric>": v, "win_rate/<a>_vs_<b>/<decoding>": v, ...}`` for W&B."""
    out = {f"{s}/{d}/{k}": v for s, by_dec in report["stages"].items()
           for d, metrics in by_dec.items() for k, v in metrics.items() if v is not None}
    for key in ("win_rate", "rm_win_rate"):
        out.update({f"{key}/{pair}/{d}": v for pair, by_dec in (report[key] or {}).items()
                    for d, v in by_dec.items()})
    for key in ("win_rate_ci", "rm_win_rate_ci"):
        out.update({f"{key}/{pair}/{d}/{side}": bound for pair, by_dec in (report[key] or {}).items()
                    for d, ci in by_dec.items() if ci for side, bound in zip(("low", "high"), ci)})
    out.update({f"health/{s}/{k}": v for s, h in report["health"].items() for k, v in h.items()})
    out.update({f"rm_agreement/{c}/{d}": a["share"] for c, by_dec in (report.get("rm_agreement") or {}).items()
                for d, a in by_dec.items() if a["share"] is not None})
    out.update(judge_and_curve_metrics(report))
    return out


def rm_agreement_lines(report: dict) -> list[str]:
    """``report.md``'s table of the run's RM against the gold judge by category (world prompts only)."""
    by_category = report.get("rm_agreement")
    if not by_category:
        return []
    decodings = list(by_category["all"])
    lines = ["## Reward model vs gold judge, by category", "",
             "Share of response pairs (one prompt, two stages, one decoding) the RM orders as the gold judge does, "
             "ties in either left out; 50% is chance. RL can only improve what its reward sees.", "",
             "| category | " + " | ".join(decodings) + " |", "|---|" + "---:|" * len(decodings)]
    for category, row in by_category.items():
        lines.append(f"| {category} | " + " | ".join(
            f"{_cell(row[d]['share'], '{:.1%}')} of {row[d]['pairs']}" for d in decodings) + " |")
    return lines + [""]


# --- the independent judge and the over-optimisation curve (pipeline/eval/judge.py, curve.py) ---------


def judge_lines(report: dict) -> list[str]:
    """``report.md``'s judge section: mean judge score per stage, win rates against SFT and the
    agreement of the scorers; nothing without ``judge=``."""
    judge = report.get("judge_model")
    if not judge:
        return []
    stages = list(judge["scores"])
    decodings = list(judge["scores"][stages[0]])
    lines = [f"## Independent judge: `{judge['source']}`", "",
             "A reward model the run did not train (the gold role of Gao et al. 2023; the run's RM is the proxy), "
             "each conversation re-rendered in the judge's own chat template.", "",
             "| metric | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    lines += [f"| judge score (mean), {d} | " + " | ".join(_cell(judge["scores"][s][d], "{:+.3f}") for s in stages)
              + " |" for d in decodings]
    lines.append("")
    if judge["win_rate"]:
        lines += ["### Win rates against SFT (judge, ties count half), 95% interval", "",
                  "| pair | " + " | ".join(decodings) + " |", "|---|" + "---:|" * len(decodings)]
        for pair, row in judge["win_rate"].items():
            ci = judge["win_rate_ci"].get(pair, {})
            lines.append(f"| {pair.replace('_vs_', ' vs ')} | "
                         + " | ".join(_cell(row[d], "{:.1%}", ci.get(d)) for d in decodings) + " |")
        lines.append("")
    if judge["agreement"]:
        lines += ["### Agreement of the scorers", "",
                  "Share of response pairs (one prompt, two stages, one decoding) both scorers order the same way, "
                  "ties in either left out; 50% is chance.", "",
                  "| scorers | " + " | ".join(decodings) + " |", "|---|" + "---:|" * len(decodings)]
        for pair, row in judge["agreement"].items():
            lines.append(f"| {pair.replace('_vs_', ' vs ')} | " + " | ".join(
                f"{_cell(row[d]['share'], '{:.1%}')} of {row[d]['pairs']}" for d in decodings) + " |")
        lines.append("")
    return lines


CURVE_COLUMNS = (("proxy", "proxy (RM)"), ("gold", "gold judge"), ("judge", "independent judge"))


def curve_lines(report: dict) -> list[str]:
    """``report.md``'s over-optimisation curves: a row per snapshot (SFT first, as update 0), and the
    snapshot scoring best on the gold judge / the independent judge."""
    lines = []
    for stage, curve in (report.get("curves") or {}).items():
        rows = ([curve["origin"]] if curve["origin"] else []) + curve["points"]
        cols = [(k, label) for k, label in CURVE_COLUMNS if any(r[k] is not None for r in rows)]
        lines += [f"## Over-optimisation curve: {stage} (Gao et al. 2023; decoding `{curve['decoding']}`)", "",
                  "| update | sqrt(KL to SFT) | KL to SFT | " + " | ".join(label for _, label in cols) + " |",
                  "|---:|---:|---:|" + "---:|" * len(cols)]
        for r in rows:
            name = "0 (sft)" if r is curve["origin"] else str(r["update"])
            lines.append(f"| {name} | {r['sqrt_kl']:.3f} | {r['kl']:.3f} | "
                         + " | ".join(_cell(r[k], "{:+.3f}") for k, _ in cols) + " |")
        lines.append("")
        for key, label in CURVE_COLUMNS[1:]:
            if (best := curve["best"].get(key)) is not None:
                lines.append(f"Best snapshot on the {label}: update {best['update']} ({best['score']:+.3f} at "
                             f"sqrt(KL) {best['sqrt_kl']:.3f}).")
        lines.append("")
    return lines


def judge_and_curve_metrics(report: dict) -> dict[str, float]:
    """W&B keys: ``judge/<stage>/<decoding>/score``, ``judge_win_rate/<pair>/<decoding>``,
    ``agreement/<pair>/<decoding>``, ``curve/<stage>/best_<gold|judge>_update``."""
    out = {}
    judge = report.get("judge_model")
    if judge:
        out.update({f"judge/{s}/{d}/score": v for s, by_dec in judge["scores"].items()
                    for d, v in by_dec.items() if v is not None})
        out.update({f"judge_win_rate/{pair}/{d}": v for pair, by_dec in judge["win_rate"].items()
                    for d, v in by_dec.items()})
        out.update({f"agreement/{pair}/{d}": a["share"] for pair, by_dec in judge["agreement"].items()
                    for d, a in by_dec.items() if a["share"] is not None})
    for stage, curve in (report.get("curves") or {}).items():
        out.update({f"curve/{stage}/best_{key}_update": b["update"] for key, b in curve["best"].items() if b})
    return out
