"""Stage 3 of InstructGPT: RL of the SFT policy against the reward model, KL-anchored to the SFT policy.

    maximise  E[ r(x, y) - beta * KL(pi(.|x) || pi_SFT(.|x)) ]

with the clipped surrogate (Schulman et al. 2017) and the advantage estimator of
``conf/algorithm/`` (pipeline/rl/trainer.py): PPO with GAE and a value model (the default),
or the critic-free RLOO, GRPO / Dr.GRPO and REINFORCE++, which sample k responses per prompt.
Every role is a LoRA adapter on one frozen base (pipeline/rl/shared_model.py). The artifact is
written under the algorithm's name: ``artifacts/<run>/ppo``, ``.../rloo``, ``.../grpo``, ...

    make ppo
    make ppo ARGS="algorithm=rloo"
    make ppo ARGS="algorithm=grpo ppo.total_updates=60"
    make ppo ARGS="algorithm=ppo_ptx"                                # PPO-ptx (InstructGPT eq. 2)
    make ppo ARGS="+reward.sources.gold='{_target_: pipeline.rl.rewards.GoldJudgeReward,
                   weight: 1.0, seed: 0, n_entities: 40, n_unknown: 40}'"        # (one line)
    accelerate launch --multi_gpu --num_processes 2 -m stages.ppo   # data parallel (GPUs, or
                                                                    # CPU processes on gloo)

A killed run resumes from its last checkpoint when rerun with the same config.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from omegaconf import DictConfig
from tqdm import tqdm

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.artifacts import find_parent, require_built_on, staged_artifact
from pipeline.core.identity import config_hash
from pipeline.core.runtime import output_run_dir, resolved, seed_everything, user_errors
from pipeline.core.tracking import Tracker, start_tracking
from pipeline.data.corpus import pack_corpus
from pipeline.data.bad_rows import DataReport
from pipeline.data.layouts import load_validated, prompt_row, text_row
from pipeline.models.policies import base_source_for
from pipeline.models.reward import load_sft_tokenizer
from pipeline.plan.fit import fit_ppo
from pipeline.plan.settings import adapter_ranks
from pipeline.rl import health
from pipeline.rl.checkpoint import Checkpoints
from pipeline.rl.config import check_config, check_rm_accuracy
from pipeline.rl.rewards import build_reward_fn, reward_scale
from pipeline.rl.shared_model import SharedBaseActorCritic
from pipeline.rl.snapshots import Snapshots
from pipeline.rl.trainer import PtxBatches, RLTrainer
from pipeline.training.hf import precision_flags


def prompt_batch(prompts: list, update: int, per_process: int, rank: int, world: int, seed: int) -> list:
    """This process's prompts for ``update``: a pure function of the update number, so a
    resumed run sees exactly the batches an uninterrupted one would.

    The prompts are read epoch after epoch, each epoch in its own seeded order; a batch
    that straddles two epochs takes the end of one order and the start of the next.
    """
    n, global_batch = len(prompts), per_process * world
    orders: dict[int, list[int]] = {}

    def order(epoch: int) -> list[int]:
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(seed + epoch).shuffle(orders[epoch])
        return orders[epoch]

    idx = [order(k // n)[k % n] for k in range(update * global_batch, (update + 1) * global_batch)]
    return [prompts[i] for i in idx[rank::world]]


def accelerator_for(precision: str) -> Accelerator:
    """An Accelerator in ``precision``, even where an earlier stage of this process (``make
    pipeline``, HF Trainer's accelerator in sft / rm) left accelerate's process-wide state in
    another: that state is reset first. Only the mixed-precision part (AcceleratorState) is reset;
    PartialState, which holds the device and any process group, is kept, and in a multi-process
    run accelerate's own error stands."""
    flags = precision_flags(precision)
    mixed = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed) != mixed and state.get("num_processes", 1) == 1 \
            and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed)


def ptx_batches(cfg: DictConfig, fmt, data: DataReport | None = None) -> PtxBatches:
    """PPO-ptx's pretraining text (``data.pretrain``: rows with a ``text`` field), packed."""
    texts = [r["text"] for r in load_validated([cfg.data.pretrain], cfg.data.hub_split, text_row, cfg.data.columns,
                                               cfg.data.bad_rows, data)]
    return PtxBatches(pack_corpus(texts, fmt.tokenizer), cfg.ppo.ptx_block_size, cfg.ppo.ptx_batch_size, cfg.seed)


def fit_to_card(cfg: DictConfig, base: str, ranks: tuple[int, int], fmt, rows: list[dict], say=print) -> DictConfig:
    """``cfg.ppo`` with ``ppo.micro_batch_size`` / ``ppo.generation_batch_size`` = auto resolved for the
    longest prompt of ``rows`` (on CUDA the largest that fit the free memory; on CPU the minibatch and
    the rollout batch), refusing a configuration whose predicted peak is over the card: before any
    weight loads (pipeline/plan/fit.py). ``base``: the base model's folder or hub id."""
    prompt = max((len(fmt.prompt_ids(r["messages"])) for r in rows), default=1)
    ppo, notes = fit_ppo(cfg, base, prompt, ranks)
    for note in notes:
        say(note)
    return ppo


