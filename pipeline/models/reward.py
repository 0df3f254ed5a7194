"""The reward model: building it on the SFT backbone, scoring, metrics, grouped batching.

InstructGPT (Ouyang et al. 2022, sec. 3.5) starts the RM from the SFT model and trains
it on all K(K-1)/2 comparisons of a prompt with the pairwise loss

    loss(theta) = -E[ log sigmoid(r(x, y_w) - r(x, y_l) - m) ]

(m = 0 unless a margin is given). Here the SFT adapter is merged into the base in
memory, a fresh LoRA adapter and a scalar head (``score``) are trained on top, and the
RM artifact stores only that adapter and head.
"""

from __future__ import annotations

import torch
from peft import PeftConfig, PeftModel

from pipeline.core.artifacts import Artifact, recorded_parent, require_built_on
from pipeline.data.chat import ChatFormat, load_saved_chat_format
from pipeline.generation.decoding import left_pad
from pipeline.models.loading import load_sequence_classifier
from pipeline.models.policies import base_source_for


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


def standalone_reward_model(rm: Artifact, model_cfg):
    """(model, chat format) of an RM artifact as one plain sequence classifier: its SFT backbone and
    RM adapter merged, on the SFT the artifact records as its parent (another run's RM works too)."""
    sft = recorded_parent(rm)
    model, fmt = load_reward_model(rm, sft, model_cfg)
    return model.merge_and_unload().eval(), fmt


def save_standalone_reward_model(rm: Artifact, out, model_cfg):
    """Write an RM artifact as a plain HF folder (safetensors, config, tokenizer with its chat template):
    ``AutoModelForSequenceClassification`` loads it without peft or this pipeline, e.g. as another
    run's independent judge (``make eval ARGS="judge=<out>"``). Returns ``out``."""
    model, fmt = standalone_reward_model(rm, model_cfg)
    model.save_pretrained(out, safe_serialization=True)
    fmt.tokenizer.save_pretrained(out)
    return out


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
