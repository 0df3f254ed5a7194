"""Stage 3 of InstructGPT: PPO against the reward model, KL-anchored to the SFT policy.

    maximise  E[ r(x, y) - beta * KL(pi(.|x) || pi_SFT(.|x)) ]

with the clipped PPO objective (Schulman et al. 2017), GAE advantages, a per-token KL
penalty (k1 or k3) under a fixed or adaptive coefficient (Ziegler et al. 2019), all four
models as LoRA adapters on one frozen base (pipeline/rl/shared_model.py).

    make ppo
    make ppo ARGS="ppo.total_updates=100 ppo.kl.controller=fixed ppo.kl.init_coef=0.1"
    make ppo ARGS="+reward.sources.gold='{_target_: pipeline.rl.rewards.GoldJudgeReward, weight: 1.0, seed: 0, n_entities: 40, n_unknown: 40}'"
    accelerate launch --multi_gpu --num_processes 2 -m stages.ppo   # data parallel (GPUs, or
                                                                    # CPU processes on gloo)

A killed run resumes from its last checkpoint when rerun with the same config.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from tqdm import tqdm

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.artifacts import find_parent, require_built_on, staged_artifact
from pipeline.data import load_validated, prompt_row
from pipeline.reward import load_sft_tokenizer
from pipeline.rl.checkpoint import config_hash, latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.rl.ppo import PPOTrainer, check_config
from pipeline.rl.rewards import build_reward_fn
from pipeline.rl.shared_model import SharedBaseActorCritic
from pipeline.runtime import PipelineError, output_run_dir, resolved, seed_everything, user_errors
from pipeline.tracking import Tracker, start_tracking
from pipeline.training import precision_flags


def prompt_batch(prompts: list[str], update: int, per_process: int, rank: int, world: int, seed: int) -> list[str]:
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
    flags = precision_flags(precision)
    mixed = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no"
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed)


def run(cfg: DictConfig) -> dict:
    check_config(cfg)
    acc = accelerator_for(cfg.ppo.precision)
    torch.set_num_threads(cfg.num_threads)
    out_dir = output_run_dir(cfg)

    # --- parents, prompts and reward sources: checked before any model loads ---
    sft = find_parent(cfg.paths.run_dir, "sft", cfg.parents.sft)
    rm = find_parent(cfg.paths.run_dir, "rm", cfg.parents.rm)
    require_built_on(rm, sft)  # the RM scores for the SFT model it was trained on
    prompts = [r["prompt"] for r in load_validated(cfg.data.ppo_prompts, cfg.data.hub_split, prompt_row)]
    reward_fn = build_reward_fn(cfg.reward, rm.metrics)

    # --- one base, four roles: SFT (policy init, reference), RM (reward, value init) ---
    seed_everything(cfg.seed)  # the same initial weights in every process
    tokenizer = load_sft_tokenizer(sft)
    model = SharedBaseActorCritic.from_artifacts(sft, rm, cfg.model, tokenizer, cfg.ppo.value_init).to(acc.device)
    trainer = PPOTrainer(model, tokenizer, cfg.ppo, acc, reward_fn)
    seed_everything(cfg.seed + acc.process_index)  # each process samples its own responses

    # --- resume from the last checkpoint of an interrupted run ---
    config = resolved(cfg)
    ckpt_root, chash, history = Path(out_dir) / ".work" / "ppo" / "checkpoints", config_hash(config), []
    if not cfg.resume and acc.is_main_process:
        shutil.rmtree(ckpt_root, ignore_errors=True)  # starting over: old checkpoints would mislead a later resume
    last = latest_checkpoint(ckpt_root) if cfg.resume else None
    if last is not None:
        try:
            history = load_checkpoint(last, model, trainer, chash, acc)
        except ValueError as e:
            raise PipelineError(str(e)) from e
        acc.print(f"ppo: resuming from {last} (update {trainer.update}/{cfg.ppo.total_updates})")

    # --- train ---
    tracker = start_tracking(cfg, "ppo") if acc.is_main_process else Tracker(None)
    bar = tqdm(range(trainer.update, cfg.ppo.total_updates), initial=trainer.update,
               total=cfg.ppo.total_updates, disable=not acc.is_main_process, desc="ppo")
    for update in bar:
        batch = prompt_batch(prompts, update, cfg.ppo.rollout_batch_size, acc.process_index,
                             acc.num_processes, cfg.seed)
        metrics, rollout, texts = trainer.step(batch)
        history.append(metrics)
        bar.set_postfix(reward=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
        if update % cfg.log_every == 0:
            tracker.log(metrics, step=trainer.update)
        if update % cfg.table_every == 0:
            log_samples(tracker, batch, texts, rollout, cfg.logger.num_samples, trainer.update)
        if trainer.update % cfg.checkpoint_every == 0 and trainer.update < cfg.ppo.total_updates:
            save_checkpoint(ckpt_root, trainer.update, model, trainer, history, chash, acc)

    # --- save: policy adapter, value adapter + head, history ---
    trainer.check_replicas_in_sync()
    final = summarise(history, cfg.summary_window)
    if acc.is_main_process:
        with staged_artifact(out_dir, "ppo", config, parent=rm) as art:
            model.save_final(art.dir, tokenizer)
            (art.dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            art.metrics = final
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the artifact supersedes them
        acc.print(f"ppo: {trainer.update} updates, score {final['objective/scores']:.3f}, "
                  f"KL {final['objective/kl']:.3f}, EOS rate {final['rollout/eos_rate']:.1%}")
        tracker.summary(final)
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
    rows = [[p, t, s, k] for p, t, s, k in zip(prompts, texts, rollout.scores.tolist(), kl)][:n]
    tracker.table(f"samples/update_{step}", ["prompt", "response", "score", "kl"], rows)


@hydra.main(version_base="1.3", config_path="../conf", config_name="ppo")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
