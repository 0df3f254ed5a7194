"""Benchmarks: every figure is a ratio against a baseline measured in the same process.

    make bench                      # all benchmarks
    make bench ARGS="kv_cache"      # one of: kv_cache, merged_lora, shared_base, ppo, grpo, gpu
    make bench ARGS="ppo --models b"  # our RL stage vs TRL 1.12's PPOTrainer (bench/ppo.py)
    make bench ARGS="grpo --models a" # our GRPO vs TRL 1.16's GRPOTrainer (bench/grpo.py)
    make bench ARGS="gpu --dry-run"   # the GPU bench (bench/gpu.py) end to end at tiny shapes
    make bench ARGS="alignment --run final --seeds 4"  # a run's alignment figures over 4 sampling seeds
    make bench ARGS="rm_agreement --responses artifacts/final/eval/responses.jsonl artifacts/final/rm"
    make bench ARGS="rm_probe --responses artifacts/final/eval/responses.jsonl artifacts/final/rm"

- kv_cache:     sampling with the KV cache vs recomputing the prefix every step.
- merged_lora:  a forward pass with the LoRA adapter merged into the base vs unmerged.
- shared_base:  parameter memory of PPO's four roles on one shared base vs four
                separate models (needs artifacts/<run>/sft and rm: `make rm` first).
- ppo:          our RL stage against TRL 1.12's PPOTrainer, whole processes side by side.
- grpo:         our GRPO (algorithm=grpo) against TRL 1.16's GRPOTrainer, the same way
                (results in bench/results/grpo-2core-cpu.txt).
- alignment:    the eval stage's sampled figures of a finished run, averaged over sampling seeds
                (bench/alignment.py), with the world's targets checked.
- rm_agreement: reward models against the gold judge by category, on the answers an eval artifact
                saved (bench/rm_agreement.py): RM settings compared without an RL run each.
- rm_probe:     how far an RM marks down a refusal that names a city of the world instead of the
                unknown country asked about (bench/rm_probe.py), the hallucination RL policies learn;
                `--category fact`: the right fact against another country's and a wrong value.
- gpu:          the one-shot GPU bench (bench/gpu.py, on a card via bench/gpu_run.sh): peak memory of
                sft / rm / ppo / grpo beside the memory model, decode ms/step against the bandwidth
                floor, episodes/s of ppo, grpo and TRL 1.16's GRPOTrainer at the Llama-3-8B and
                Qwen2.5-0.5B shapes (results in bench/results/gpu-<device>.txt). Not part of
                `make bench` without a name: on a CPU it runs only as a dry run at tiny shapes.

Timings take the median of several repeats after a warm-up; the machine is whatever
runs this (2 CPU cores on CI), so only the ratios carry over.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPEATS = 5


def median_seconds(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def bench_kv_cache() -> None:
    model = tiny_llama()
    prompts = torch.randint(5, 1000, (32, 16))
    kw = dict(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32, min_new_tokens=32,
              do_sample=True, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=1)
    with torch.no_grad():
        cached = median_seconds(lambda: model.generate(**kw, use_cache=True), 3)
        uncached = median_seconds(lambda: model.generate(**kw, use_cache=False), 3)
    tokens = 32 * 32
    print(f"kv_cache: {tokens / cached:8.0f} tok/s with cache, {tokens / uncached:8.0f} without "
          f"-> {uncached / cached:.2f}x faster with the cache")


def bench_merged_lora() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ids = torch.randint(5, 1000, (64, 64))
    with torch.no_grad():
        unmerged = median_seconds(lambda: model(input_ids=ids))
        model.merge_adapter()
        merged = median_seconds(lambda: model(input_ids=ids))
    print(f"merged_lora: forward {unmerged * 1e3:.1f} ms unmerged, {merged * 1e3:.1f} ms merged "
          f"-> {unmerged / merged:.2f}x faster merged (why eval and generate merge)")


def param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def bench_shared_base(run_dir: str = "artifacts/default") -> None:
    from hydra import compose, initialize_config_dir

    import pipeline.config  # noqa: F401
    from pipeline.core.artifacts import find_parent
    from pipeline.core.errors import ArtifactError
    from pipeline.models.policies import load_policy
    from pipeline.models.reward import load_reward_model, load_sft_tokenizer
    from pipeline.rl.shared_model import SharedBaseActorCritic

    try:
        sft, rm = find_parent(run_dir, "sft"), find_parent(run_dir, "rm")
    except ArtifactError as e:
        print(f"shared_base: skipped ({e})")
        return
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("ppo", [f"paths.run_dir={run_dir}"])
    shared = SharedBaseActorCritic.from_artifacts(sft, rm, cfg.model, load_sft_tokenizer(sft), "rm")
    # The baseline: what a trainer with four separate models holds (TRL's old PPOTrainer).
    policy, _ = load_policy("sft", cfg)
    ref, _ = load_policy("sft", cfg)
    reward, _ = load_reward_model(rm, sft, cfg.model)
    value, _ = load_reward_model(rm, sft, cfg.model)
    separate = sum(param_bytes(m) for m in (policy, ref, reward, value))
    one = param_bytes(shared)
    print(f"shared_base: {one / 2**20:.2f} MiB shared vs {separate / 2**20:.2f} MiB for four models "
          f"-> {separate / one:.2f}x less parameter memory")


def bench_ppo() -> None:
    from bench import ppo
    ppo.main()


def bench_grpo() -> None:
    from bench import grpo
    grpo.main()


def bench_gpu() -> None:
    from bench import gpu
    gpu.main()


def bench_alignment() -> None:
    from bench import alignment
    alignment.main(sys.argv[2:] if sys.argv[1:2] == ["alignment"] else sys.argv[1:])


def bench_rm_agreement() -> None:
    from bench import rm_agreement
    rm_agreement.main(sys.argv[2:] if sys.argv[1:2] == ["rm_agreement"] else sys.argv[1:])


def bench_rm_probe() -> None:
    from bench import rm_probe
    rm_probe.main(sys.argv[2:] if sys.argv[1:2] == ["rm_probe"] else sys.argv[1:])


BENCHES = {"kv_cache": bench_kv_cache, "merged_lora": bench_merged_lora, "shared_base": bench_shared_base,
           "ppo": bench_ppo, "grpo": bench_grpo, "gpu": bench_gpu, "alignment": bench_alignment,
           "rm_agreement": bench_rm_agreement, "rm_probe": bench_rm_probe}
# `make bench` with no name: the CPU benches (alignment, rm_agreement and rm_probe need a finished run: they name one)
DEFAULT = [name for name in BENCHES if name not in ("gpu", "alignment", "rm_agreement", "rm_probe")]

if __name__ == "__main__":
    torch.set_num_threads(2)
    names = [a for a in sys.argv[1:] if not a.startswith("-") and a in BENCHES] or DEFAULT
    for name in names:
        BENCHES[name]()
