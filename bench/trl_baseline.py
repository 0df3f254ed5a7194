"""PPO baseline: TRL 1.12.0's `trl.experimental.ppo.PPOTrainer` on a spec'd workload.

Runs in the TRL 1.12 env (bench/trl_env.py), never the project's, and imports nothing from the
project:

    bench/.venv-trl112/bin/python bench/trl_baseline.py spec.json out.json

spec.json: policy_dir (merged SFT causal LM with tokenizer, chat template, pad != eos),
reward_dir (merged reward model, num_labels=1), prompts, rollout_batch_size, minibatch_size,
ppo_epochs, max_new_tokens, lora_r, lora_alpha, lora_target, kl_coef, temperature,
total_updates, warmup_updates, num_threads, seed, stop_token_ids, learning_rate,
missing_eos_penalty, output_dir; optional value_lora (true: the value model gets the policy's LoRA
and only it and the score head train, the like-for-like variant; TRL's own design trains it whole).

One TRL update = one rollout of rollout_batch_size prompts, then ppo_epochs passes over
rollout_batch_size / minibatch_size shuffled minibatches, one optimizer step each. TRL's batch
arithmetic (PPOTrainer.__init__): local_batch_size = per_device_train_batch_size *
gradient_accumulation_steps, local_mini_batch_size = local_batch_size / num_mini_batches, and the
training loop cuts each minibatch into micro batches of per_device_train_batch_size inside
`accelerator.accumulate`, whose optimizer only steps every gradient_accumulation_steps-th micro
batch. Hence gradient_accumulation_steps=1 and per_device_train_batch_size=rollout_batch_size:
the micro-batch slice `mini_batch_inds[0:per_device_train_batch_size]` is then the whole
minibatch and every minibatch gets its own step. (per_device_train_batch_size=minibatch_size
with gradient_accumulation_steps=2 would silently accumulate two minibatches into one step.)

Timing: a callback stamps on_train_begin and every on_step_end. TRL calls on_step_end once per
update, after the optimizer steps, the metrics and the scheduler step, so consecutive stamps
bracket exactly one pass of its update loop (rollout + PPO epochs + its per-update cleanup);
model loading and trainer construction fall before on_train_begin and are not timed.

Fastest honest configuration (issue 21 item 12). Against a plain PPOTrainer script (default
PPOConfig but the workload; bf16=False, since bf16 raises on a CPU-only machine and, under
transformers 5, never reaches PPOTrainer's own Accelerator anyway), on case (b), one process, the
two alternating one update at a time on an idle 2-core CPU: this configuration ran 2.21 episodes/s,
the plain one 1.96 (4 timed updates each; bench/ab/trl_ppo_plain_vs_baseline.py,
bench/results/trl-ppo-plain-vs-baseline-2core-cpu.txt). Checked one by one and found free: the
stop token and missing-EOS penalty (random weights never stop, so generation runs all 24 tokens
either way), the replaced generation config, the prompt encoding (the same ids as ppo_tldr's
``apply_chat_template(tokenize=True)``), the callback and logging (< 0.01 s an update); gradient
checkpointing is never enabled by 1.12's PPOTrainer. A 2.70 episodes/s plain run could not be
reproduced.
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
from peft import LoraConfig, inject_adapter_in_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer

# TRL's own per-update metrics worth carrying into out.json (its `eps` counts from the first
# update including warm-up, so episodes_per_s below is the figure to compare).
TRL_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
               "loss/value_avg", "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/num_eos_tokens",
               "lr", "episode", "eps")


class UpdateClock(TrainerCallback):
    """Wall-clock stamps at the start of training and at the end of every PPO update."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def update_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def prompt_dataset(tokenizer, prompts: list[str]) -> Dataset:
    """Each prompt as one user turn with the generation prompt, tokenised without extra specials."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return Dataset.from_dict({"input_ids": ids})


def lora_value_model(value, spec: dict):
    """The like-for-like variant: TRL's value model with the policy's LoRA (same r, alpha, target
    modules) injected in place and everything else frozen but the score head, as our value
    adapter is. TRL's own design trains the whole value model under AdamW (``peft_config`` wraps
    only the policy); injecting in place keeps the module layout PolicyAndValueWrapper reads
    (``value_model.<base_model_prefix>`` and ``value_model.score``)."""
    value = inject_adapter_in_model(LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"],
                                               target_modules=spec["lora_target"], lora_dropout=0.0), value)
    for name, param in value.named_parameters():
        param.requires_grad = "lora_" in name or name.startswith("score.")
    return value


def main(spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    rollout, minibatch = spec["rollout_batch_size"], spec["minibatch_size"]
    if rollout % minibatch:
        raise SystemExit(f"rollout_batch_size {rollout} is not a multiple of minibatch_size {minibatch}")
    if len(spec["prompts"]) < rollout:
        # TRL's dataloader drops the last ragged batch: fewer prompts than one rollout would
        # leave it with no batch at all and its repeat-forever iterator would spin.
        raise SystemExit(f"{len(spec['prompts'])} prompts cannot fill one rollout of {rollout}")
    if spec["warmup_updates"] >= spec["total_updates"]:
        raise SystemExit("warmup_updates must leave at least one timed update")
    torch.set_num_threads(spec["num_threads"])
    transformers.set_seed(spec["seed"])  # PPOTrainer seeds only its dataloader; this covers LoRA's init

    # TRL pads queries with the tokenizer and strips pads itself, so queries must be left-padded.
    tokenizer = AutoTokenizer.from_pretrained(spec["policy_dir"], padding_side="left")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # TRL finds response ends by the first pad token: pad == eos would cut at the EOS itself.
        raise SystemExit("the policy tokenizer needs a pad token distinct from eos")
    if spec["missing_eos_penalty"] is not None and spec["stop_token_ids"][0] != tokenizer.eos_token_id:
        # TRL stops at stop_token_id but penalises responses lacking tokenizer.eos_token_id.
        print(f"[trl-baseline] note: stop token {spec['stop_token_ids'][0]} is not eos {tokenizer.eos_token_id}: "
              "TRL applies missing_eos_penalty to every response", flush=True)
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype=torch.float32)
    # Sampling must be exactly TRL's (temperature, top_k=0, top_p=1): drop whatever the SFT
    # export saved (repetition penalty, min length, ...). TRL sets eos from stop_token_id.
    # Costs nothing: the same generate call timed 30.7 s with the export's config, 30.9 s with this.
    policy.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id,
                                                bos_token_id=tokenizer.bos_token_id)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1,
                                                                dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1,
                                                               dtype=torch.float32)
    if spec.get("value_lora"):
        value = lora_value_model(value, spec)

    config = PPOConfig(
        output_dir=spec["output_dir"],
        seed=spec["seed"],
        # Batch shape: see the module docstring.
        per_device_train_batch_size=rollout,
        gradient_accumulation_steps=1,
        num_mini_batches=rollout // minibatch,
        num_ppo_epochs=spec["ppo_epochs"],
        # The whole rollout in one generate call and one chunk for the ref/value/reward passes.
        local_rollout_forward_batch_size=rollout,
        # num_total_batches = ceil(total_episodes / batch_size): exactly total_updates updates.
        total_episodes=spec["total_updates"] * rollout,
        response_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        # TRL takes a single stop id (also used as generation's eos); the spec's first one. Part of
        # the workload (truncation and the missing-EOS penalty, as ours), and free: generation with
        # eos=None and eos=1 ran the same 64x24 tokens in 30.7 vs 30.9 s with identical profiles.
        stop_token_id=spec["stop_token_ids"][0],
        missing_eos_penalty=spec["missing_eos_penalty"],
        kl_coef=spec["kl_coef"],  # TRL's kl_coef is fixed (no adaptive controller in 1.12)
        kl_estimator="k1",
        whiten_rewards=False,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",  # TRL default "linear" would decay to 0 over total_updates
        # fp32, as ours. TRL's default bf16=True is not a faster option here: under transformers 5
        # TrainingArguments no longer exports ACCELERATE_MIXED_PRECISION, so PPOTrainer's own
        # Accelerator() runs mixed_precision "no" whatever bf16 says (checked: bf16=True with
        # use_cpu=True gives accelerator.mixed_precision "no", fp32 weights; bf16=True without
        # use_cpu raises on a CPU-only machine). TRL also defaults gradient_checkpointing=True, but
        # 1.12's PPOTrainer bypasses Trainer's setup and never enables it (is_gradient_checkpointing
        # stays False); stated off (under transformers 5's name, which avoids the deprecation
        # warning) so the args record what runs. bf16 would be a precision change, not adopted.
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        # Nothing but the training loop: no sample generations (a near-greedy pass over the eval
        # set plus a printed table; 1.12 also skips it without an eval set, and PPOTrainer never
        # evaluates), no checkpoints (default: every 500 updates), no loggers, no progress bar.
        # All four are no-ops at the bench's 4-12 updates (measured: logging < 0.01 s per update);
        # set so that a longer run does not start paying for them.
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    clock = UpdateClock()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,  # with peft_config the reference is the policy with its adapter disabled
        reward_model=reward,
        train_dataset=prompt_dataset(tokenizer, spec["prompts"]),
        value_model=value,
        callbacks=[clock],
        peft_config=LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"],
                               target_modules=spec["lora_target"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    trainer.train()

    seconds = clock.update_seconds()
    timed = seconds[spec["warmup_updates"]:]
    logs = [entry for entry in trainer.state.log_history if "objective/kl" in entry]
    # Adam's per-parameter step counter: proves one optimizer step per minibatch.
    adam_state = next(iter(trainer.optimizer.optimizer.state.values()))
    result = {
        "num_updates": len(seconds),
        "timed_updates": len(timed),
        "episodes_per_s": rollout * len(timed) / sum(timed),
        "update_seconds": seconds,
        "optimizer_steps": int(adam_state["step"]),
        "stop_token_id": config.stop_token_id,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "device": str(trainer.accelerator.device),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "trl_metrics_first": {k: logs[0][k] for k in TRL_METRICS if k in logs[0]},
        "trl_metrics_last": {k: logs[-1][k] for k in TRL_METRICS if k in logs[-1]},
    }
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[trl-baseline] {result['num_updates']} updates, {result['episodes_per_s']:.2f} episodes/s over "
          f"{len(timed)} timed, peak RSS {result['peak_rss_mb']:.0f} MB -> {out_path}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: trl_baseline.py spec.json out.json")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
