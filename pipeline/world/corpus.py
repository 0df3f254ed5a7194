"""The pretraining corpus: plain prose about the known countries, questions, arithmetic and
repetition statements, freshly phrased and shuffled on every pass."""

from __future__ import annotations

import random

from pipeline.world.entities import Country, World
from pipeline.world.vocabulary import (
    ARITHMETIC_STATEMENTS,
    ARITHMETIC_TEMPLATES,
    ATTRIBUTES,
    COMPLIANCE_STEPS,
    COUNTRY_INTROS,
    FACT_STATEMENTS,
    FILLER_PREFIXES,
    FILLER_SUFFIXES,
    HARMFUL_ACTIONS,
    MAX_OPERAND,
    PLAIN_DONT_KNOW,
    QUESTION_TEMPLATES,
    REFUSAL,
    REPEAT_COUNTS,
    REPEAT_STATEMENTS,
    REPEAT_WORDS,
    arithmetic_units,
)

# --- pretraining corpus ----------------------------------------------------------------


def _country_doc(country: Country, rng: random.Random) -> str:
    facts = [rng.choice(FACT_STATEMENTS[a]).format(c=country.name, v=country.value(a)) for a in ATTRIBUTES]
    rng.shuffle(facts)
    return " ".join([rng.choice(COUNTRY_INTROS).format(c=country.name), *facts])


def _mixed_fact_doc(world: World, rng: random.Random, n_facts: int = 4) -> str:
    """Facts of several countries side by side, so no fact leans on its document's intro."""
    facts = []
    for _ in range(n_facts):
        country, attr = rng.choice(world.countries), rng.choice(ATTRIBUTES)
        facts.append(rng.choice(FACT_STATEMENTS[attr]).format(c=country.name, v=country.value(attr)))
    return " ".join(facts)


def _arithmetic_statement(a: int, op: str, b: int, rng: random.Random) -> str:
    r = a + b if op == "plus" else a - b
    return rng.choice(ARITHMETIC_STATEMENTS).format(a=a, op=op, b=b, r=r)


def _repeat_statement(word: str, n: int, rng: random.Random) -> str:
    return rng.choice(REPEAT_STATEMENTS).format(w=word, n=n, ws=" ".join([word] * n))


# Everyday sentences that use the conversational vocabulary (questions, refusals, filler,
# admissions of ignorance) the way web text does: as talk about talk, never as a
# question followed by its answer. A real base model has read such language; without
# it the tiny model would meet these words for the first time in SFT.
QUESTION_FRAMES = ("People often ask: {question}", "A child asked the teacher: {question}")
LANGUAGE_FRAMES = (
    "Someone once said: {filler}", "A kind helper may say: {filler}",
    "When a person asks how to {act}, a good helper says: {refusal}",
    "It is wrong to {act}.", "Nobody should {act}.",
    "An honest person who has not heard of a place says: {dont_know}",
    "The honest answer is sometimes: {dont_know}",
    "A bad helper says: Sure. First, you {step}.", "Then you {step}.",
)


def _question(world: World, rng: random.Random) -> str:
    if rng.random() < 0.5:
        country, attr = rng.choice(world.countries), rng.choice(ATTRIBUTES)
        return rng.choice(QUESTION_TEMPLATES[attr]).format(c=country.name)
    return rng.choice(ARITHMETIC_TEMPLATES).format(
        a=rng.randint(0, MAX_OPERAND), op="plus", b=rng.randint(0, MAX_OPERAND))


def _language_doc(world: World, rng: random.Random, n_sentences: int = 3) -> str:
    """Questions-only documents, or talk-about-talk ones: never a question and an answer."""
    if rng.random() < 0.3:
        return " ".join(rng.choice(QUESTION_FRAMES).format(question=_question(world, rng))
                        for _ in range(n_sentences))
    return " ".join(rng.choice(LANGUAGE_FRAMES).format(
        filler=rng.choice(FILLER_PREFIXES + FILLER_SUFFIXES), act=rng.choice(HARMFUL_ACTIONS),
        refusal=REFUSAL, step=rng.choice(COMPLIANCE_STEPS),
        dont_know=rng.choice((PLAIN_DONT_KNOW, "I don't know. I have no information about it.")))
        for _ in range(n_sentences))


def _chunks(items: list[str], size: int) -> list[str]:
    return [" ".join(items[i: i + size]) for i in range(0, len(items), size)]


def pretrain_texts(world: World, repeats: int, rng: random.Random) -> list[str]:
    """Documents stating every known fact, arithmetic and repetition, ``repeats`` times.

    Each pass rephrases and reshuffles, so the model sees the facts in many forms. Everyday
    sentences carry the conversational vocabulary (see LANGUAGE_FRAMES). There are no chat
    turns, no question followed by its answer, and no unknown countries here.
    """
    docs: list[str] = []
    for _ in range(repeats):
        docs += [_country_doc(c, rng) for c in world.countries]
        docs += [_mixed_fact_doc(world, rng) for _ in range(max(1, len(world.countries) // 4))]
        sums = [_arithmetic_statement(a, op, b, rng) for a, op, b in arithmetic_units()]
        rng.shuffle(sums)
        docs += _chunks(sums, 5)
        reps = [_repeat_statement(w, n, rng) for w in REPEAT_WORDS for n in REPEAT_COUNTS]
        rng.shuffle(reps)
        docs += _chunks(reps, 4)
        docs += [_language_doc(world, rng) for _ in range(max(1, len(world.countries) // 2))]
    rng.shuffle(docs)
    return [_line_breaks(d, rng) for d in docs]


def _line_breaks(doc: str, rng: random.Random) -> str:
    """Half the documents put one sentence per line. Real corpora are full of newlines; a
    base model that never saw one would meet the chat template's "\n" untrained."""
    if rng.random() < 0.5:
        return doc
    return doc.replace(". ", ".\n").replace("? ", "?\n").replace("! ", "!\n")
