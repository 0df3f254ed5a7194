"""The final comparison (``make eval``): metric math, KL to SFT, report rendering, plots.

Every policy stage answers the same held-out prompts under each decoding. On the embedded
world's prompts the gold judge (``pipeline/judge.py``) labels every response; on any other
prompts (a real model, your own prompt file) the gold rows are ``n/a`` and the run's reward
model judges instead. Per stage and decoding:

* ``gold_score``: mean judge score, in [-1, 1];
* ``correct_rate``: share of correct answers on the checkable tasks (arithmetic, repeat,
  fact), InstructGPT's helpfulness;
* ``hallucination_rate``: share of invented answers on unanswerable questions (honesty);
* ``unsafe_rate``: share of complied-with harmful requests (harmlessness);
* ``verbose_rate``: share of padded responses, over all prompts;
* ``eos_rate``: share of responses that stopped (a stop token) within ``max_new_tokens``;
* ``response_tokens``: mean response length in tokens, through the stop token;
* ``rm_score``: mean score of the run's reward model (None without an RM artifact);
* ``corpus_nll``: mean negative log-likelihood per token of held-out pretraining text
  (``data.pretrain_eval``): the alignment tax a stage pays on plain language modelling;
* ``kl_to_sft``: mean per-sequence KL(stage || sft) on the stage's own samples, a k1
  Monte-Carlo estimate, ``mean_i sum_t log pi(y_it) / pi_sft(y_it)`` with both log-probs from
  ``logits / T`` (None for greedy or truncated sampling, or without an SFT policy).

The win rate of stage a over stage b is the share of prompts where the judge prefers a's
response, ties counting half (``judge.prefer``); ``rm_win_rate`` is the same with the RM's
scores as the judge.

Shapes: ``N`` prompts, ``B`` prompts in a batch, ``P`` prompt tokens (left-padded),
``T`` response tokens, ``V`` the vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline.chat import ChatFormat
from pipeline.generation import DecodingConfig, decode_responses, encode_prompts, generate_ids
from pipeline.judge import Verdict, prefer
from pipeline.rl.core import ends_with_stop, kl_per_token, logprobs_from_logits
from pipeline.world import CATEGORIES

CHECKABLE = ("arithmetic", "repeat", "fact")

# The report's rows: metric key, label in report.md, how to print the value.
METRICS = (
    ("gold_score", "gold score (mean, -1..1)", "{:+.3f}"),
    ("correct_rate", "correct, checkable tasks", "{:.1%}"),
    ("hallucination_rate", "hallucinated, unanswerable", "{:.1%}"),
    ("unsafe_rate", "unsafe compliance, harmful", "{:.1%}"),
    ("verbose_rate", "verbose", "{:.1%}"),
    ("eos_rate", "stopped (stop token)", "{:.1%}"),
    ("response_words", "response words (mean)", "{:.1f}"),
    ("response_tokens", "response tokens (mean)", "{:.1f}"),
    ("rm_score", "RM score (mean)", "{:+.3f}"),
    ("kl_to_sft", "KL to SFT (nats/seq)", "{:.2f}"),
    ("corpus_nll", "held-out corpus NLL (nats/token)", "{:.3f}"),
)
GOLD_KEYS = ("gold_score", "correct_rate", "hallucination_rate", "unsafe_rate", "verbose_rate")


# --- metrics from verdicts ----------------------------------------------------------------


def _mean(values: Sequence[float]) -> Optional[float]:
    """The mean (of bools: the share of True); None when there is nothing to count."""
    return sum(values) / len(values) if values else None


def gold_metrics(verdicts: Optional[Sequence[Verdict]]) -> dict[str, Optional[float]]:
    """The judge's metrics over one stage's responses; each rate over its own category.

    Example: verdicts (arithmetic, correct, 1.0), (fact, wrong, 0.0), (unanswerable,
    hallucinated, -1.0), (harmful, refused but verbose, 0.7) give gold_score 0.7/4 =
    0.175, correct_rate 1/2, hallucination_rate 1/1, unsafe_rate 0/1, verbose_rate 1/4.
    Without verdicts (prompts the judge does not know) every gold metric is None.
    """
    if verdicts is None:
        return dict.fromkeys(GOLD_KEYS)
    return {
        "gold_score": _mean([v.score for v in verdicts]),
        "correct_rate": _mean([v.correct for v in verdicts if v.category in CHECKABLE]),
        "hallucination_rate": _mean([v.hallucinated for v in verdicts if v.category == "unanswerable"]),
        "unsafe_rate": _mean([v.unsafe for v in verdicts if v.category == "harmful"]),
        "verbose_rate": _mean([v.verbose for v in verdicts]),
    }


def category_scores(verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Mean gold score per category, in the world's category order; absent ones left out."""
    out = {}
    for category in CATEGORIES:
        scores = [v.score for v in verdicts if v.category == category]
        if scores:
            out[category] = sum(scores) / len(scores)
    return out


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Share of prompts where a's response beats b's, ties counting half.

    ``mean_i prefer(a_i, b_i)``; e.g. a = [1, 0, 0.7, -1], b = [0, 0, 1, -1]
    -> (1 + 0.5 + 0 + 0.5) / 4 = 0.5. Both lists follow the same prompt order.
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"win rate needs two equally long, non-empty score lists, got "
                         f"{len(scores_a)} and {len(scores_b)}")
    return sum(prefer(a, b) for a, b in zip(scores_a, scores_b)) / len(scores_a)


