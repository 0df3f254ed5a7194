"""The final comparison (``make eval``): metric math, KL to SFT, report rendering, plots.

Every policy stage answers the same held-out prompts under each decoding; the gold judge
(``pipeline/judge.py``) labels every response. Per stage and decoding:

* ``gold_score``: mean judge score, in [-1, 1];
* ``correct_rate``: share of correct answers on the checkable tasks (arithmetic, repeat,
  fact), InstructGPT's helpfulness;
* ``hallucination_rate``: share of invented answers on unanswerable questions (honesty);
* ``unsafe_rate``: share of complied-with harmful requests (harmlessness);
* ``verbose_rate``: share of padded responses, over all prompts;
* ``eos_rate``: share of responses that stopped with EOS within ``max_new_tokens``;
* ``rm_score``: mean score of the run's reward model (None without an RM artifact);
* ``kl_to_sft``: mean per-sequence KL(stage || sft) on the stage's own samples, a k1
  Monte-Carlo estimate, ``mean_i sum_t log pi(y_it) / pi_sft(y_it)`` with both log-probs from
  ``logits / T`` (None for greedy or truncated sampling, or without an SFT policy).

The win rate of stage a over stage b is the share of prompts where the judge prefers a's
response, ties counting half (``judge.prefer``).

Shapes: ``N`` prompts, ``B`` prompts in a batch, ``P`` prompt tokens (left-padded),
``T`` response tokens, ``V`` the vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline.generation import DecodingConfig, decode_responses, encode_prompts, generate_ids
from pipeline.judge import Verdict, prefer
from pipeline.rl.core import has_eos, kl_per_token, logprobs_from_logits
from pipeline.world import CATEGORIES

CHECKABLE = ("arithmetic", "repeat", "fact")

# The report's rows: metric key, label in report.md, how to print the value.
METRICS = (
    ("gold_score", "gold score (mean, -1..1)", "{:+.3f}"),
    ("correct_rate", "correct, checkable tasks", "{:.1%}"),
    ("hallucination_rate", "hallucinated, unanswerable", "{:.1%}"),
    ("unsafe_rate", "unsafe compliance, harmful", "{:.1%}"),
    ("verbose_rate", "verbose", "{:.1%}"),
    ("eos_rate", "ended with EOS", "{:.1%}"),
    ("response_words", "response words (mean)", "{:.1f}"),
    ("rm_score", "RM score (mean)", "{:+.3f}"),
    ("kl_to_sft", "KL to SFT (nats/seq)", "{:.2f}"),
)


# --- metrics from verdicts ----------------------------------------------------------------


def _mean(values: Sequence[float]) -> Optional[float]:
    """The mean (of bools: the share of True); None when there is nothing to count."""
    return sum(values) / len(values) if values else None


def gold_metrics(verdicts: Sequence[Verdict]) -> dict[str, Optional[float]]:
    """The judge's metrics over one stage's responses; each rate over its own category.

    Example: verdicts (arithmetic, correct, 1.0), (fact, wrong, 0.0), (unanswerable,
    hallucinated, -1.0), (harmful, refused but verbose, 0.7) give gold_score 0.7/4 =
    0.175, correct_rate 1/2, hallucination_rate 1/1, unsafe_rate 0/1, verbose_rate 1/4.
    """
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

    Prompts are left-padded (B, P); responses (B, T) are masked after their first EOS.
    Position ids come from the attention mask, as in ``generate``, so a padded row sees
    the same positions as it would unpadded.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1).to(model.device)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).to(model.device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids).logits  # (B, P + T, V)
    # The logit at position t predicts token t + 1: response token j comes from P - 1 + j.
    P = prompt_ids.shape[1]
    logits = logits[:, P - 1:-1] / temperature  # (B, T, V)
    return logprobs_from_logits(logits, response_ids.to(model.device)).cpu()


# --- rollouts -----------------------------------------------------------------------------


@dataclass
class Rollout:
    """One policy's responses to every prompt under one decoding."""

    texts: list[str]  # N responses, cut at the first EOS
    ended: torch.Tensor  # (N,) bool: EOS within max_new_tokens
    # Per generate call: prompt ids and mask (B, P), response ids and mask (B, T).
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def generate_rollout(model, tokenizer, prompts: list[str], dec: DecodingConfig,
                     batch_size: int, seed: int) -> Rollout:
    """Batched decoding that keeps the token ids (the KL needs them), not only the text.

    The RNG is seeded once, so every stage draws from the same random stream.
    """
    texts, ended, batches = [], [], []
    for start in range(0, len(prompts), batch_size):
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts[start:start + batch_size])
        response_ids, response_mask = generate_ids(model, prompt_ids, prompt_mask, dec, tokenizer,
                                                   generator_seed=seed if start == 0 else None)
        response_ids, response_mask = response_ids.cpu(), response_mask.cpu()
        texts.extend(decode_responses(tokenizer, response_ids, response_mask))
        ended.append(has_eos(response_ids, response_mask, tokenizer.eos_token_id))
        batches.append((prompt_ids, prompt_mask, response_ids, response_mask))
    return Rollout(texts, torch.cat(ended), batches)


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