def run(cfg: DictConfig) -> dict:
    check_config(cfg)
    acc = accelerator_for(cfg.ppo.precision)
    torch.set_num_threads(cfg.num_threads)
    out_dir, stage, k = output_run_dir(cfg), cfg.algorithm.name, cfg.algorithm.samples_per_prompt

    # --- parents, prompts and reward sources: checked before any model loads ---
    sft = find_parent(cfg.paths.run_dir, "sft", cfg.parents.sft)
    rm = find_parent(cfg.paths.run_dir, "rm", cfg.parents.rm)
    require_built_on(rm, sft)  # the RM scores for the SFT model it was trained on
    check_rm_accuracy(rm, cfg.reward)
    fmt = load_sft_tokenizer(sft)
    data = DataReport()  # bad rows skipped (data.bad_rows) and merged turns, by reason
    rows = load_validated(cfg.data.ppo_prompts, cfg.data.hub_split, prompt_row, cfg.data.columns, cfg.data.bad_rows,
                          data)
    reward_fn = build_reward_fn(cfg.reward, rm.metrics)
    ptx = ptx_batches(cfg, fmt, data) if cfg.algorithm.ptx_coef > 0 else None
    ppo = fit_to_card(cfg, base_source_for(sft), adapter_ranks(sft, rm), fmt, rows, acc.print)  # auto, and fits

    # --- one base, every role: SFT (policy init, reference), RM (reward, value init) ---
    seed_everything(cfg.seed)  # the same initial weights in every process
    value_init = cfg.ppo.value_init if cfg.algorithm.advantage == "gae" else None
    model = SharedBaseActorCritic.from_artifacts(sft, rm, cfg.model, fmt, value_init,
                                                 reward_scale(cfg.reward, rm.metrics)).to(acc.device)
    trainer = RLTrainer(model, fmt, ppo, cfg.algorithm, acc, reward_fn, ptx, cfg.reward.sharpen)
    seed_everything(cfg.seed + acc.process_index)  # each process samples its own responses
    acc.print(f"{stage}: sampler {trainer.sampler.kind} (ppo.sampler={cfg.ppo.sampler})")

    # --- resume from the last checkpoint of an interrupted run ---
    config = resolved(cfg)
    ckpts = Checkpoints(Path(out_dir) / ".work" / stage / "checkpoints", config_hash(config, [sft, rm]), acc)
    history, run_id = ckpts.resume(model, trainer) if cfg.resume else ckpts.start_over()
    if trainer.update:
        acc.print(f"{stage}: resuming from update {trainer.update}/{cfg.ppo.total_updates}")
    snaps = Snapshots(Path(out_dir) / ".work" / stage / "snapshots", cfg.ppo.snapshot_every, trainer.update,
                      acc.is_main_process)  # ppo.snapshot_every: policy adapters for eval's curve

    # --- train ---
    tracker = start_tracking(cfg, stage, run_id) if acc.is_main_process else Tracker(None)
    bar = tqdm(range(trainer.update, cfg.ppo.total_updates), initial=trainer.update,
               total=cfg.ppo.total_updates, disable=not acc.is_main_process, desc=stage)
    last = time.perf_counter()
    for update in bar:
        batch = prompt_batch(rows, update, cfg.ppo.rollout_batch_size // k, acc.process_index,
                             acc.num_processes, cfg.seed)
        batch = [row for row in batch for _ in range(k)]  # a prompt's k samples side by side
        metrics, rollout, texts = trainer.step([r["prompt"] for r in batch], [r["messages"] for r in batch])
        history.append(metrics)
        bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
        if update % cfg.log_every == 0:
            tracker.log(metrics, step=trainer.update)
        if update % cfg.table_every == 0:
            log_samples(tracker, [r["prompt"] for r in batch], texts, rollout, cfg.logger.num_samples,
                        trainer.update)
        # The loop's whole pass but the checkpoint (rollout, update, metrics, logging), in the history
        # only: the span a benchmark compares with another trainer's update-to-update stamps.
        history[-1]["time/loop"] = time.perf_counter() - last
        snaps.maybe_save(trainer.update, model)  # before the checkpoint: a resume never skips one
        if trainer.update % cfg.checkpoint_every == 0 and trainer.update < cfg.ppo.total_updates:
            ckpts.save(trainer.update, model, trainer, history, run_id)
        health.check(metrics, dict(cfg.health.thresholds), list(cfg.health.abort_on), trainer.update, bar.write)
        last = time.perf_counter()

    # --- save: policy adapter (+ value adapter and head), history ---
    trainer.check_replicas_in_sync()
    final = {**summarise(history, cfg.summary_window), **data.metrics()}
    if acc.is_main_process:
        with staged_artifact(out_dir, stage, config, parent=rm) as art:
            model.save_final(art.dir, fmt)
            (art.dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            art.metrics = {**final, **snaps.copy_into(art.dir, history)}  # + metrics.snapshots
        snaps.remove()
        ckpts.remove()  # the artifact supersedes them
        acc.print(f"{stage}: {trainer.update} updates, score {final['objective/scores']:.3f}, "
                  f"KL {final['objective/kl']:.3f}, stop rate {final['rollout/eos_rate']:.1%}")
        tracker.summary(final)
        tracker.log_artifact(art.artifact)
        tracker.finish()
    acc.wait_for_everyone()
    return final


def summarise(history: list[dict], window: int) -> dict:
    """Final metrics: the mean of the last ``window`` updates (single updates are noisy)."""
    tail = history[-window:]
    out = {k: sum(h[k] for h in tail) / len(tail) for k in tail[0]} if tail else {}
    if tail:  # counters are not averaged
        out.update({k: tail[-1][k] for k in ("ppo/update", "ppo/episodes")})
    out["updates"] = len(history)
    return out


def log_samples(tracker: Tracker, prompts, texts, rollout, n: int, step: int) -> None:
    kl = rollout.kl.sum(1).tolist()
    rows = [[str(p), t, s, k] for p, t, s, k in zip(prompts, texts, rollout.scores.tolist(), kl)][:n]
    tracker.table(f"samples/update_{step}", ["prompt", "response", "score", "kl"], rows)


@hydra.main(version_base="1.3", config_path="../conf", config_name="ppo")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
