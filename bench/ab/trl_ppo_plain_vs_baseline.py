"""Issue 21 item 12: is bench/trl_baseline.py slower than a plain PPOTrainer script? Same-process A/B on
bench/ppo.py case (b): trl_baseline.py's PPOConfig vs a default PPOConfig (the workload only), one update
each, alternating. Run in the TRL 1.12 env on the spec bench/ppo.py writes for (b):

    bench/.venv-trl112/bin/python bench/ab/trl_ppo_plain_vs_baseline.py spec.json ROUNDS

Results: bench/results/trl-ppo-plain-vs-baseline-2core-cpu.txt."""
import json, sys, tempfile, time
from pathlib import Path
import torch, transformers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for trl_baseline
import trl_baseline as tb
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig
from trl.experimental.ppo import PPOConfig, PPOTrainer
spec = json.load(open(sys.argv[1])); rounds = int(sys.argv[2])
torch.set_num_threads(2); transformers.set_seed(0)
tok = AutoTokenizer.from_pretrained(spec["policy_dir"], padding_side="left")
ds = tb.prompt_dataset(tok, spec["prompts"])
lora = lambda: LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
work = dict(seed=0, per_device_train_batch_size=64, gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=2,
            total_episodes=64 * 100, response_length=24, temperature=1.0, kl_coef=0.2, learning_rate=5e-4)
def build(name, extra, base_gencfg):
    p = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype=torch.float32)
    if base_gencfg:
        p.generation_config = GenerationConfig(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    r = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1, dtype=torch.float32)
    v = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1, dtype=torch.float32)
    t = PPOTrainer(args=PPOConfig(output_dir=tempfile.mkdtemp(prefix=f"ab-{name}-"), **work, **extra), processing_class=tok, model=p,
                   ref_model=None, reward_model=r, value_model=v, train_dataset=ds, peft_config=lora())
    print(name, "mp", t.accelerator.mixed_precision, "gc", t.policy_model.is_gradient_checkpointing, "stop", t.stop_token_id, flush=True)
    return t
A = build("baseline", dict(stop_token_id=1, missing_eos_penalty=1.0, kl_estimator="k1", whiten_rewards=False,
                            lr_scheduler_type="constant", bf16=False, fp16=False, activation_checkpointing=False,
                            num_sample_generations=0, save_strategy="no", report_to="none", disable_tqdm=True), True)
B = build("plain", dict(bf16=False), False)
res = {"baseline": [], "plain": []}
for r in range(rounds):
    for name, t in (("baseline", A), ("plain", B)) if r % 2 == 0 else (("plain", B), ("baseline", A)):
        t.args.num_total_batches = 1
        w, c = time.perf_counter(), time.process_time()
        t.train()
        res[name].append((time.perf_counter() - w, time.process_time() - c))
        print(f"round {r} {name}: wall {res[name][-1][0]:.1f}s cpu {res[name][-1][1]:.1f}s  load {open('/proc/loadavg').read().split()[0]}", flush=True)
for name, v in res.items():
    ws = [x[0] for x in v[1:]]; cs = [x[1] for x in v[1:]]
    print(f"{name}: timed {len(ws)} updates, wall {ws} -> {64 * len(ws) / sum(ws):.2f} eps/s; cpu -> {64 * len(cs) / sum(cs):.2f} eps/cpu-s", flush=True)
