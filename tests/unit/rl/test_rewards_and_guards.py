import math

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.rl.rewards import build_reward_fn, normalise
from pipeline.training.hf import NonFiniteLossGuard, mean_train_loss

pytestmark = pytest.mark.unit

RM_STATS = {"reward_mean": 1.0, "reward_std": 2.0}


def length_reward(prompts, responses):
    return [float(len(r.split())) for r in responses]


def reward_cfg(sources, normalize=True):
    return OmegaConf.create({"normalize": normalize, "sources": sources})


def test_rm_source_is_normalised_with_the_rm_statistics():
    fn = build_reward_fn(reward_cfg({"rm": {"weight": 1.0}}), RM_STATS)
    # (3 - 1) / 2 = 1 and (-1 - 1) / 2 = -1
    assert fn(["p", "p"], ["a", "b"], torch.tensor([3.0, -1.0])).tolist() == [1.0, -1.0]
    raw = build_reward_fn(reward_cfg({"rm": {"weight": 1.0}}, normalize=False), RM_STATS)
    assert raw(["p"], ["a"], torch.tensor([3.0])).tolist() == [3.0]


def test_callable_sources_combine_as_a_weighted_sum():
    sources = {"rm": {"weight": 0.5},
               "length": {"_target_": "tests.unit.rl.test_rewards_and_guards.length_reward", "weight": 2.0}}
    fn = build_reward_fn(reward_cfg(sources), RM_STATS)
    # 0.5 * (3 - 1) / 2 + 2.0 * 3 words = 6.5
    assert fn(["p"], ["one two three"], torch.tensor([3.0])).tolist() == [6.5]


def test_interpolations_in_a_source_resolve_against_the_whole_config():
    # e.g. a source's seed or weight taken from another group: `${world.seed}`
    cfg = OmegaConf.create({"w": 2.0, "reward": {"normalize": True, "sources": {
        "length": {"_target_": "tests.unit.rl.test_rewards_and_guards.length_reward", "weight": "${w}"}}}})
    assert build_reward_fn(cfg.reward, RM_STATS)(["p"], ["one two three"], torch.zeros(1)).tolist() == [6.0]


def test_a_class_target_is_instantiated_with_its_keys():
    sources = {"gold": {"_target_": "pipeline.world.reward.GoldJudgeReward", "weight": 1.0,
                        "seed": 0, "n_entities": 40, "n_unknown": 40}}
    fn = build_reward_fn(reward_cfg(sources), RM_STATS)
    harmful = "How do I poison a river?"
    refuse, comply = fn([harmful] * 2, ["I can't help with that.", "Sure. First, you wait until dark."],
                        torch.zeros(2)).tolist()
    assert refuse == 1.0 and comply == -1.0


def test_bad_reward_configs_are_refused():
    with pytest.raises(ValueError, match="empty"):
        build_reward_fn(reward_cfg({}), RM_STATS)
    with pytest.raises(ValueError, match="takes only `weight`"):
        build_reward_fn(reward_cfg({"rm": {"weight": 1.0, "scale": 2}}), RM_STATS)


def wrong_length_reward(prompts, responses):
    return [1.0]


def test_reward_sources_with_the_wrong_shape_or_no_weight_are_named():
    from pipeline.core.errors import ConfigError
    with pytest.raises(ConfigError, match=r"reward.sources.rm needs a numeric `weight`"):
        build_reward_fn(reward_cfg({"rm": {}}), RM_STATS)
    bad = {"short": {"_target_": "tests.unit.rl.test_rewards_and_guards.wrong_length_reward", "weight": 1.0}}
    fn = build_reward_fn(reward_cfg(bad), RM_STATS)
    with pytest.raises(ConfigError, match=r"reward.sources.short returned shape \(1,\) for 2 responses"):
        fn(["p", "q"], ["a", "b"], torch.zeros(2))


def test_normalise_worked_example():
    assert normalise(torch.tensor([5.0]), 1.0, 2.0).item() == 2.0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_stops_training_with_the_fix(bad):
    class State:
        global_step = 7
    with pytest.raises(FloatingPointError, match=r"loss became .* at step 7; nothing was saved.*learning_rate"):
        NonFiniteLossGuard().on_log(None, State(), None, logs={"loss": bad})
    NonFiniteLossGuard().on_log(None, State(), None, logs={"loss": 0.5})  # finite: no error


def test_mean_train_loss_weights_each_log_by_the_steps_it_covers():
    # logs at steps 4, 6 (a checkpoint), 8: means over 4, 2 and 2 steps
    history = [{"loss": 2.0, "step": 4}, {"loss": 1.0, "step": 6}, {"eval_loss": 9.0, "step": 6},
               {"loss": 0.5, "step": 8}]
    assert mean_train_loss(history, run_mean=7.0) == pytest.approx((2.0 * 4 + 1.0 * 2 + 0.5 * 2) / 8)
    assert mean_train_loss([{"eval_loss": 1.0, "step": 3}], run_mean=7.0) == 7.0  # nothing logged


def test_every_checkpoint_step_is_also_a_log_step():
    from transformers import TrainerControl

    from pipeline.training.resume import MarkComplete
    control = TrainerControl(should_save=True)
    assert MarkComplete().on_step_end(None, None, control).should_log
    control = TrainerControl(should_save=False)
    assert not MarkComplete().on_step_end(None, None, control).should_log


def test_sharpening_worked_example():
    from pipeline.rl.rewards import sharpening
    ref = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # 0.1 * (-1 - 2) = -0.3 and 0.1 * -0.5; per token: 0.1 * -3 / 2 and 0.1 * -0.5 / 1
    torch.testing.assert_close(sharpening(ref, mask, 0.1, per_token=False), torch.tensor([-0.3, -0.05]))
    torch.testing.assert_close(sharpening(ref, mask, 0.1, per_token=True), torch.tensor([-0.15, -0.05]))
    # padding never counts, whatever the padded positions hold
    torch.testing.assert_close(sharpening(ref + (1 - mask) * -9.0, mask, 0.1, False), torch.tensor([-0.3, -0.05]))


def test_sharpening_optimum_is_the_reference_raised_to_one_plus_alpha_over_beta():
    """The docstring's claim, checked numerically: over three answers with equal reward, the policy
    maximising E[alpha log pi_ref] - beta KL(pi || pi_ref) is pi_ref^(1 + alpha/beta), normalised."""
    from pipeline.rl.rewards import sharpening
    alpha, beta = 0.1, 0.2
    ref = torch.tensor([0.47, 0.33, 0.20])
    logits = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(3000):
        pi = logits.softmax(0)
        bonus = sharpening(ref.log()[:, None], torch.ones(3, 1), alpha, per_token=False)
        objective = (pi * bonus).sum() - beta * (pi * (pi.log() - ref.log())).sum()
        opt.zero_grad()
        (-objective).backward()
        opt.step()
    want = ref ** (1 + alpha / beta) / (ref ** (1 + alpha / beta)).sum()
    torch.testing.assert_close(logits.softmax(0).detach(), want, atol=1e-4, rtol=0)
    assert want[0] > ref[0]  # the likeliest answer gains: 0.47 -> 0.54
