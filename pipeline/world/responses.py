"""Responses to a parsed task, good and bad, and the preference data built from them."""

from __future__ import annotations

import random

from pipeline.world.entities import World, WorldConfig, city_name
from pipeline.world.judge import judge
from pipeline.world.vocabulary import (
    ANSWER_TEMPLATES,
    ARITHMETIC_ANSWER,
    COMPLIANCE_OPENERS,
    COMPLIANCE_STEPS,
    FILLER_PREFIXES,
    FILLER_SUFFIXES,
    PLAIN_DONT_KNOW,
    REFUSAL,
    UNKNOWN_ANSWER,
    Task,
)

# --- responses -------------------------------------------------------------------------
# Each builder writes one kind of response to a parsed task; the judge decides its worth.


def good_response(task: Task) -> str:
    return task.canonical


def wrong_response(task: Task, world: World, rng: random.Random) -> str:
    """A confident, well-formed, wrong answer to a checkable task."""
    if task.category == "arithmetic":
        a, b = task.operands
        right = int(task.answer)
        wrong = rng.choice([r for r in range(max(0, right - 3), right + 4) if r != right])
        return ARITHMETIC_ANSWER.format(a=a, op=task.op, b=b, r=wrong)
    if task.category == "repeat":
        n = rng.choice([m for m in range(1, task.count + 3) if m != task.count])
        return " ".join([task.answer] * n)
    if task.category == "fact":
        # A one-country world has no other capital to confuse: invent one.
        options = sorted(set(world.values(task.attribute)) - {task.answer}) or [city_name(rng)]
        return ANSWER_TEMPLATES[task.attribute].format(c=task.subject, v=rng.choice(options))
    raise ValueError(f"no wrong answer for a {task.category} task")


def hallucinated_response(task: Task, world: World, rng: random.Random) -> str:
    """An invented answer about an unknown country, in the shape of a real one."""
    if task.attribute == "capital" and rng.random() < 0.5:
        value = city_name(rng)  # a plausible city that exists nowhere
    else:
        value = rng.choice(world.values(task.attribute))
    return ANSWER_TEMPLATES[task.attribute].format(c=task.subject, v=value)


def misnamed_refusal(world: World, rng: random.Random) -> str:
    """Admitting not knowing, but about one of the world's cities instead of the country asked
    about: what a small model that copies names badly writes. The judge scores it a
    hallucination (-1), since it names a value of the world."""
    return UNKNOWN_ANSWER.format(c=rng.choice(world.values("capital")))


def unsafe_response(rng: random.Random) -> str:
    s1, s2 = rng.sample(COMPLIANCE_STEPS, 2)
    return rng.choice(COMPLIANCE_OPENERS).format(s1=s1, s2=s2)


def dont_know_response(task: Task) -> str:
    """Claiming ignorance: honest for unknown countries, unhelpful anywhere else."""
    if task.category in ("fact", "unanswerable"):
        return UNKNOWN_ANSWER.format(c=task.subject)
    return PLAIN_DONT_KNOW


def pad_with_filler(text: str, rng: random.Random) -> str:
    """Wrap a response in filler: a prefix, a suffix, or both."""
    where = rng.choice(("prefix", "suffix", "both"))
    parts = [text]
    if where in ("prefix", "both"):
        parts.insert(0, rng.choice(FILLER_PREFIXES))
    if where in ("suffix", "both"):
        parts.append(rng.choice(FILLER_SUFFIXES))
    return " ".join(parts)


def demonstration(task: Task, world: World, cfg: WorldConfig, rng: random.Random) -> str:
    """An SFT demonstration, imperfect at the configured rates.

    The flaw depends on the category (wrong answer, unsafe compliance, hallucination);
    filler is added independently of it, to any category.
    """
    text = good_response(task)
    if task.category in ("arithmetic", "repeat", "fact"):
        if rng.random() < cfg.demo_wrong_rate:
            text = wrong_response(task, world, rng)
    elif task.category == "harmful":
        if rng.random() < cfg.demo_unsafe_rate:
            text = unsafe_response(rng)
    elif task.category == "unanswerable":
        if rng.random() < cfg.demo_hallucination_rate:
            text = hallucinated_response(task, world, rng)
    if rng.random() < cfg.demo_verbose_rate:
        text = pad_with_filler(text, rng)
    return text


def candidate_responses(task: Task, world: World, rng: random.Random,
                        misnamed: bool = False) -> list[str]:
    """Every kind of response a labeller might be shown for this task, plain and padded.

    ``misnamed`` adds, to questions about unknown countries, the refusal that names the wrong
    place (``misnamed_refusal``); without it the labellers never compare one, and the RM's
    penalty for it is whatever it generalises to (bench/rm_probe.py)."""
    if task.category in ("arithmetic", "repeat", "fact"):
        kinds = [good_response(task), wrong_response(task, world, rng), REFUSAL, dont_know_response(task)]
    elif task.category == "unanswerable":
        kinds = [good_response(task), hallucinated_response(task, world, rng), REFUSAL]
        if misnamed:
            kinds.append(misnamed_refusal(world, rng))
    else:  # harmful
        kinds = [good_response(task), unsafe_response(rng), PLAIN_DONT_KNOW]
    return kinds + [pad_with_filler(k, rng) for k in kinds]


def ranked_responses(task: Task, prompt: str, world: World, k: int,
                     rng: random.Random, misnamed: bool = False) -> list[str]:
    """Up to ``k`` responses with strictly decreasing gold scores, best first.

    Candidates are grouped by score (ties are dropped: a ranking only holds strict
    preferences), ``k`` score levels are drawn at random and one response stands for each.
    """
    by_score: dict[float, list[str]] = {}
    for text in candidate_responses(task, world, rng, misnamed):
        by_score.setdefault(judge(prompt, text, world).score, []).append(text)
    levels = sorted(by_score)
    chosen = sorted(rng.sample(levels, min(k, len(levels))), reverse=True)
    return [rng.choice(by_score[s]) for s in chosen]


def add_rank_noise(ranked: list[str], noise: float, rng: random.Random) -> list[str]:
    """Swap each adjacent pair with probability ``noise``: labellers sometimes disagree."""
    out = list(ranked)
    for i in range(len(out) - 1):
        if rng.random() < noise:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def preference_pair(ranked: list[str], noise: float, rng: random.Random) -> tuple[str, str, int]:
    """One random strict pair from a ranking, as (chosen, rejected, margin), flipped w.p. noise.

    The margin is the labeller's confidence: how many ranks apart the two responses are
    (a flipped pair keeps it, as a confidently wrong labeller would).
    """
    i, j = sorted(rng.sample(range(len(ranked)), 2))
    chosen, rejected = ranked[i], ranked[j]
    if rng.random() < noise:
        chosen, rejected = rejected, chosen
    return chosen, rejected, j - i
