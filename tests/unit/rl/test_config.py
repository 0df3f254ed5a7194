"""RL stage helpers: prompt batches across epochs and resumes, and config checks in every stage."""

import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.validation import check_ranges
from pipeline.rl.config import check_config
from stages.ppo import prompt_batch
from tests.conftest import compose_config

pytestmark = pytest.mark.unit


def test_every_prompt_is_seen_once_per_epoch_even_across_batch_boundaries():
    prompts = [f"p{i}" for i in range(10)]
    # 4 prompts per update: update 2 straddles epochs 0 and 1 (prompts 8..11).
    seen = [p for u in range(5) for p in prompt_batch(prompts, u, 4, 0, 1, seed=3)]
    assert sorted(seen[:10]) == prompts and sorted(seen[10:20]) == prompts
    assert seen[:10] != seen[10:20]  # each epoch has its own order


def test_processes_split_a_global_batch_and_updates_are_pure():
    prompts = [f"p{i}" for i in range(12)]
    ranks = [prompt_batch(prompts, 1, 3, r, 2, seed=0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3 and not set(ranks[0]) & set(ranks[1])
    assert prompt_batch(prompts, 1, 3, 0, 2, seed=0) == ranks[0]  # a resumed run sees the same batch


@pytest.mark.parametrize("override, key", [
    ("ppo.minibatch_size=48", "ppo.minibatch_size=48 must divide"),
    ("ppo.micro_batch_size=12", "ppo.micro_batch_size=12 must divide"),
    ("ppo.generation_batch_size=0", r"ppo.generation_batch_size=0 must be > 0"),
    ("ppo.learning_rate=-1e-4", r"ppo.learning_rate=-0.0001 must be > 0"),
    ("ppo.gamma=1.5", r"ppo.gamma=1.5 must be in \[0, 1\]"),
    ("checkpoint_every=0", "checkpoint_every=0 must be > 0"),
    ("ppo.kl.estimator=k2", "ppo.kl.estimator must be one of"),
    ("ppo.kl.controller=pid", "ppo.kl.controller must be one of"),
    ("ppo.value_init=random", "ppo.value_init must be one of"),
    ("ppo.old_logprobs=guess", "ppo.old_logprobs must be one of"),
    ("ppo.sampler=fast", "ppo.sampler must be one of"),
    ("algorithm=rloo algorithm.samples_per_prompt=1", "rloo compares a prompt's samples"),
    ("algorithm=reinforce_pp algorithm.group_baseline=true",
     "algorithm.group_baseline=true with algorithm.samples_per_prompt=1"),
    ("algorithm=grpo ppo.rollout_batch_size=30 ppo.minibatch_size=10 ppo.micro_batch_size=10",
     "must be a multiple of algorithm.samples_per_prompt=4"),
    ("algorithm.kl_in=loss", "algorithm.kl_in=loss needs a critic-free estimator"),
    ("algorithm.kl_in=none", "algorithm.kl_in=none needs a critic-free estimator"),
    ("algorithm=online_dpo algorithm.kl_in=reward", "algorithm.kl_in=reward with algorithm.advantage=dpo"),
    ("algorithm=online_dpo algorithm.samples_per_prompt=1", "dpo compares a prompt's samples"),
    ("algorithm=grpo algorithm.scale_by_std=global", "algorithm.scale_by_std must be one of .*batch .the update's std"),
    ("+health.thresholds.vibes=1", "unknown metric"),
    ("reward.min_accuracy=1.5", r"reward.min_accuracy=1.5 must be in \[0, 1\]"),
    ("reward.sharpen.coef=-0.1", r"reward.sharpen.coef=-0.1 must be >= 0"),
])
def test_unworkable_rl_settings_are_refused_by_name(override, key):
    check_config(compose_config("ppo"))  # the shipped defaults pass
    for algorithm in ("rloo", "grpo", "dr_grpo", "reinforce_pp", "online_dpo"):
        check_config(compose_config("ppo", [f"algorithm={algorithm}"]))
    with pytest.raises(ConfigError, match=key):
        check_config(compose_config("ppo", override.split()))


@pytest.mark.parametrize("stage, override, key", [
    ("sft", "train.learning_rate=-0.001", r"train.learning_rate=-0.001 must be > 0"),
    ("sft", "train.per_device_train_batch_size=0", "train.per_device_train_batch_size=0 must be > 0"),
    ("sft", "lora.dropout=1.0", r"lora.dropout=1.0 must be in \[0, 1\)"),
    ("rm", "train.max_steps=0", "train.max_steps=0 must be > 0"),
    ("rm", "train.max_length=-5", "train.max_length=-5 must be > 0"),
    ("dpo", "train.beta=0", "train.beta=0.0 must be > 0"),
    ("base", "train.batch_size=0", "train.batch_size=0 must be > 0"),
    ("datagen", "world.label_noise=2", r"world.label_noise=2.0 must be in \[0, 1\]"),
    ("eval", "max_prompts=0", "max_prompts=0 must be > 0"),
    ("ppo", "algorithm.entropy_coef=nan", "algorithm.entropy_coef=nan must be a finite number"),
    ("dpo", "train.entropy_coef=inf", "train.entropy_coef=inf must be a finite number"),
])
def test_out_of_range_settings_are_refused_in_every_stage(stage, override, key):
    check_ranges(compose_config(stage))
    with pytest.raises(ConfigError, match=key):
        check_ranges(compose_config(stage, [override]))


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "dpo", "base"])
def test_a_negative_learning_rate_is_refused_before_any_model_loads(stage, root):
    # The root is empty: refusing by name (not "run make ...") proves the check came first.
    import importlib
    key = "ppo.learning_rate" if stage == "ppo" else "train.learning_rate"
    with pytest.raises(ConfigError, match=f"{key}=-0.1 must be > 0"):
        importlib.import_module(f"stages.{stage}").run(compose_config(stage, [f"{key}=-0.1", "logger=none"]))


