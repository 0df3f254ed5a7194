"""The reward model: building it on the SFT backbone, scoring, metrics, grouped batching.

InstructGPT (Ouyang et al. 2022, sec. 3.5) starts the RM from the SFT model and trains
it on all K(K-1)/2 comparisons of a prompt with the pairwise loss

    loss(theta) = -E[ log sigmoid(r(x, y_w) - r(x, y_l) - m) ]

(m = 0 unless a margin is given). Here the SFT adapter is merged into the base in
memory, a fresh LoRA adapter and a scalar head (``score``) are trained on top, and the
RM artifact stores only that adapter and head.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
import torch
from peft import PeftConfig, PeftModel
from torch.utils.data import Sampler
from trl import RewardTrainer

from pipeline.artifacts import Artifact, require_built_on
from pipeline.chat import ChatFormat, load_saved_chat_format
from pipeline.generation import left_pad
from pipeline.models import load_sequence_classifier
from pipeline.policies import base_source_for


def load_sft_tokenizer(sft: Artifact) -> ChatFormat:
    """The chat format saved beside the SFT adapter (tokenizer, pad token, template, stop set)."""
    return load_saved_chat_format(sft.path / "adapter")


def sft_backbone_classifier(sft: Artifact, model_cfg, fmt: ChatFormat):
    """Base + SFT adapter merged, with a fresh scalar head: the RM's starting point."""
    model = load_sequence_classifier(base_source_for(sft), model_cfg, fmt)
    # The adapter was saved for a causal LM; loading it task-agnostically puts the same
    # LoRA deltas on the same backbone layers without the generation hooks.
    config = PeftConfig.from_pretrained(sft.path / "adapter")
    config.task_type = None
    return PeftModel.from_pretrained(model, sft.path / "adapter", config=config).merge_and_unload()


def load_reward_model(rm: Artifact, sft: Artifact, model_cfg):
    """The trained RM exactly as saved: SFT backbone + RM adapter + head, eval mode."""
    require_built_on(rm, sft)
    fmt = load_sft_tokenizer(sft)
    model = sft_backbone_classifier(sft, model_cfg, fmt)
    model = PeftModel.from_pretrained(model, rm.path / "adapter")
    return model.eval(), fmt


@torch.no_grad()
def score_ids(model, pad_id: int, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
    """r(x, y) for each tokenized prompt + response (:meth:`ChatFormat.scored_ids`). Shape (N,).

    The head reads the hidden state of the last real token, the stop token that closes the
    response: the same token a PPO rollout's score is read at. Left padding with position ids
    from the mask reads the same token as right padding would, and lets the head read column -1.
    """
    model.eval()
    scores = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = left_pad(sequences[start:start + batch_size], pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        scores.append(out.logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.empty(0)


def score_conversations(model, fmt: ChatFormat, prompts: list[list[dict]], responses: list[list[dict]],
                        batch_size: int) -> torch.Tensor:
    """r(x, y) of each (prompt, response) pair of conversations. Shape (N,)."""
    return score_ids(model, fmt.pad_id, [fmt.scored_ids(p, r) for p, r in zip(prompts, responses)], batch_size)


def pairwise_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy = P(r_chosen > r_rejected), the mean margin, and each side's spread. (N,) each."""
    margin = r_chosen - r_rejected
    return {
        "accuracy": (margin > 0).float().mean().item(),
        "margin_mean": margin.mean().item(),
        "chosen_mean": r_chosen.mean().item(), "chosen_std": r_chosen.std(unbiased=False).item(),
        "rejected_mean": r_rejected.mean().item(), "rejected_std": r_rejected.std(unbiased=False).item(),
    }


def evaluate_pairs(model, fmt: ChatFormat, rows: list[dict],
                   batch_size: int) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Score each held-out tokenized pair; returns metrics and the chosen / rejected rewards (N,)."""
    r_c = score_ids(model, fmt.pad_id, [r["chosen_ids"] for r in rows], batch_size)
    r_r = score_ids(model, fmt.pad_id, [r["rejected_ids"] for r in rows], batch_size)
    return pairwise_metrics(r_c, r_r), r_c, r_r


class PromptGroupSampler(Sampler[int]):
    """Shuffle prompts, not pairs: a prompt's K(K-1)/2 pairs come out back to back.

    InstructGPT trained on all comparisons of a prompt as one batch element, because
    shuffling the correlated pairs of one prompt across an epoch made the RM overfit.
    With a batch of at least K(K-1)/2 pairs, a prompt's pairs share one batch except
    when its group straddles a batch boundary. Group order is reshuffled every epoch.

    The order is a pure function of (seed, epoch); the Trainer sets the epoch
    (``set_epoch``), so a resumed run replays the same order and skips what it had done.
    """

    def __init__(self, groups: list[str], seed: int):
        by_group: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            by_group[g].append(i)
        self.groups = list(by_group.values())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(len(self.groups)))
        random.Random(self.seed + self.epoch).shuffle(order)
        for g in order:
            yield from self.groups[g]

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)


class GroupedRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer with prompt-grouped batches (see PromptGroupSampler)."""

    def _get_train_sampler(self, train_dataset=None):
        # The loader drops unused columns before asking for a sampler; the trainer's own
        # copy of the dataset still has `group`, row for row.
        return PromptGroupSampler(self.train_dataset["group"], self.args.seed)


def reward_stats(rewards: torch.Tensor) -> dict[str, float]:
    """Mean and std PPO uses to normalise raw RM scores."""
    std = rewards.std(unbiased=False).item()
    return {"reward_mean": rewards.mean().item(), "reward_std": std if math.isfinite(std) and std > 0 else 1.0}
