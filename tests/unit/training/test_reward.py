import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.training.reward import PromptGroupSampler, pairwise_metrics, reward_stats, use_margin

pytestmark = pytest.mark.unit


def test_pairwise_accuracy_and_margin_worked_example():
    # margins: [1.0, -0.5, 2.0, 0.0] -> strictly positive in 2 of 4 (a tie is not a win)
    r_c = torch.tensor([1.0, 0.0, 3.0, 0.5])
    r_r = torch.tensor([0.0, 0.5, 1.0, 0.5])
    m = pairwise_metrics(r_c, r_r)
    assert m["accuracy"] == 0.5
    assert m["margin_mean"] == pytest.approx((1.0 - 0.5 + 2.0 + 0.0) / 4)
    assert m["chosen_mean"] == pytest.approx(1.125)
    # population spreads: chosen var (0.0156 + 1.2656 + 3.5156 + 0.3906) / 4 = 1.296875; rejected 0.5 / 4
    assert m["chosen_std"] == pytest.approx(1.296875 ** 0.5) and m["rejected_mean"] == pytest.approx(0.5)
    assert m["rejected_std"] == pytest.approx(0.125 ** 0.5)


def test_reward_stats_guard_zero_std():
    # constant rewards: std 0 would divide by zero in PPO's normalisation -> the fallback 1.0
    assert reward_stats(torch.tensor([2.0, 2.0])) == {"reward_mean": 2.0, "reward_std": 1.0}
    # [1, 5]: mean 3, population std 2 (not the fallback value, so a guard that always fires fails)
    assert reward_stats(torch.tensor([1.0, 5.0])) == {"reward_mean": 3.0, "reward_std": 2.0}
    # a small spread is kept too: only a zero (or non-finite) std falls back
    assert reward_stats(torch.tensor([1.0, 2.0])) == {"reward_mean": 1.5, "reward_std": 0.5}


def test_sampler_keeps_a_prompts_pairs_adjacent_and_shuffles_prompts():
    groups = ["a", "a", "a", "b", "c", "c", "a", "b"]
    sampler = PromptGroupSampler(groups, seed=0)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    for order in orders:
        assert sorted(order) == list(range(len(groups)))
        labels = [groups[i] for i in order]
        # each prompt's pairs form one contiguous run
        runs = [g for k, g in enumerate(labels) if k == 0 or labels[k - 1] != g]
        assert sorted(runs) == ["a", "b", "c"]
    assert len({tuple(o) for o in orders}) > 1  # prompt order is reshuffled each epoch
    sampler.set_epoch(2)
    assert list(sampler) == orders[2]  # a pure function of the epoch: a resumed run replays it


def test_use_margin_auto_needs_a_margin_on_every_comparison():
    with_margin, without = {"margin": 2.0}, {}
    assert use_margin("auto", [with_margin, with_margin]) is True
    assert use_margin("auto", [with_margin, without]) is False  # mixed: none is used
    assert use_margin("auto", []) is False
    assert use_margin(True, [without]) is True and use_margin(False, [with_margin]) is False
    with pytest.raises(ConfigError, match=r"train.use_margin='yes' must be true, false or auto"):
        use_margin("yes", [with_margin])


def test_the_reward_trainer_batches_with_the_prompt_group_sampler(tmp_path):
    """GroupedRewardTrainer hands its loader the prompt-grouped order: a prompt's pairs back to back
    (TRL's own sampler would shuffle them apart)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig

    from pipeline.training.reward import GroupedRewardTrainer
    from tests.unit.generation.test_decoding import build_tokenizer
    tok = build_tokenizer()
    groups = ["a", "a", "a", "b", "c", "c", "a", "b"]
    rows = [{"chosen_ids": [3, 4 + i], "rejected_ids": [3, 5 + i], "group": g} for i, g in enumerate(groups)]
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id))
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", use_cpu=True,
                        bf16=False, seed=0)
    trainer = GroupedRewardTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows))
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(len(groups)))
    labels = [groups[i] for i in order]
    runs = [g for i, g in enumerate(labels) if i == 0 or labels[i - 1] != g]
    assert sorted(runs) == ["a", "b", "c"]  # each prompt's pairs form one run
