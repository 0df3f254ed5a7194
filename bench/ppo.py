"""Our RL stage against TRL 1.12's PPOTrainer, side by side: `make bench ARGS=ppo`.

Both run as whole processes, one after the other, on the same base, SFT and RM, the same world
prompts and the same hyperparameters (rollout 64, minibatch 32, 2 PPO epochs, 24 new tokens,
LoRA r 16 on all linear layers, fixed KL coefficient 0.2, T = 1):

    (a) the embedded tiny Llama (the run's `make rm` artifacts, artifacts/default);
    (b) a random Llama of ~36M parameters with a 32k vocabulary (tied), 6 layers, hidden 512,
        built here; random weights rarely stop, so responses run to the full length.

Printed, with ratios: episodes/s of the training loop (the first update of a run is warm-up,
excluded; (a) runs 12 updates, (b) 4, so both time several seconds of work). Both sides time the
same span: from the end of one update to the end of the next (TRL: its on_step_end stamps, which
take in its metrics, logging and empty_cache calls; ours: the stage loop's ``time/loop``, which
takes in the metrics and logging), never model loading;
whole-process peak RSS (and peak CUDA memory on a GPU); for ours also the FLOPs of one update
against the measured matmul peak, the time split of an update (sampling, scoring passes,
optimisation), time per update at 24 / 48 / 96 new tokens with its log-log slope, and PPO (gae)
against RLOO on the same model. TRL 1.12 runs in its own virtualenv (bench/trl_env.py).

What is compared: TRL's PPOTrainer with ``peft_config`` wraps only the policy in LoRA and trains
its value model whole under AdamW (that is TRL's design, and what a TRL user gets), while ours
trains a LoRA value adapter on the shared base. So a second TRL run per model puts TRL's value
model under the same LoRA (r, alpha, all linear layers; score head trained), the like-for-like
figure.

The two sides alternate (ours, TRL, ours, TRL, ...: ``--rounds``) and each figure is the median
over its rounds: on a shared 2-core machine the same run varies by 10-20% from minute to
minute, and alternating keeps that drift out of the ratios.

    make bench ARGS=ppo                 # everything (about 25 minutes on 2 CPU cores)
    make bench ARGS="ppo --models b"    # one model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.flops import matmul_peak, update_flops  # noqa: E402
from bench.trl_env import ensure_trl_env  # noqa: E402

WORK = ROOT / "bench" / ".work"
SHAPE = dict(rollout=64, minibatch=32, epochs=2, new_tokens=24, lora_r=16, lora_alpha=32, kl_coef=0.2,
             temperature=1.0, lr=5e-4)
# algorithm.kl_coef=null: the bench's one beta for every estimator (grpo's own default is another).
# reward.sharpen.coef=0, algorithm.entropy_coef=0: TRL's objective has neither a sharpening term (an add on
# scores already there) nor an entropy term (which costs one more pass over the vocabulary per token).
OURS = ["logger=none", "reward.min_accuracy=0", "ppo.kl.controller=fixed", f"ppo.kl.init_coef={SHAPE['kl_coef']}",
        "algorithm.kl_coef=null", "reward.sharpen.coef=0", "algorithm.entropy_coef=0",
        f"ppo.rollout_batch_size={SHAPE['rollout']}", f"ppo.generation_batch_size={SHAPE['rollout']}",
        f"ppo.minibatch_size={SHAPE['minibatch']}", f"ppo.micro_batch_size={SHAPE['minibatch']}",
        f"ppo.ppo_epochs={SHAPE['epochs']}", f"ppo.temperature={SHAPE['temperature']}",
        f"ppo.learning_rate={SHAPE['lr']}", "ppo.lr_schedule=constant", "checkpoint_every=1000", "num_threads=2"]
# Updates per run, the first warm-up: (a)'s updates take ~1 s, so it runs more of them for a timed
# window (~10 s) long enough that the machine's minute-to-minute drift averages out; (b)'s take ~20 s.
UPDATES = {"a": 12, "b": 4}
BIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
           num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True)


def run_measured(cmd: list[str], env: dict, log: Path, timeout: float | None = None) -> tuple[int, float]:
    """Run ``cmd`` as a child process; (exit code, its peak RSS in MB from wait4). Past ``timeout``
    seconds the child is killed (exit code -9)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return proc.returncode, usage.ru_maxrss / 1024