def test_a_health_threshold_of_zero_is_allowed_and_a_negative_one_is_refused():
    check_config(compose_config("ppo", ["health.thresholds.truncation_rate=0"]))  # warn on any truncation
    with pytest.raises(ConfigError, match=r"health.thresholds.truncation_rate=-0.1 must be >= 0"):
        check_config(compose_config("ppo", ["health.thresholds.truncation_rate=-0.1"]))


@pytest.mark.parametrize("overrides", [
    ["algorithm=rloo", "algorithm.samples_per_prompt=2"],
    ["algorithm=grpo", "algorithm.samples_per_prompt=2"],
    ["algorithm=online_dpo", "algorithm.samples_per_prompt=2"],
    ["algorithm=reinforce_pp", "algorithm.group_baseline=true", "algorithm.samples_per_prompt=2"],
])
def test_two_samples_a_prompt_are_enough_to_compare(overrides):
    check_config(compose_config("ppo", overrides))


def test_the_adaptive_controller_needs_its_target_and_a_fixed_one_does_not():
    with pytest.raises(ConfigError, match="ppo.kl.controller=adaptive needs a positive ppo.kl.target"):
        check_config(compose_config("ppo", ["ppo.kl.target=null"]))
    check_config(compose_config("ppo", ["ppo.kl.controller=fixed", "ppo.kl.target=null", "ppo.kl.horizon=null"]))


def test_an_rm_below_min_accuracy_or_without_one_is_refused(tmp_path):
    from pipeline.core.artifacts import Artifact
    from pipeline.core.errors import PipelineError
    from pipeline.rl.config import check_rm_accuracy

    reward = compose_config("ppo", ["reward.min_accuracy=0.7"]).reward
    check_rm_accuracy(Artifact("rm", tmp_path, {"metrics": {"eval_accuracy": 0.7}}), reward)  # at the bar
    for accuracy, shown in ((0.69, "69.0%"), (None, "None")):
        with pytest.raises(PipelineError, match=f"ranks {shown} of its held-out pairs correctly, below "
                                                r"reward.min_accuracy=0.7"):
            check_rm_accuracy(Artifact("rm", tmp_path, {"metrics": {"eval_accuracy": accuracy}}), reward)
    # When the learned RM is no reward source (e.g. only the gold judge), its accuracy does not matter.
    gold = compose_config("ppo", ["reward.min_accuracy=0.7", "~reward.sources.rm",
                                  "+reward.sources.gold={_target_: pipeline.world.reward.GoldJudgeReward}"]).reward
    check_rm_accuracy(Artifact("rm", tmp_path, {"metrics": {}}), gold)
