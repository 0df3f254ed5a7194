"""Stage 1 of InstructGPT: supervised fine-tuning on demonstrations, with LoRA.

The base model stays frozen; a LoRA adapter on every linear layer learns to answer
in the chat format. The loss covers assistant tokens only: each answer and the end-of-turn
token that closes it, found by rendering the conversation prefix by prefix with the
tokenizer's own chat template (pipeline/data/chat.py), so the model is never trained to write the
user's side of the conversation and always learns to stop.

    make sft
    make sft ARGS="lora.r=4 train.learning_rate=1e-3 train.lr_scheduler_type=linear"
    make sft ARGS="model=qwen2 data.sft.train=[tatsu-lab/alpaca] data.sft.eval=[]"  # with a hub
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from datasets import Dataset
from omegaconf import DictConfig
from trl import SFTConfig, SFTTrainer

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.artifacts import staged_artifact
from pipeline.core.runtime import output_run_dir, resolved, seed_everything, user_errors
from pipeline.core.tracking import start_tracking
from pipeline.core.validation import check_ranges
from pipeline.data.chat import ChatFormat
from pipeline.data.bad_rows import DataReport
from pipeline.data.layouts import load_validated, prompt_row, sft_example, sft_row, tokenized
from pipeline.generation.decoding import check_decoding
from pipeline.generation.samples import sample_responses, sample_stats
from pipeline.models.loading import base_model_source, load_causal_lm, load_tokenizer, lora_config
from pipeline.plan.fit import fit_train
from pipeline.training.hf import (
    NonFiniteLossGuard,
    final_train_loss,
    mean_train_loss,
    report_truncation,
    train_or_resume,
    trainer_args,
)
from pipeline.training.resume import MarkComplete, TrainerCheckpoints


def work_dir(cfg: DictConfig) -> Path:
    return Path(output_run_dir(cfg)) / ".work" / "sft"


def sft_trainer(cfg: DictConfig, model, fmt: ChatFormat, train_rows: list[dict], eval_rows: list[dict],
                report_to: str) -> SFTTrainer:
    """TRL's SFTTrainer with a LoRA adapter on tokenized rows ``{"input_ids", "assistant_masks"}``:
    TRL turns the mask into labels, -100 outside the answers."""
    args = SFTConfig(
        **trainer_args(cfg.train, str(work_dir(cfg)), cfg.seed, report_to, evaluate=bool(eval_rows)),
        packing=cfg.train.packing,
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
    )
    return SFTTrainer(
        model=model, args=args, processing_class=fmt.tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        peft_config=lora_config(cfg.lora, "CAUSAL_LM"), callbacks=[NonFiniteLossGuard(), MarkComplete()],
    )


def run(cfg: DictConfig) -> dict:
    check_ranges(cfg)
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.train.num_threads)

    # --- parent, chat template, data and sampling settings: all checked before any model loads ---
    check_decoding(cfg.samples.decoding)
    source, base = base_model_source(cfg, cfg.parents.base)
    fmt = load_tokenizer(source, cfg.model)
    encode = tokenized(sft_row, lambda row: sft_example(fmt, row))
    data = DataReport()  # bad rows skipped (data.bad_rows) and merged turns, by reason
    train_rows = load_validated(cfg.data.sft.train, cfg.data.hub_split, encode, cfg.data.columns,
                                cfg.data.bad_rows, data)
    eval_rows = load_validated(cfg.data.sft.eval, cfg.data.hub_split, encode, cfg.data.columns,  # [] skips eval
                               cfg.data.bad_rows, data)
    prompts = [r["messages"] for r in load_validated(cfg.data.eval_prompts, cfg.data.hub_split, prompt_row,
                                                     cfg.data.columns, cfg.data.bad_rows, data)]
    truncated = report_truncation("sft", train_rows, cfg.train.max_length)

    note = fit_train("sft", cfg, source)  # refused here, before any weight loads, if over the card
    if note:
        print(note)

    # --- model: the frozen base ---
    model = load_causal_lm(source, cfg.model, fmt)

    # --- trainer: LoRA on the base, loss on assistant tokens; resumes a killed run ---
    ckpts = TrainerCheckpoints(work_dir(cfg), resolved(cfg), "sft", [base])
    last, run_id = ckpts.start(cfg.resume)
    tracker = start_tracking(cfg, "sft", run_id)
    trainer = sft_trainer(cfg, model, fmt, train_rows, eval_rows, "wandb" if tracker.enabled else "none")
    run_mean = train_or_resume(trainer, last, "sft")
    logged = trainer.state.log_history
    metrics = {"train_loss": final_train_loss(logged, run_mean), "train_loss_mean": mean_train_loss(logged, run_mean),
               "train_rows_truncated": truncated, **data.metrics()}
    if eval_rows:
        final_eval = trainer.evaluate()
        metrics.update(eval_loss=final_eval["eval_loss"],
                       eval_mean_token_accuracy=final_eval["eval_mean_token_accuracy"])
    policy = trainer.model

    # --- held-out samples: does it answer in format and stop? ---
    samples = sample_responses(policy, fmt, prompts[: cfg.samples.num_prompts],
                               cfg.samples.decoding, cfg.samples.batch_size, cfg.seed)
    metrics.update({f"samples/{k}": v for k, v in sample_stats(samples).items()})
    print(f"sft: train loss {metrics['train_loss']:.3f}, eval loss {metrics.get('eval_loss', float('nan')):.3f}, "
          f"stop rate {metrics['samples/eos_rate']:.1%}, format {metrics['samples/format_rate']:.1%}")
    tracker.table("samples", ["prompt", "response", "ended_with_eos"],
                  [[s.prompt, s.response, s.ended] for s in samples[: cfg.logger.num_samples]])

    # --- save: adapter + tokenizer and stop set (+ merged model on request) ---
    with staged_artifact(output_run_dir(cfg), "sft", resolved(cfg), parent=base) as art:
        policy.save_pretrained(art.dir / "adapter", save_embedding_layers=False)
        fmt.save(art.dir / "adapter")
        if cfg.save_merged:
            merged = policy.merge_and_unload()
            merged.save_pretrained(art.dir / "merged")
            fmt.save(art.dir / "merged")
        art.metrics = metrics
    ckpts.remove()  # the artifact supersedes them
    tracker.summary(metrics)
    tracker.log_artifact(art.artifact)
    tracker.finish()
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="sft")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
