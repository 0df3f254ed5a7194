"""Direct preference optimisation (Rafailov et al. 2023): the no-RL baseline. With
``rho = log pi(y|x) - log pi_ref(y|x)`` summed over an answer's tokens, ``train.loss_type`` picks
TRL's loss; the default, APO-zero (D'Oosterlinck et al. 2024, eq. 7), anchors each answer to the
reference on its own, where DPO's sigmoid only widens their gap:

    apo_zero: loss = (1 - sigmoid(beta * rho_w)) + sigmoid(beta * rho_l)
    sigmoid:  loss = -log sigmoid(beta * (rho_w - rho_l))                    (DPO)
              (+ w_sft * mean NLL of the chosen tokens with loss_type [sigmoid, sft], RPO, Pang et al. 2024)

each pair weighted by its probability under the policy with use_weighting (WPO, Zhou et al. 2024).

TRL's DPOTrainer trains a copy of the SFT adapter on the base; the reference is the SFT model
itself (TRL keeps a frozen copy of the adapter), not the bare base that "adapter disabled" would
give under LoRA. The pairs (``pairs.source``): ``data`` (the default), the RM's preference data
(ranked lists expanded to all their pairs; margins ignored, DPO's loss has no place for them);
``policy``, on-policy DPO, the SFT policy's own samples, best against worst by
the run's RM (pipeline/training/policy_pairs.py; the RM is then the artifact's parent); ``both``.
The artifact is a policy adapter on the base, like the RL stages', so `make eval`, `make
generate` and `make export` treat `dpo` as one more stage.

    make dpo
    make dpo ARGS="pairs.source=policy train.max_steps=45"   # on-policy DPO
    make dpo ARGS="train.beta=0.05 train.max_steps=300"
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import hydra
import torch
from datasets import Dataset
from omegaconf import DictConfig
from peft import PeftModel
from trl import DPOConfig

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.artifacts import find_parent, require_built_on, staged_artifact
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.runtime import output_run_dir, resolved, seed_everything, user_errors
from pipeline.core.tracking import start_tracking
from pipeline.core.validation import check_ranges
from pipeline.data.chat import ChatFormat
from pipeline.data.bad_rows import DataReport
from pipeline.data.layouts import load_validated, preference_example, preference_rows, tokenized
from pipeline.models.loading import load_causal_lm
from pipeline.models.policies import base_source_for
from pipeline.models.reward import load_sft_tokenizer
from pipeline.training.hf import (
    NonFiniteLossGuard,
    final_train_loss,
    mean_train_loss,
    report_truncation,
    train_or_resume,
    trainer_args,
)
from pipeline.training.dpo import TokenizedDPOTrainer, completion_columns
from pipeline.training.policy_pairs import policy_pairs
from pipeline.training.resume import MarkComplete, TrainerCheckpoints

SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")  # TRL's losses that read label_smoothing


def check_losses(train: DictConfig) -> None:
    """Refuse settings TRL would silently ignore or reject later."""
    losses = list(train.loss_type)
    if train.loss_weights is not None and len(train.loss_weights) != len(losses):
        raise ConfigError(f"train.loss_weights has {len(train.loss_weights)} entries for {len(losses)} losses "
                          f"{losses}: give one weight per train.loss_type entry, or null")
    if train.label_smoothing > 0 and not set(losses) & set(SMOOTHED_LOSSES):
        raise ConfigError(f"train.label_smoothing={train.label_smoothing} has no effect with train.loss_type="
                          f"{losses}: use it with one of {list(SMOOTHED_LOSSES)} (e.g. 'train.loss_type=[robust]', "
                          "rDPO for noisy labels), or leave it at 0")
    if train.use_weighting and "sft" in losses:  # TRL 1.16 weights the expanded SFT loss in place
        raise ConfigError(f"train.use_weighting=true does not work with 'sft' in train.loss_type={losses}: TRL's "
                          "DPOTrainer fails on it at the first step. Drop the NLL term ('train.loss_type=[sigmoid]' "
                          "'train.loss_weights=null') or set train.use_weighting=false")


PAIR_SOURCES = ("data", "policy", "both")


def check_pairs(cfg: DictConfig) -> None:
    if cfg.pairs.source not in PAIR_SOURCES:
        raise ConfigError(f"pairs.source={cfg.pairs.source!r} must be one of {list(PAIR_SOURCES)}: data (the "
                          "preference data, data.prefs.train), policy (the SFT policy's samples ranked by the RM) "
                          "or both")


def dpo_rows(fmt: ChatFormat, sources: list[str], cfg: DictConfig, data: Optional[DataReport] = None) -> list[dict]:
    """Preference pairs, each checked and tokenized with the chat format (``_ids``: what TRL trains
    on; a conversation the template refuses names its file and line); skips go to ``data``."""
    return load_validated(sources, cfg.data.hub_split, tokenized(preference_rows, lambda r: with_ids(fmt, r)),
                          cfg.data.columns, cfg.data.bad_rows, data)


def with_ids(fmt: ChatFormat, row: dict) -> dict:
    return {**row, "_ids": preference_example(fmt, row)}


def train_pairs(cfg: DictConfig, sft, fmt: ChatFormat, data: DataReport) -> tuple[list[dict], list, dict]:
    """The training pairs of ``pairs.source`` (data: data.prefs.train; policy: the SFT policy's
    samples ranked by the RM, pipeline/training/policy_pairs.py; both: the two together), the
    extra parents they depend on, and what sampling them gave."""
    offline = dpo_rows(fmt, cfg.data.prefs.train, cfg, data) if cfg.pairs.source in ("data", "both") else []
    if cfg.pairs.source == "data":
        return offline, [], {}
    rm = find_parent(cfg.paths.run_dir, "rm", cfg.parents.rm)
    require_built_on(rm, sft)  # the RM ranks answers of the SFT model it was trained on
    pairs, stats = policy_pairs(cfg, sft, rm, data)
    if not pairs:
        raise PipelineError(f"pairs.source={cfg.pairs.source}: none of the {stats['pairs/prompts']} prompts gave two "
                            f"usable samples that the RM ranks apart (samples that stopped: "
                            f"{stats['pairs/eos_rate']:.0%}); raise pairs.samples_per_prompt or pairs.max_new_tokens")
    print(f"dpo: {len(pairs)} pairs from {stats['pairs/prompts']} prompts x {cfg.pairs.samples_per_prompt} samples "
          f"of the SFT policy, ranked by the RM (mean margin {stats['pairs/margin_mean']:.2f})"
          + (f", with the data's {len(offline)}" if offline else ""))
    return offline + [with_ids(fmt, r) for r in pairs], [rm], stats


def as_dataset(rows: list[dict], max_length: int) -> Dataset:
    """Pairs that fit ``max_length`` (the rest were reported by :func:`report_truncation`), as the
    ChatFormat's ids: DPO trains on the sequences every other stage sees (pipeline/training/dpo.py)."""
    fits = [r for r in rows if max(len(r["_ids"]["chosen_ids"]), len(r["_ids"]["rejected_ids"])) <= max_length]
    return Dataset.from_list([completion_columns(r["_ids"]) for r in fits])


