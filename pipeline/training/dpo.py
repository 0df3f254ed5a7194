"""TRL's DPOTrainer on pairs the pipeline's ChatFormat has already tokenized.

TRL renders each pair with the chat template and encodes it whole, which equals the
ChatFormat's encoding up to the answer's end-of-turn token; but TRL keeps whatever the template
writes after that token (ChatML's and Gemma's newline), so its answers end in a token no sample
ever contains (a rollout stops at the end-of-turn token) and that SFT, the RM and eval never
score. Feeding TRL the ChatFormat's ids makes DPO train on exactly the sequences every other
stage sees (tests/stage/test_families_stage.py checks this per family).
"""

from __future__ import annotations

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

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset
