"""Stage 2 of InstructGPT: a reward model from pairwise human preferences, with LoRA.

The backbone is the SFT model (base + SFT adapter, merged in memory). On top: a new
LoRA adapter and a scalar head, trained with TRL's RewardTrainer on

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) [- margin])
           + center_rewards_coefficient * (r_chosen + r_rejected)^2      (Eisenstein et al. 2023)

The small centring term keeps rewards near zero, so PPO's reward scale does not drift.

Ranked lists of K responses expand to all K(K-1)/2 pairs, and a prompt's pairs are
kept together in one batch (``train.group_pairs``; see pipeline/models/reward.py).

    make rm
    make rm ARGS="lora.r=8 train.max_steps=400 train.use_margin=false"
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from datasets import Dataset
from omegaconf import DictConfig
from trl import RewardConfig, RewardTrainer

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.artifacts import find_parent, staged_artifact
from pipeline.core.errors import PipelineError
from pipeline.core.runtime import output_run_dir, resolved, seed_everything, user_errors
from pipeline.core.tracking import start_tracking
from pipeline.core.validation import check_ranges
from pipeline.data.bad_rows import DataReport
from pipeline.data.layouts import load_validated, margin_preference_rows, preference_example, preference_rows, tokenized
from pipeline.models.loading import lora_config
from pipeline.models.policies import base_source_for
from pipeline.models.reward import load_sft_tokenizer, sft_backbone_classifier
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
from pipeline.training.reward import GroupedRewardTrainer, evaluate_pairs, reward_stats, use_margin


def as_dataset(rows: list[dict], use_margin: bool, max_length: int) -> Dataset:
    """Tokenized pairs for TRL's RewardTrainer. It subtracts a ``margin`` column whenever one
    exists (dropped unless asked), and would silently drop pairs over ``max_length``: they are
    dropped here instead, after :func:`report_truncation` has said how many."""
    keep = ("chosen_ids", "rejected_ids", "group") + (("margin",) if use_margin else ())
    return Dataset.from_list([{k: r[k] for k in keep if k in r} for r in rows
                              if max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= max_length])


def run(cfg: DictConfig) -> dict:
    check_ranges(cfg)
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.group_pairs and cfg.train.group_by_length:
        raise PipelineError("train.group_pairs=true and train.group_by_length=true both choose the batch "
                            "order; set one of them to false")

    # --- parent and data (ranked lists expanded, tokenized): checked before any model loads ---
    sft = find_parent(cfg.paths.run_dir, "sft", cfg.parents.sft)
    fmt = load_sft_tokenizer(sft)
    use_margin(cfg.train.use_margin, [])  # a wrong value is refused before the data loads
    pairs = margin_preference_rows if cfg.train.use_margin is True else preference_rows
    encode = tokenized(pairs, lambda row: preference_example(fmt, row))
    data = DataReport()  # bad rows skipped (data.bad_rows) and merged turns, by reason
    train_rows = load_validated(cfg.data.prefs.train, cfg.data.hub_split, encode, cfg.data.columns,
                                cfg.data.bad_rows, data)
    eval_rows = load_validated(cfg.data.prefs.eval, cfg.data.hub_split, encode, cfg.data.columns,
                               cfg.data.bad_rows, data)
    too_long = report_truncation("rm", train_rows, cfg.train.max_length)
    margin = use_margin(cfg.train.use_margin, train_rows + eval_rows)
    if cfg.train.use_margin == "auto":
        print(f"rm: train.use_margin=auto: {'every comparison has' if margin else 'not every comparison has'} "
              f"a margin, so the loss {'subtracts it' if margin else 'uses none'}")

    note = fit_train("rm", cfg, base_source_for(sft))  # refused here, before any weight loads, if over the card
    if note:
        print(note)

    # --- backbone: the SFT model, with a fresh scalar head ---
    model = sft_backbone_classifier(sft, cfg.model, fmt)

    # --- trainer: new LoRA adapter + trainable head; resumes a killed run ---
    work = Path(output_run_dir(cfg)) / ".work" / "rm"
    ckpts = TrainerCheckpoints(work, resolved(cfg), "rm", [sft])
    last, run_id = ckpts.start(cfg.resume)
    tracker = start_tracking(cfg, "rm", run_id)
    args = RewardConfig(
        **trainer_args(cfg.train, str(work), cfg.seed, "wandb" if tracker.enabled else "none"),
        center_rewards_coefficient=cfg.train.center_rewards_coefficient,
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
    )
    trainer_cls = GroupedRewardTrainer if cfg.train.group_pairs else RewardTrainer
    trainer = trainer_cls(
        model=model, args=args, processing_class=fmt.tokenizer,
        train_dataset=as_dataset(train_rows, margin, cfg.train.max_length),
        eval_dataset=as_dataset(eval_rows, margin, cfg.train.max_length),
        peft_config=lora_config(cfg.lora, "SEQ_CLS", modules_to_save=["score"]),
        callbacks=[NonFiniteLossGuard(), MarkComplete()],
    )
    run_mean = train_or_resume(trainer, last, "rm")
    rm = trainer.model.eval()

    # --- held-out pairs: accuracy, margin, spread; stats PPO normalises with ---
    pair_metrics, r_c, r_r = evaluate_pairs(rm, fmt, eval_rows, cfg.score_batch_size)
    logged = trainer.state.log_history
    metrics = {"train_loss": final_train_loss(logged, run_mean), "train_loss_mean": mean_train_loss(logged, run_mean),
               "train_pairs_dropped_too_long": too_long, "train_use_margin": margin,
               **{f"eval_{k}": v for k, v in pair_metrics.items()},
               **reward_stats(torch.cat([r_c, r_r])), **data.metrics()}
    print(f"rm: held-out pairwise accuracy {metrics['eval_accuracy']:.3f} "
          f"(margin {metrics['eval_margin_mean']:.2f}) on {len(eval_rows)} pairs")
    tracker.histogram("eval/rewards_chosen", r_c)
    tracker.histogram("eval/rewards_rejected", r_r)

    # --- save: RM adapter + head, tokenizer ---
    with staged_artifact(output_run_dir(cfg), "rm", resolved(cfg), parent=sft) as art:
        rm.save_pretrained(art.dir / "adapter", save_embedding_layers=False)
        fmt.save(art.dir / "adapter")
        art.metrics = metrics
    ckpts.remove()  # the artifact supersedes them
    tracker.summary(metrics)
    tracker.log_artifact(art.artifact)
    tracker.finish()
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="rm")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
