"""GRPO baseline: TRL 1.16.0's `trl.GRPOTrainer` on a spec'd workload.

Runs in the TRL 1.16 env (bench/trl_env.py, bench/.venv-trl116), never the project's, and imports
nothing from the project:

    bench/.venv-trl116/bin/python bench/trl_grpo_baseline.py spec.json out.json

spec.json: policy_dir (merged SFT causal LM with tokenizer, chat template, pad != eos), reward_dir
(merged reward model, num_labels=1, same tokenizer), prompts (user turns), rollout_batch_size
(completions per update), samples_per_prompt, minibatch_size, ppo_epochs, max_new_tokens, lora_r,
lora_alpha, lora_target, kl_coef, temperature, total_updates, warmup_updates, num_threads, seed,
stop_token_ids, learning_rate, output_dir; optional: scale_rewards (group unless given: TRL's
names, which our algorithm.scale_by_std shares), and (bench/gpu.py) dtype (float32 unless given: the
weights' dtype and, for bfloat16, TRL's bf16 autocast), micro_batch_size (completions per forward
pass, the minibatch unless given: per_device_train_batch_size, with gradient_accumulation_steps =
minibatch / micro and steps_per_generation = rollout / micro), gradient_checkpointing (false unless
given).

Batch shape. One update of ours = rollout_batch_size completions (rollout_batch_size /
samples_per_prompt prompts, samples_per_prompt each), sampled and scored once, then ppo_epochs
passes over rollout_batch_size / minibatch_size minibatches, one optimizer step each. TRL 1.16's
GRPO arithmetic (GRPOConfig.__post_init__, GRPOTrainer._prepare_inputs / _get_train_sampler): a
micro-batch is per_device_train_batch_size completions, an optimizer step takes
gradient_accumulation_steps micro-batches, and completions are generated for
generation_batch_size = per_device_train_batch_size * steps_per_generation at once, every
steps_per_generation * num_iterations micro-batches; the buffered generation batch is shuffled
once, cut into steps_per_generation slices, and the slices are reused in order (0, 1, 0, 1, ...)
num_iterations times. So:

    num_generations             = samples_per_prompt                  (4)
    per_device_train_batch_size = minibatch_size                      (32: one step's completions)
    gradient_accumulation_steps = 1                                   (every micro-batch is a step)
    steps_per_generation        = rollout_batch_size / minibatch_size (2 -> generation_batch_size 64)
    num_iterations              = ppo_epochs                          (2)
    max_steps                   = total_updates * steps_per_generation * num_iterations

which gives one generation of rollout_batch_size completions per update and
steps_per_generation * num_iterations (4) optimizer steps of minibatch_size completions, as ours.
(Ours reshuffles the minibatches every epoch; TRL shuffles the generation batch once.)

The objective, and what differs from ours (algorithm=grpo, its defaults):
  - advantages: both centre the task reward within the group and divide by the unbiased std
    (+ 1e-4) that algorithm.scale_by_std names, the group's or the whole batch's (the spec's
    scale_rewards, TRL's names: group | batch | none). Ours then subtracts beta (KL_i - mean_g KL) with
    the sequence KL of the rollout (KL as a reward penalty, algorithm.kl_in=reward); TRL puts
    beta * k3(pi || pi_ref) per token in the loss with its gradient (times the importance ratio,
    use_bias_correction_kl). Ours also takes the missing-EOS penalty (ppo.missing_eos_penalty) off
    the score of responses without a stop token and normalises the RM score by the RM artifact's
    reference statistics; TRL uses the raw RM logit.
  - loss: the same clipped surrogate (epsilon 0.2) averaged over the minibatch's tokens (ours
    loss_agg=token_mean, TRL loss_type="dapo").
  - work per update, the same on both sides: sampling rollout_batch_size completions (TRL:
    `model.generate`, ours: our KV-cached sampler), one reference log-prob pass (TRL: the policy
    with its LoRA disabled, ours: the reference role), one RM pass, steps_per_generation *
    num_iterations forward+backward passes over minibatch_size completions. One difference:
    TRL computes the rollout policy's log-probs with one more forward pass over the generation
    batch (`old_per_token_logps`, needed when num_iterations > 1); ours records them while sampling
    (ppo.old_logprobs=sampler, its default; bench/grpo.py also reports ours with
    ppo.old_logprobs=recompute, which adds that pass). TRL also computes the entropy of every
    completion token in each training forward (its fused LM head), ours in the sampler.
  - fp32 (TRL defaults to bf16), no activation checkpointing (TRL defaults to it), constant LR,
    top_k 0 / top_p 1 sampling at temperature T, no vLLM, no evaluation, no checkpoints, no loggers.

Timing: a callback stamps on_train_begin and every on_step_end (one per optimizer step, after
the step, before the Trainer's logging); the stamps of every (steps_per_generation *
num_iterations)-th step bracket one update (generation and scoring, the optimizer steps, and
TRL's metric gathering and logging, which falls in the next span); model loading and trainer
construction fall before on_train_begin. The time spent in `_generate_single_turn` (sampling)
and `_generate_and_score_completions` (sampling plus the old-log-prob, reference and reward
passes) is measured by wrapping those two methods on the instance.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    TrainerCallback,
)
from trl import GRPOConfig, GRPOTrainer

# TRL's per-step metrics worth carrying into out.json.
TRL_METRICS = ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "completions/clipped_ratio",
               "frac_reward_zero_std", "clip_ratio/region_mean", "learning_rate", "loss")


class StepClock(TrainerCallback):
    """Wall-clock stamps at the start of training and at the end of every optimizer step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def update_seconds(self, steps_per_update: int) -> list[float]:
        ends = self.stamps[::steps_per_update]
        return [b - a for a, b in zip(ends, ends[1:])]