def dpo_trainer(cfg: DictConfig, sft, fmt: ChatFormat, train_rows: list[dict], eval_rows: list[dict], work: Path,
                report_to: str) -> TokenizedDPOTrainer:
    """Base + a trainable copy of the SFT adapter; TRL adds a frozen copy as the reference."""
    base = load_causal_lm(base_source_for(sft), cfg.model, fmt)
    model = PeftModel.from_pretrained(base, sft.path / "adapter", is_trainable=True)
    args = DPOConfig(**trainer_args(cfg.train, str(work), cfg.seed, report_to),
                     beta=cfg.train.beta, loss_type=list(cfg.train.loss_type),
                     loss_weights=None if cfg.train.loss_weights is None else list(cfg.train.loss_weights),
                     label_smoothing=cfg.train.label_smoothing, use_weighting=cfg.train.use_weighting)
    return TokenizedDPOTrainer(model=model, args=args, processing_class=fmt.tokenizer,
                               train_dataset=as_dataset(train_rows, cfg.train.max_length),
                               eval_dataset=as_dataset(eval_rows, cfg.train.max_length),
                               callbacks=[NonFiniteLossGuard(), MarkComplete()],
                               entropy_coef=cfg.train.entropy_coef)


def run(cfg: DictConfig) -> dict:
    check_ranges(cfg)
    check_losses(cfg.train)
    check_pairs(cfg)
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.train.num_threads)

    # --- parent and data (ranked lists expanded): checked before any model loads ---
    sft = find_parent(cfg.paths.run_dir, "sft", cfg.parents.sft)
    fmt = load_sft_tokenizer(sft)
    data = DataReport()  # bad rows skipped (data.bad_rows) and merged turns, by reason
    eval_rows = dpo_rows(fmt, cfg.data.prefs.eval, cfg, data)
    train_rows, more_parents, pair_stats = train_pairs(cfg, sft, fmt, data)
    too_long = report_truncation("dpo", [r["_ids"] for r in train_rows], cfg.train.max_length)

    # --- model and trainer: base + a trainable SFT adapter copy, the SFT model as reference ---
    work = Path(output_run_dir(cfg)) / ".work" / "dpo"
    ckpts = TrainerCheckpoints(work, resolved(cfg), "dpo", [sft, *more_parents])
    last, run_id = ckpts.start(cfg.resume)
    tracker = start_tracking(cfg, "dpo", run_id)
    trainer = dpo_trainer(cfg, sft, fmt, train_rows, eval_rows, work, "wandb" if tracker.enabled else "none")
    run_mean = train_or_resume(trainer, last, "dpo")
    final_eval = trainer.evaluate()
    logged = trainer.state.log_history
    metrics = {"train_loss": final_train_loss(logged, run_mean), "train_loss_mean": mean_train_loss(logged, run_mean),
               "train_pairs": len(train_rows) - too_long, "train_pairs_dropped_too_long": too_long, **pair_stats,
               **{k: v for k, v in final_eval.items() if k.startswith("eval_rewards/") or k == "eval_loss"},
               **data.metrics()}
    print(f"dpo: train loss {metrics['train_loss']:.3f}, held-out preference accuracy "
          f"{metrics.get('eval_rewards/accuracies', float('nan')):.3f}")

    # --- save: the policy adapter (on the base) + chat format ---
    # On-policy pairs depend on the RM too: it is the recorded parent then (its own parent is this
    # SFT), so rebuilding the RM makes this artifact stale for eval and `make pipeline`.
    parent = more_parents[0] if more_parents else sft
    with staged_artifact(output_run_dir(cfg), "dpo", resolved(cfg), parent=parent) as art:
        trainer.model.save_pretrained(art.dir / "policy", selected_adapters=["default"], save_embedding_layers=False)
        fmt.save(art.dir / "policy")
        art.metrics = metrics
    ckpts.remove()  # the artifact supersedes them
    tracker.summary(metrics)
    tracker.log_artifact(art.artifact)
    tracker.finish()
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="dpo")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