# --- the chains both sides start from ------------------------------------------------------


def stage(name: str, root: Path, overrides: list[str]) -> None:
    env = {**os.environ, "RLHF_ROOT": str(root), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", f"stages.{name}", *overrides], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench: `{name}` failed:\n{done.stderr[-3000:]}")


def chain_a() -> Path:
    """The embedded world's run (artifacts/default): base, sft and rm from `make rm`."""
    run = ROOT / "artifacts" / "default"
    if not (run / "rm" / "manifest.json").is_file():
        raise SystemExit("bench ppo: model (a) needs the default run's rm artifact: run `make rm` first")
    return ROOT


def chain_b() -> Path:
    """A random 36M Llama with a 32k vocabulary, and SFT / RM adapters one step from it."""
    root = WORK / "model-b"
    if (root / "artifacts/default/rm/manifest.json").is_file() and (root / "base" / "config.json").is_file():
        return root
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok_dir = ROOT / "artifacts/default/base/model"
    if not tok_dir.is_dir():
        raise SystemExit("bench ppo: model (b) borrows the world's tokenizer: run `make base` first")
    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    os.symlink(ROOT / "data" / "world", root / "data" / "world")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BIG, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                         bos_token_id=None))
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model_args = [f"model.path={root / 'base'}", "model.name=random-36m", "logger=none"]
    one_step = ["train.max_steps=1", "train.per_device_train_batch_size=8", "train.eval_steps=0",
                f"lora.r={SHAPE['lora_r']}", f"lora.alpha={SHAPE['lora_alpha']}"]
    stage("sft", root, model_args + one_step + ["data.sft.eval=[]", "samples.num_prompts=8"])
    stage("rm", root, model_args + one_step)
    return root


def merged_for_trl(root: Path, model_args: list[str], tag: str, run: str = "default") -> tuple[Path, Path]:
    """TRL's inputs: the SFT policy and the RM of ``root``'s run ``run`` (``model_args`` name it unless
    it is the default), each merged into a plain HF folder under bench/.work, rebuilt whenever the RM
    artifact (which pins its SFT) changes."""
    out = WORK / f"trl-inputs-{tag}"
    built_from = (root / "artifacts" / run / "rm" / "manifest.json").read_text()
    if (out / "built-from.json").is_file() and (out / "built-from.json").read_text() == built_from:
        return out / "policy", out / "reward"
    shutil.rmtree(out, ignore_errors=True)
    script = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
