"""Pieces the TRL-based stages (SFT, RM) share: precision, trainer arguments, guards."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import TrainerCallback, TrainerState

from pipeline.core.errors import PipelineError


def precision_flags(precision: str) -> dict[str, bool]:
    """``bf16``/``fp16`` flags for TrainingArguments.

    ``auto`` takes bf16 where the GPU has it, fp16 on older GPUs and fp32 on CPU;
    asking for half precision without CUDA is refused rather than silently ignored.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return {"bf16": False, "fp16": False}
        bf16 = torch.cuda.is_bf16_supported()
        return {"bf16": bf16, "fp16": not bf16}
    if precision == "fp32":
        return {"bf16": False, "fp16": False}
    if precision in ("bf16", "fp16"):
        if not cuda:
            raise PipelineError(f"train.precision={precision} needs a CUDA GPU; this machine has none. "
                                "Use train.precision=auto (fp32 on CPU).")
        return {"bf16": precision == "bf16", "fp16": precision == "fp16"}
    raise PipelineError(f"train.precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def trainer_args(train: Any, output_dir: str, seed: int, report_to: str, evaluate: bool = True) -> dict[str, Any]:
    """TrainingArguments shared by SFTTrainer and RewardTrainer, all from the YAML.

    ``evaluate=False`` (no eval split) turns periodic evaluation off whatever ``eval_steps`` says.
    """
    periodic_eval = evaluate and train.eval_steps > 0
    return dict(
        output_dir=output_dir,
        max_steps=train.max_steps,
        num_train_epochs=train.num_train_epochs,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        gradient_checkpointing=train.gradient_checkpointing,
        max_length=train.max_length,
        logging_steps=train.logging_steps,
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=train.eval_steps if periodic_eval else None,
        # Checkpoints to resume a killed run from (pipeline/training/resume.py); two are kept so a kill
        # during a save falls back to the one before.
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        report_to=report_to,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **precision_flags(train.precision),
    )


def report_truncation(stage: str, rows: list[dict], max_length: int) -> int:
    """Say how many tokenized rows exceed ``train.max_length``; TRL cuts them (SFT) or drops them
    (RM), and a user must hear about it rather than lose data silently. Returns the count."""
    lengths = [max(len(v) for k, v in r.items() if k.endswith("_ids")) for r in rows]
    over = sum(n > max_length for n in lengths)
    if over:
        print(f"{stage}: {over} of {len(rows)} rows are longer than train.max_length={max_length} tokens "
              f"(longest {max(lengths)}); raise train.max_length to keep them whole")
    return over


def train_or_resume(trainer, last: Optional[Path], stage: str) -> float:
    """Train, resuming from checkpoint ``last`` when given; returns the trainer's mean loss.

    A checkpoint at the final step means training had ended before the kill (during the
    evaluation or the save): its weights and log are the result. Resumed from there, the HF
    trainer would take one step past ``max_steps`` before checking the limit."""
    if last is None:
        return trainer.train().training_loss
    print(f"{stage}: resuming from {last}")
    state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
    if state.global_step < state.max_steps:
        return trainer.train(resume_from_checkpoint=str(last)).training_loss
    trainer._load_from_checkpoint(str(last))  # what train() itself calls to load a checkpoint
    trainer.state = state
    return mean_train_loss(state.log_history, float("nan"))


def final_train_loss(log_history: list[dict], run_mean: float) -> float:
    """The last logged training loss (the mean over the last ``logging_steps`` steps), not the
    whole run's mean; a run shorter than ``logging_steps`` logged none, so its mean stands in."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return losses[-1] if losses else run_mean


def mean_train_loss(log_history: list[dict], run_mean: float) -> float:
    """The whole run's mean training loss from the log history (the trainer's own
    ``training_loss`` covers only the steps since a resume). Each logged loss is the mean over
    the steps since the previous log, so it weighs as many steps:
    sum_i loss_i * (step_i - step_{i-1}) / step_last."""
    logged = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    if not logged:
        return run_mean
    total, last = 0.0, 0
    for step, loss in logged:
        total, last = total + loss * (step - last), step
    return total / last


class NonFiniteLossGuard(TrainerCallback):
    """Stop at the first NaN/inf loss with the fix, instead of training on garbage."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss} at step {state.global_step}; nothing was saved. "
                "Lower train.learning_rate, raise train.warmup, or use train.precision=fp32.")