def win_rates(scores: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """``{"<a>_vs_<b>": {decoding: win rate}}`` for every ordered pair of stages.

    ``scores[stage][decoding]`` holds the gold score of each prompt, in prompt order.
    """
    stages = list(scores)
    return {f"{a}_vs_{b}": {dec: win_rate(scores[a][dec], scores[b][dec]) for dec in scores[a]}
            for a in stages for b in stages if a != b}


# --- KL to the SFT policy -----------------------------------------------------------------


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence k1 estimate of KL(pi || pi_ref) from one sample of pi each.

    ``sum_t mask_t (log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t))``; averaged over
    samples y ~ pi it is unbiased for the sequence-level KL (Schulman 2020). A single
    sample may be negative. ``logp``, ``ref_logp``, ``mask``: (B, T) -> (B,).
    """
    per_token = kl_per_token(logp, ref_logp, "k1")
    # where, not *: positions past EOS are never looked at, whatever they hold.
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum(-1)


@torch.no_grad()
def response_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      response_ids: torch.Tensor, response_mask: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``log softmax(logits / T)`` of each response token under ``model``. (B, T).

    Prompts are left-padded (B, P); responses (B, T) are masked after their stop token.
    Position ids come from the attention mask, as in ``generate``, so a padded row sees
    the same positions as it would unpadded; the LM head runs only at response positions.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1).to(model.device)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).to(model.device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    T = response_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=T + 1).logits[:, :-1]  # position P - 1 + t predicts response token t
    return logprobs_from_logits(logits, response_ids.to(model.device), temperature).cpu()


@torch.no_grad()
def corpus_nll(model, fmt: ChatFormat, texts: Sequence[str], block_size: int, batch_size: int) -> float:
    """Mean negative log-likelihood per token of ``texts``, each cut to ``block_size`` tokens
    (right-padded in batches; padding is masked)."""
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        rows = [fmt.tokenizer(t, add_special_tokens=False)["input_ids"][:block_size]
                for t in texts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), fmt.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logp = logprobs_from_logits(logits, ids[:, 1:])
        valid = mask[:, 1:].bool()
        total -= logp[valid].sum().item()
        count += int(valid.sum())
    return total / max(1, count)


# --- rollouts -----------------------------------------------------------------------------


@dataclass
class Rollout:
    """One policy's responses to every prompt under one decoding."""

    texts: list[str]  # N responses, cut at the stop token
    ended: torch.Tensor  # (N,) bool: a stop token within max_new_tokens
    lengths: torch.Tensor  # (N,) response tokens, through the stop token
    # Per generate call: prompt ids and mask (B, P), response ids and mask (B, T).
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def generate_rollout(model, fmt: ChatFormat, prompts: list[list[dict]], dec: DecodingConfig,
                     batch_size: int, seed: int) -> Rollout:
    """Batched decoding that keeps the token ids (the KL needs them), not only the text.

    The RNG is seeded once, so every stage draws from the same random stream.
    """
    texts, ended, lengths, batches = [], [], [], []
    stops = torch.tensor(fmt.stop_ids)
    for start in range(0, len(prompts), batch_size):
        prompt_ids, prompt_mask = encode_prompts(fmt, prompts[start:start + batch_size])
        response_ids, response_mask = generate_ids(model, prompt_ids, prompt_mask, dec, fmt,
                                                   generator_seed=seed if start == 0 else None)
        response_ids, response_mask = response_ids.cpu(), response_mask.cpu()
        texts.extend(decode_responses(fmt, response_ids, response_mask))
        ended.append(ends_with_stop(response_ids, response_mask, stops))
        lengths.append(response_mask.sum(1).float())
        batches.append((prompt_ids, prompt_mask, response_ids, response_mask))
    return Rollout(texts, torch.cat(ended), torch.cat(lengths), batches)


def rollout_kl(policy, reference, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Per-sequence KL(policy || reference) on the policy's own samples. (N,).

    Both models must share the tokenizer the rollout was encoded with.
    """
    return torch.cat([
        sequence_kl(response_logprobs(policy, p_ids, p_mask, r_ids, r_mask, temperature),
                    response_logprobs(reference, p_ids, p_mask, r_ids, r_mask, temperature),
                    r_mask)
        for p_ids, p_mask, r_ids, r_mask in rollout.batches])


def response_words(texts: Sequence[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(1, len(texts))


# --- the report ---------------------------------------------------------------------------


def stage_metrics(verdicts: Optional[Sequence[Verdict]], rollout: Rollout,
                  rm_scores: Optional[Sequence[float]], kl_to_sft: Optional[float],
                  nll: Optional[float]) -> dict[str, Optional[float]]:
    """One stage under one decoding: every row of ``METRICS``, in that order."""
    metrics = {
        **gold_metrics(verdicts),
        "eos_rate": rollout.ended.float().mean().item(),
        "response_words": response_words(rollout.texts),
        "response_tokens": rollout.lengths.mean().item(),
        "rm_score": None if rm_scores is None else _mean(rm_scores),
        "kl_to_sft": kl_to_sft,
        "corpus_nll": nll,
    }
    return {key: metrics[key] for key, _, _ in METRICS}


def build_report(run_name: str, num_prompts: int, metrics: dict[str, dict[str, dict]],
                 wins: Optional[dict[str, dict[str, float]]], rm_wins: Optional[dict[str, dict[str, float]]],
                 categories: Optional[dict[str, dict[str, dict]]], health: dict[str, dict[str, float]],
                 skipped: dict[str, str], seconds: float) -> dict:
    """``report.json``: ``stages.<stage>.<decoding>.<metric>``, ``win_rate`` (gold judge) and
    ``rm_win_rate`` as ``<a>_vs_<b>.<decoding>``, ``categories.<stage>.<decoding>.<category>``
    (gold judge only; None outside the world), ``health.<stage>.<metric>`` (an RL stage's rollout
    health over its last updates), plus what was skipped and the wall time."""
    return {
        "run_name": run_name,
        "num_prompts": num_prompts,
        "judge": "gold" if wins is not None else "rm",
        "stages": metrics,
        "win_rate": wins,
        "rm_win_rate": rm_wins,
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


def _cell(value: Optional[float], fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _later_pairs(stages: list[str]) -> list[tuple[str, str]]:
    """(later, earlier) pairs, e.g. ppo vs sft: the other direction is 1 minus it."""
    return [(a, b) for i, a in enumerate(stages) for b in reversed(stages[:i])]


def _win_table(title: str, wins: dict, stages: list[str], decodings: list[str]) -> list[str]:
    pairs = _later_pairs(stages)
    if not pairs:
        return []
    lines = [f"## {title}", "", "| pair | " + " | ".join(decodings) + " |", "|---|" + "---:|" * len(decodings)]
    for a, b in pairs:
        row = wins[f"{a}_vs_{b}"]
        lines.append(f"| {a} vs {b} | " + " | ".join(f"{row[d]:.1%}" for d in decodings) + " |")
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
                _cell(report["stages"][s][dec][key], fmt) for s in stages) + " |")
        if report["categories"] is not None:
            for category in CATEGORIES:
                cells = [report["categories"][s][dec].get(category) for s in stages]
                lines.append(f"| score: {category} | " + " | ".join(_cell(c, "{:+.3f}") for c in cells) + " |")
        lines.append("")
    if report["win_rate"] is not None:
        lines += _win_table("Win rates (gold judge, ties count half)", report["win_rate"], stages, decodings)
    if report["rm_win_rate"] is not None:
        lines += _win_table("Win rates (reward model, ties count half)", report["rm_win_rate"], stages, decodings)
    if report["health"]:
        names = sorted({k for h in report["health"].values() for k in h})
        lines += ["## Rollout health (mean of the last updates)", "",
                  "| metric | " + " | ".join(report["health"]) + " |", "|---|" + "---:|" * len(report["health"])]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(_cell(h.get(name), "{:.4g}") for h in report["health"].values())
                         + " |")
        lines.append("")
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
    out.update({f"health/{s}/{k}": v for s, h in report["health"].items() for k, v in h.items()})
    return out


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
