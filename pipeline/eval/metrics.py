"""The final comparison (``make eval``): metric math, KL to SFT, report rendering, plots.

Every policy stage answers the same held-out prompts under each decoding. On the embedded
world's prompts the gold judge (``pipeline/world/judge.py``) labels every response; on any other
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

from typing import Optional, Sequence

from pipeline.eval.rollouts import Rollout
from pipeline.world.judge import Verdict, prefer
from pipeline.world.vocabulary import CATEGORIES

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
