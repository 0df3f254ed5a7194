import pytest

from pipeline.generation.samples import Sample
from pipeline.training.policy_pairs import best_and_worst, pick_pairs

pytestmark = pytest.mark.unit


def test_best_and_worst_skips_unusable_samples():
    # sample 2 scored lowest but did not stop: neither chosen nor rejected
    assert best_and_worst([0.2, 1.5, -0.7, 0.9], [True, True, False, True]) == (1, 0)
    assert best_and_worst([0.2, 1.5, -0.7, 0.9], [True] * 4) == (1, 2)


def test_best_and_worst_needs_two_usable_samples_and_a_preference():
    assert best_and_worst([0.3, 0.1], [True, False]) is None
    assert best_and_worst([0.5, 0.5, 0.5], [True, True, True]) is None  # the RM ranks none apart
    assert best_and_worst([0.5, 0.9, 0.9, 0.1], [True] * 4) == (1, 3)  # a tie for best: the earlier


def _sample(text, ok=True):
    return Sample("p", text, ok, ok)


def test_pick_pairs_one_pair_a_prompt_with_the_rm_margin():
    prompts = [[{"role": "user", "content": "a?"}], [{"role": "user", "content": "b?"}]]
    samples = [_sample("x"), _sample("y"), _sample("z", ok=False),   # prompt a
               _sample("same"), _sample("same"), _sample("w", ok=False)]  # prompt b: the two usable are equal
    scores = [1.0, -0.5, -3.0, 2.0, 0.0, 1.0]
    pairs = pick_pairs(prompts, samples, scores, k=3)
    assert pairs == [{"prompt": prompts[0], "chosen": [{"role": "assistant", "content": "x"}],
                      "rejected": [{"role": "assistant", "content": "y"}], "margin": 1.5}]


def test_pick_pairs_refuses_misaligned_lists():
    with pytest.raises(ValueError, match="2 prompts x k=3 need 6"):
        pick_pairs([[], []], [_sample("x")] * 5, [0.0] * 5, k=3)


def test_pick_pairs_reads_each_prompts_own_samples_and_scores():
    prompts = [[{"role": "user", "content": q}] for q in ("a?", "b?", "c?")]
    samples = [_sample(t) for t in ("a1", "a2", "b1", "b2", "c1", "c2")]
    scores = [0.0, 1.0, 5.0, -5.0, 2.0, 2.5]
    pairs = pick_pairs(prompts, samples, scores, k=2)
    assert [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"], p["margin"])
            for p in pairs] == [("a?", "a2", "a1", 1.0), ("b?", "b1", "b2", 10.0), ("c?", "c2", "c1", 0.5)]