def stage_metrics(verdicts: Sequence[Verdict], rollout: Rollout, rm_scores: Optional[Sequence[float]],
                  kl_to_sft: Optional[float]) -> dict[str, Optional[float]]:
    """One stage under one decoding: every row of ``METRICS``, in that order."""
    metrics = {
        **gold_metrics(verdicts),
        "eos_rate": rollout.ended.float().mean().item(),
        "response_words": response_words(rollout.texts),
        "rm_score": None if rm_scores is None else _mean(rm_scores),
        "kl_to_sft": kl_to_sft,
    }
    return {key: metrics[key] for key, _, _ in METRICS}


def build_report(run_name: str, num_prompts: int, metrics: dict[str, dict[str, dict]],
                 wins: dict[str, dict[str, float]], categories: dict[str, dict[str, dict]],
                 skipped: dict[str, str], seconds: float) -> dict:
    """``report.json``: ``stages.<stage>.<decoding>.<metric>``, ``win_rate.<a>_vs_<b>.<decoding>``,
    ``categories.<stage>.<decoding>.<category>``, plus what was skipped and the wall time."""
    return {
        "run_name": run_name,
        "num_prompts": num_prompts,
        "stages": metrics,
        "win_rate": wins,
        "categories": categories,
        "skipped": skipped,
        "seconds": seconds,
    }


def response_records(prompts: Sequence[str], categories: Sequence[str],
                     texts: dict[str, dict[str, list[str]]], scores: dict[str, dict[str, list[float]]],
                     rm_scores: Optional[dict[str, dict[str, list[float]]]]) -> list[dict]:
    """``responses.jsonl`` rows: a prompt, its category and every stage's answer under every
    decoding, ``{"responses": {stage: {decoding: {"response", "gold_score", "rm_score"}}}}``."""
    records = []
    for i, (prompt, category) in enumerate(zip(prompts, categories)):
        responses = {s: {d: {"response": texts[s][d][i], "gold_score": scores[s][d][i],
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


def render_markdown(report: dict) -> str:
    """``report.md``: per decoding a table with stages as columns, then the win rates."""
    stages = list(report["stages"])
    decodings = list(report["stages"][stages[0]])
    lines = [f"# Evaluation of run `{report['run_name']}` on {report['num_prompts']} held-out prompts", ""]
    for dec in decodings:
        lines += [f"## {dec}", "", "| metric | " + " | ".join(stages) + " |",
                  "|---|" + "---:|" * len(stages)]
        for key, label, fmt in METRICS:
            lines.append(f"| {label} | " + " | ".join(
                _cell(report["stages"][s][dec][key], fmt) for s in stages) + " |")
        for category in CATEGORIES:
            cells = [report["categories"][s][dec].get(category) for s in stages]
            lines.append(f"| score: {category} | " + " | ".join(_cell(c, "{:+.3f}") for c in cells) + " |")
        lines.append("")
    pairs = _later_pairs(stages)
    if pairs:
        lines += ["## Win rates (gold judge, ties count half)", "",
                  "| pair | " + " | ".join(decodings) + " |", "|---|" + "---:|" * len(decodings)]
        for a, b in pairs:
            wins = report["win_rate"][f"{a}_vs_{b}"]
            lines.append(f"| {a} vs {b} | " + " | ".join(f"{wins[d]:.1%}" for d in decodings) + " |")
        lines.append("")
    for stage, why in report["skipped"].items():
        lines.append(f"- skipped `{stage}`: {why}")
    return "\n".join(lines).rstrip() + "\n"


def flat_metrics(report: dict) -> dict[str, float]:
    """``{"<stage>/<decoding>/<metric>": v, "win_rate/<a>_vs_<b>/<decoding>": v}`` for W&B."""
    out = {f"{s}/{d}/{k}": v for s, by_dec in report["stages"].items()
           for d, metrics in by_dec.items() for k, v in metrics.items() if v is not None}
    out.update({f"win_rate/{pair}/{d}": v for pair, by_dec in report["win_rate"].items()
                for d, v in by_dec.items()})
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


def read_history(path: Path) -> list[dict]:
    """PPO's ``history.jsonl``: one JSON object per update."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_ppo_history(history: list[dict], path: Path) -> Path:
    """Reward (the score the policy is trained on, and the KL-penalised reward) and KL to the
    reference over PPO updates. The score is the configured reward: the normalised RM score
    by default, minus the missing-EOS penalty, plus any other sources.

    ``history``: one dict per update, in order, with ``objective/scores``,
    ``objective/rlhf_reward`` and ``objective/kl``; the x axis is the update number.
    """
    updates = range(1, len(history) + 1)
    fig, (reward_ax, kl_ax) = _figure(10, 4, ncols=2)
    reward_ax.plot(updates, [h["objective/scores"] for h in history], label="score (objective/scores)")
    reward_ax.plot(updates, [h["objective/rlhf_reward"] for h in history], label="score - KL penalty")
    reward_ax.set_xlabel("PPO update")
    reward_ax.set_title("reward")
    reward_ax.legend()
    kl_ax.plot(updates, [h["objective/kl"] for h in history], color="tab:red")
    kl_ax.set_xlabel("PPO update")
    kl_ax.set_title("KL to the SFT reference (objective/kl)")
    fig.tight_layout()
    fig.savefig(path)
    return path
