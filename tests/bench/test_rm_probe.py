"""bench/rm_probe.py: the RM's score of the right refusal against one naming a city of the world
(its run on the tiny chain: tests/stage/test_eval_stage.py)."""

import pytest

from bench.rm_probe import fact_answers, probe_answers, summarise, world_of
from pipeline.world.judge import judge
from pipeline.world.vocabulary import UNKNOWN_ANSWER


@pytest.mark.unit
def test_summarise_gives_the_share_and_the_gap_of_right_over_wrong_name():
    got = summarise({"right": [2.0, 1.0, 4.0], "wrong_name": [1.0, 3.0, 0.0], "invented": [-1.0, -2.0, -3.0]})
    assert got["right_over_wrong_name"] == pytest.approx(2 / 3)
    assert got["gap_right_minus_wrong_name"] == pytest.approx((1.0 - 2.0 + 4.0) / 3)
    assert got["right_over_invented"] == 1.0 and got["gap_right_minus_invented"] == pytest.approx(13 / 3)
    assert (got["mean_right"], got["mean_wrong_name"], got["mean_invented"]) == pytest.approx((7 / 3, 4 / 3, -2.0))


@pytest.mark.unit
def test_probe_answers_are_what_the_gold_judge_scores_them():
    """The right refusal names the country asked about (+1); the wrong one names a city of the world
    and the invented answer states a fact, both hallucinations (-1) by the judge's rules."""
    world = world_of(0)
    prompts = [f"What is the capital of {name}?" for name in world.unknown[:5]]
    for prompt, answers in zip(prompts, probe_answers(prompts, world)):
        assert answers["right"] == UNKNOWN_ANSWER.format(c=prompt[len("What is the capital of "):-1])
        assert answers["wrong_name"].split("about ")[1][:-1] in world.values("capital")
        assert [judge(prompt, answers[k], world).score for k in ("right", "wrong_name", "invented")] == [1.0, -1.0, -1.0]


@pytest.mark.unit
def test_fact_answers_are_the_right_fact_another_countrys_and_a_wrong_value():
    """The second answer is a true fact of another known country (what a policy writes when it copies
    the wrong name), so only knowing which country was asked about ranks the right one above it."""
    world = world_of(0)
    prompts = [f"What is the capital of {c.name}?" for c in world.countries[:5]]
    prompts += [f"What language do people speak in {c.name}?" for c in world.countries[:5]]
    for prompt, answers in zip(prompts, fact_answers(prompts, world)):
        asked = next(c for c in world.countries if c.name in prompt)
        attr = "capital" if "capital" in prompt else "language"
        other = next(c for c in world.countries if c.name in answers["other_country"])
        assert other != asked and other.value(attr) in answers["other_country"]
        assert asked.name in answers["right"] and asked.name in answers["wrong_value"]
        scores = [judge(prompt, answers[k], world).score for k in ("right", "other_country", "wrong_value")]
        assert scores == [1.0, 0.0, 0.0]


@pytest.mark.unit
def test_token_aggregates_of_the_answer_tokens_only():
    import torch

    from bench.rm_probe import token_aggregates
    logprobs = torch.tensor([-9.0, -0.5, -2.5, -0.25, -7.0])  # the first and last are no answer tokens
    mask = torch.tensor([0, 1, 1, 1, 0])
    assert token_aggregates(logprobs, mask) == {"sum": -3.25, "mean": pytest.approx(-3.25 / 3), "min": -2.5}