from tests.conftest import compose_config
from pipeline.core.artifacts import find_parent
from pipeline.models.policies import load_policy
from pipeline.models.reward import load_reward_model
cfg = compose_config("ppo", {model_args!r})
policy, fmt = load_policy("sft", cfg)
policy.save_pretrained({str(out / 'policy')!r}); fmt.save({str(out / 'policy')!r})
rm, _ = load_reward_model(find_parent(cfg.paths.run_dir, "rm"), find_parent(cfg.paths.run_dir, "sft"), cfg.model)
rm = rm.merge_and_unload()
rm.save_pretrained({str(out / 'reward')!r}); fmt.save({str(out / 'reward')!r})
"""
    env = {**os.environ, "RLHF_ROOT": str(root)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench: merging for TRL failed:\n{done.stderr[-3000:]}")
    (out / "built-from.json").write_text(built_from)
    return out / "policy", out / "reward"


# --- the two sides ------------------------------------------------------------------------


def run_ours(root: Path, model_args: list[str], updates: int, extra: list[str], tag: str) -> dict:
    """Our RL stage as a whole process; episodes/s over updates 2.. (update 1 is warm-up)."""
    out = WORK / f"ours-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = OURS + model_args + [f"ppo.total_updates={updates}", f"run_name=bench-{tag}",
                                     f"parents.sft={root / 'artifacts/default/sft'}",
                                     f"parents.rm={root / 'artifacts/default/rm'}", "resume=false",
                                     f"paths.artifacts_dir={out}"] + extra
    env = {**os.environ, "RLHF_ROOT": str(root), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
    code, rss = run_measured([sys.executable, "-m", "stages.ppo", *overrides], env, out.with_suffix(".log"))
    if code:
        raise SystemExit(f"bench: our run {tag} failed, see {out.with_suffix('.log')}")
    stage_name = next(o.split("=")[1] for o in extra if o.startswith("algorithm=")) if any(
        o.startswith("algorithm=") for o in extra) else "ppo"
    return {**history_figures(out / f"bench-{tag}" / stage_name / "history.jsonl", SHAPE["rollout"]),
            "peak_rss_mb": rss}


def history_figures(path: Path, rollout: int) -> dict:
    """Speed of an RL run from its history.jsonl, over updates 2.. (update 1 is warm-up): episodes/s
    and the mean split of an update (sampling, scoring passes, optimisation; the stage's time/* keys)."""
    history = [json.loads(x) for x in path.read_text().splitlines()]
    timed = history[1:]
    seconds = [h["time/loop"] for h in timed]  # the same span as TRL's update-to-update stamps
    return {"episodes_per_s": rollout * len(timed) / sum(seconds),
            "update_s": sum(seconds) / len(seconds),
            "sample_s": sum(h["time/sample"] for h in timed) / len(timed),
            "score_s": sum(h["time/rollout"] - h["time/sample"] for h in timed) / len(timed),
            "optimise_s": sum(h["time/update"] for h in timed) / len(timed),
            "response_tokens": sum(h["rollout/response_length"] for h in timed) / len(timed),
            "prompt_tokens": timed[-1]["rollout/prompt_length"]}


def run_trl(python: Path, policy: Path, reward: Path, prompts: list[str], updates: int, tag: str,
            stop_ids: list[int], value_lora: bool = False) -> dict:
    out = WORK / f"trl-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"policy_dir": str(policy), "reward_dir": str(reward), "prompts": prompts,
            "rollout_batch_size": SHAPE["rollout"], "minibatch_size": SHAPE["minibatch"],
            "ppo_epochs": SHAPE["epochs"], "max_new_tokens": SHAPE["new_tokens"], "lora_r": SHAPE["lora_r"],
            "lora_alpha": SHAPE["lora_alpha"], "lora_target": "all-linear", "kl_coef": SHAPE["kl_coef"],
            "temperature": SHAPE["temperature"], "total_updates": updates, "warmup_updates": 1, "num_threads": 2,
            "seed": 0, "stop_token_ids": stop_ids, "learning_rate": SHAPE["lr"], "missing_eos_penalty": 1.0,
            "output_dir": str(out / "trainer"), "value_lora": value_lora}
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": ""}
    code, rss = run_measured([str(python), str(ROOT / "bench/trl_baseline.py"), str(out / "spec.json"),
                              str(out / "out.json")], env, out / "log.txt")
    if code:
        raise SystemExit(f"bench: TRL run {tag} failed, see {out / 'log.txt'}")
    result = json.loads((out / "out.json").read_text())
    result["peak_rss_mb"] = rss  # measured the same way as ours (wait4 on the process)
    return result


# --- report -------------------------------------------------------------------------------


