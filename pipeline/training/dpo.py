"""TRL's DPOTrainer on pairs the pipeline's ChatFormat has already tokenized.

TRL renders each pair with the chat template and encodes it whole, which equals the
ChatFormat's encoding up to the answer's end-of-turn token; but TRL keeps whatever the template
writes after that token (ChatML's and Gemma's newline), so its answers end in a token no sample
ever contains (a rollout stops at the end-of-turn token) and that SFT, the RM and eval never
score. Feeding TRL the ChatFormat's ids makes DPO train on exactly the sequences every other
stage sees (tests/stage/test_families_stage.py checks this per family).
"""

from __future__ import annotations

import torch
from trl import DPOTrainer


def completion_columns(ids: dict) -> dict:
    """TRL's pre-tokenized columns from a pair's ChatFormat ids (``preference_example``, which has
    checked that each answer's ids start with the prompt's): the prompt's ids, then each answer's
    ids after the prompt, through its end-of-turn token."""
    n = len(ids["prompt_ids"])
    return {"prompt_ids": ids["prompt_ids"], "chosen_ids": ids["chosen_ids"][n:],
            "rejected_ids": ids["rejected_ids"][n:]}


class TokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer whose datasets already hold ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``
    (:func:`completion_columns`): TRL's own rendering and tokenization step is skipped; its
    collator, loss, reference and training loop are unchanged."""

    def __init__(self, *args, entropy_coef: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.entropy_coef = entropy_coef

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _compute_loss(self, model, inputs, return_outputs):
        """TRL's loss, minus ``entropy_coef`` times the policy's mean entropy on the chosen answers
        (``train.entropy_coef``; < 0 sharpens). The entropy is the one TRL's fused LM head already
        computes for its metrics, taken with its gradient from the policy's forward pass (the one
        run with gradients; the reference's runs without)."""
        if not self.entropy_coef or not torch.is_grad_enabled():
            return super()._compute_loss(model, inputs, return_outputs)
        seen = []

        def keep(module, args, kwargs, output):
            if kwargs.get("fused_lm_head") and torch.is_grad_enabled():
                seen.append(output)

        handle = model.register_forward_hook(keep, with_kwargs=True)
        try:
            out = super()._compute_loss(model, inputs, return_outputs)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"train.entropy_coef: expected one policy forward pass with TRL's fused LM head, "
                               f"saw {len(seen)}; this TRL version computes its loss differently, set "
                               "train.entropy_coef=0")
        entropy = chosen_entropy(seen[0].entropy, seen[0].label_mask)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["entropy_chosen"].append(self.accelerator.gather_for_metrics(entropy.detach()).mean().item())
        if return_outputs:
            loss, outputs = out
            return loss - self.entropy_coef * entropy, outputs
        return out - self.entropy_coef * entropy


def chosen_entropy(entropy: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Mean policy entropy over the chosen answers' tokens: the first half of TRL's
    ``[chosen; rejected]`` batch. ``entropy``, ``label_mask``: (2B, L), as TRL's fused LM head
    returns them (``entropy`` 0 where the mask is 0). A scalar, with the entropy's gradient."""
    half = entropy.shape[0] // 2
    mask = label_mask[:half].to(entropy.dtype)
    return (entropy[:half] * mask).sum() / mask.sum().clamp(min=1)