def timed(owner, name: str, log: list[float]) -> None:
    """Replace the bound method ``owner.name`` with one that appends its wall time to ``log``."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            log.append(time.perf_counter() - t)

    setattr(owner, name, wrapper)


def main(spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    rollout, k, minibatch = spec["rollout_batch_size"], spec["samples_per_prompt"], spec["minibatch_size"]
    if rollout % minibatch or rollout % k:
        raise SystemExit(f"rollout_batch_size {rollout} must be a multiple of minibatch_size {minibatch} "
                         f"and samples_per_prompt {k}")
    if minibatch % k:
        # TRL shuffles the generation batch before cutting it into steps, so any multiple works for
        # the loss; the check keeps the shape the same as ours (whole groups per step on average).
        print(f"[trl-grpo-baseline] note: minibatch {minibatch} is not a multiple of the group size {k}", flush=True)
    if len(spec["prompts"]) < rollout // k:
        raise SystemExit(f"{len(spec['prompts'])} prompts cannot fill one update of {rollout // k}")
    if spec["warmup_updates"] >= spec["total_updates"]:
        raise SystemExit("warmup_updates must leave at least one timed update")
    torch.set_num_threads(spec["num_threads"])
    transformers.set_seed(spec["seed"])
    micro = spec.get("micro_batch_size", minibatch)
    if minibatch % micro:
        raise SystemExit(f"micro_batch_size {micro} must divide minibatch_size {minibatch}")
    dtype = getattr(torch, spec.get("dtype", "float32"))
    checkpointing = bool(spec.get("gradient_checkpointing", False))
    steps_per_generation = rollout // micro  # micro-batches per generation
    steps_per_update = rollout // minibatch * spec["ppo_epochs"]  # optimizer steps per generation

    tokenizer = AutoTokenizer.from_pretrained(spec["policy_dir"])
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in spec["stop_token_ids"]:
        # TRL pads completions and the RM finds its last token by the first pad: pad must not stop.
        raise SystemExit("the policy tokenizer needs a pad token distinct from the stop tokens")
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype=dtype)
    # Sampling must be exactly the spec's (temperature, top_k=0, top_p=1, the stop tokens): drop
    # whatever the SFT export saved (repetition penalty, min length, ...). GRPOTrainer reads its
    # stop ids from generation_config.eos_token_id (plus the tokenizer's eos).
    policy.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=list(spec["stop_token_ids"]))
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1,
                                                                dtype=dtype).eval()
    reward_tokenizer = AutoTokenizer.from_pretrained(spec["reward_dir"])

    config = GRPOConfig(
        output_dir=spec["output_dir"],
        seed=spec["seed"],
        # Batch shape: see the module docstring.
        num_generations=k,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=minibatch // micro,
        steps_per_generation=steps_per_generation,
        num_iterations=spec["ppo_epochs"],
        max_steps=spec["total_updates"] * steps_per_update,
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_k=0,
        top_p=1.0,
        beta=spec["kl_coef"],  # fixed; TRL has no adaptive controller
        epsilon=0.2,  # ours: ppo.clip_range
        scale_rewards=spec.get("scale_rewards", "group"),  # ours: algorithm.scale_by_std, the same names
        loss_type="dapo",  # token mean over the step's completions, as ours (loss_agg=token_mean)
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        # fp32 (TRL's default is bf16=True) and no activation checkpointing (TRL's default is on;
        # given under transformers 5's name, gradient_checkpointing mirrors it), unless the spec asks.
        bf16=dtype == torch.bfloat16 and torch.cuda.is_available(),  # a bf16 model on CPU runs without autocast
        fp16=False,
        activation_checkpointing=checkpointing,
        disable_dropout=True,  # ours runs every role without dropout
        use_vllm=False,
        # Metrics once per update (TRL averages them over logging_steps optimizer steps); nothing else:
        # no completions table, no checkpoints, no loggers, no progress bar.
        logging_steps=steps_per_update,
        log_completions=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    clock = StepClock()
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in spec["prompts"]]})
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
        callbacks=[clock],
        peft_config=LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"],
                               target_modules=spec["lora_target"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    if bool(trainer.args.gradient_checkpointing) != checkpointing or trainer.ref_model is not None:
        raise SystemExit(f"expected activation checkpointing {checkpointing} and the reference as the "
                         "adapter-disabled policy")
    sample_s, rollout_s = [], []
    timed(trainer, "_generate_single_turn", sample_s)
    timed(trainer, "_generate_and_score_completions", rollout_s)
    trainer.train()

    seconds = clock.update_seconds(steps_per_update)
    warm = spec["warmup_updates"]
    timed_s = seconds[warm:]
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    adam_state = next(iter(trainer.optimizer.optimizer.state.values()))  # one step per minibatch
    n = len(timed_s)
    result = {
        "num_updates": len(seconds),
        "timed_updates": n,
        "generations": len(rollout_s),
        "episodes_per_s": rollout * n / sum(timed_s),
        "update_s": sum(timed_s) / n,
        "sample_s": sum(sample_s[warm:]) / n,
        "score_s": sum(r - s for r, s in zip(rollout_s[warm:], sample_s[warm:])) / n,
        "optimise_s": sum(t - r for t, r in zip(timed_s, rollout_s[warm:])) / n,
        "update_seconds": seconds,
        "optimizer_steps": int(adam_state["step"]),
        "response_tokens": sum(e["completions/mean_length"] for e in logs[warm:]) / max(1, len(logs[warm:])),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "peak_cuda_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else None,
        "device": str(trainer.accelerator.device),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "stop_token_ids": trainer.eos_token_ids,
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "trl_metrics_first": {key: logs[0][key] for key in TRL_METRICS if key in logs[0]} if logs else {},
        "trl_metrics_last": {key: logs[-1][key] for key in TRL_METRICS if key in logs[-1]} if logs else {},
    }
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[trl-grpo-baseline] {result['num_updates']} updates ({result['generations']} generations, "
          f"{result['optimizer_steps']} optimizer steps), {result['episodes_per_s']:.2f} episodes/s over {n} timed, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB -> {out_path}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: trl_grpo_baseline.py spec.json out.json")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