def world_prompts(n: int) -> list[str]:
    path = ROOT / "data/world/ppo_prompts.jsonl"
    if not path.is_file():
        raise SystemExit(f"bench: {path} is missing: run `make rm` first (it writes the world's data, then "
                         "base, sft and rm, which model (a) trains from and model (b) borrows the tokenizer of)")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [r["prompt"] for r in rows[:n]]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def rounds(n: int, ours_run, trl_run) -> tuple[dict, dict]:
    """Alternate the two sides ``n`` times; the median of every figure over the rounds."""
    ours, trl = [], []
    for _ in range(n):
        ours.append(ours_run())
        trl.append(trl_run())
    median = lambda runs: {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], (int, float))
                           else runs[0][k] for k in runs[0]}
    for side, runs in (("ours", ours), ("TRL 1.12", trl)):
        print(f"  {side}: episodes/s per round " + ", ".join(f"{r['episodes_per_s']:.2f}" for r in runs))
    return median(ours), median(trl)


def compare(name: str, ours: dict, trl: dict) -> None:
    ratio_speed = ours["episodes_per_s"] / trl["episodes_per_s"]
    ratio_rss = ours["peak_rss_mb"] / trl["peak_rss_mb"]
    print(f"\n[{name}] episodes/s: ours {ours['episodes_per_s']:.2f}, TRL 1.12 {trl['episodes_per_s']:.2f} "
          f"-> {ratio_speed:.2f}x")
    print(f"[{name}] peak RSS:   ours {ours['peak_rss_mb']:.0f} MB, TRL 1.12 {trl['peak_rss_mb']:.0f} MB "
          f"-> {ratio_rss:.2f}x")
    if trl.get("peak_cuda_mb"):
        print(f"[{name}] peak CUDA:  TRL 1.12 {trl['peak_cuda_mb']:.0f} MB")


def like_for_like(name: str, ours: dict, trl: dict, trl_lora: dict) -> None:
    """Against TRL with its value model under the same LoRA as ours (TRL's design trains it whole)."""
    print(f"[{name}] like for like, TRL's value model in the same LoRA (r {SHAPE['lora_r']}; TRL trains "
          f"{trl_lora['trainable_params'] / 1e6:.2f}M parameters, not {trl['trainable_params'] / 1e6:.2f}M): "
          f"TRL {trl_lora['episodes_per_s']:.2f} episodes/s, "
          f"{trl_lora['peak_rss_mb']:.0f} MB -> ours {ours['episodes_per_s'] / trl_lora['episodes_per_s']:.2f}x, "
          f"{ours['peak_rss_mb'] / trl_lora['peak_rss_mb']:.2f}x RSS")


def split(name: str, ours: dict) -> None:
    total = ours["update_s"]
    print(f"[{name}] one update {total:.2f}s: sampling {ours['sample_s']:.2f}s ({ours['sample_s'] / total:.0%}), "
          f"scoring passes {ours['score_s']:.2f}s ({ours['score_s'] / total:.0%}), optimisation "
          f"{ours['optimise_s']:.2f}s ({ours['optimise_s'] / total:.0%})")


def flops_line(name: str, ours: dict, config: dict, peak: float, critic: bool = True) -> None:
    f = update_flops(config, SHAPE["rollout"], ours["prompt_tokens"], ours["response_tokens"],
                     SHAPE["epochs"], SHAPE["lora_r"], critic)
    achieved = f / ours["update_s"] / 1e9
    print(f"[{name}] FLOPs of one update {f / 1e9:.0f} G -> {achieved:.1f} GFLOP/s, "
          f"{achieved / peak:.0%} of the measured fp32 matmul peak ({peak:.0f} GFLOP/s)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench ARGS=ppo")
    parser.add_argument("--models", default="ab", help="a, b or ab")
    parser.add_argument("--updates", type=int, default=None,
                        help=f"updates per run, the first of them warm-up (default: {UPDATES})")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of ours and TRL per model")
    args = parser.parse_args(sys.argv[2:] if sys.argv[1:2] == ["ppo"] else sys.argv[1:])
    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    python = ensure_trl_env(ROOT)
    peak = matmul_peak()
    print(f"bench ppo: fp32 matmul peak of this machine {peak:.0f} GFLOP/s (2 threads)")
    updates = {m: args.updates or n for m, n in UPDATES.items()}
    prompts = world_prompts(SHAPE["rollout"] * max(updates.values()))
    from transformers import AutoConfig
    if "a" in args.models:
        root = chain_a()
        base = root / "artifacts/default/base/model"
        policy, reward = merged_for_trl(root, [], "a")
        stops = json.loads((policy / "generation_config.json").read_text())["eos_token_id"]
        print("\n[a: tiny Llama] ours and TRL 1.12, alternating")
        ours, trl = rounds(args.rounds,
                           lambda: run_ours(root, [], updates["a"], [f"ppo.max_new_tokens={SHAPE['new_tokens']}"], "a"),
                           lambda: run_trl(python, policy, reward, prompts[:SHAPE["rollout"] * updates["a"]],
                                           updates["a"], "a", stops))
        rloo = run_ours(root, [], updates["a"], [f"ppo.max_new_tokens={SHAPE['new_tokens']}", "algorithm=rloo"],
                        "a-rloo")
        trl_lora = run_trl(python, policy, reward, prompts[:SHAPE["rollout"] * updates["a"]], updates["a"],
                           "a-lora", stops, value_lora=True)
        compare("a: tiny Llama", ours, trl)
        like_for_like("a: tiny Llama", ours, trl, trl_lora)
        split("a: tiny Llama", ours)
        flops_line("a: tiny Llama", ours, AutoConfig.from_pretrained(base).to_dict(), peak)
        print(f"[a: tiny Llama] gae vs rloo: {ours['episodes_per_s']:.2f} vs {rloo['episodes_per_s']:.2f} "
              f"episodes/s, peak RSS {ours['peak_rss_mb']:.0f} vs {rloo['peak_rss_mb']:.0f} MB")
    if "b" in args.models:
        root = chain_b()
        model_args = [f"model.path={root / 'base'}", "model.name=random-36m"]
        config = AutoConfig.from_pretrained(root / "base").to_dict()
        policy, reward = merged_for_trl(root, model_args, "b")
        stops = json.loads((policy / "generation_config.json").read_text())["eos_token_id"]
        print("\n[b: random 36M Llama, 32k vocab] ours and TRL 1.12, alternating")
        ours, trl = rounds(args.rounds,
                           lambda: run_ours(root, model_args, updates["b"],
                                            [f"ppo.max_new_tokens={SHAPE['new_tokens']}"], "b"),
                           lambda: run_trl(python, policy, reward, prompts[:SHAPE["rollout"] * updates["b"]],
                                           updates["b"], "b", stops))
        rloo = run_ours(root, model_args, updates["b"], [f"ppo.max_new_tokens={SHAPE['new_tokens']}",
                                                         "algorithm=rloo"], "b-rloo")
        trl_lora = run_trl(python, policy, reward, prompts[:SHAPE["rollout"] * updates["b"]], updates["b"],
                           "b-lora", stops, value_lora=True)
        compare("b: random 36M Llama, 32k vocab", ours, trl)
        like_for_like("b: random 36M Llama, 32k vocab", ours, trl, trl_lora)
        split("b: random 36M Llama, 32k vocab", ours)
        flops_line("b: random 36M Llama, 32k vocab", ours, config, peak)
        print(f"[b] gae vs rloo: {ours['episodes_per_s']:.2f} vs {rloo['episodes_per_s']:.2f} episodes/s, "
              f"peak RSS {ours['peak_rss_mb']:.0f} vs {rloo['peak_rss_mb']:.0f} MB")
        times = {n: run_ours(root, model_args, 3, [f"ppo.max_new_tokens={n}"], f"b-{n}")["update_s"]
                 for n in (24, 48, 96)}
        print("[b] time per update: " + ", ".join(f"{n} new tokens {t:.2f}s" for n, t in times.items())
              + f"; log-log slope {slope(list(times), list(times.values())):.2f}")


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"\nbench ppo: {time.time() - started:.0f}s")
