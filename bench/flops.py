"""The physical limit: FLOPs of one RL update, and this machine's measured matmul peak.

Counted for a Llama-style decoder (q, k, v, o projections and a gated MLP), per token::

    linear  = 2 * (H * (2 H + 2 H_kv) + 3 H I)            per layer, H_kv = H * n_kv / n_heads
    lora    = 2 * r * sum over the 7 linears of (in + out)  per layer and active adapter
    attn    = 4 * H * ctx                                   per layer (Q K^T and A V)
    lm_head = 2 * H * V                                     per position whose logits are needed

A backward pass through frozen weights computes only input gradients (the cost of the
forward); LoRA weights and attention cost twice their forward in the backward pass.
The update is: sampling (prefill P tokens, then T cached decode steps), the reference pass
(logits at the T response positions), the reward and value passes (no LM head), and per PPO
epoch a policy forward + backward and a value forward + backward over P + T tokens. Work done
twice is counted once: the LM head that head_logprobs recomputes in the backward pass, and the
SFT adapter's products where folding replaces them.
"""

from __future__ import annotations

import time

import torch


def matmul_peak(n: int = 2048, seconds: float = 2.0) -> float:
    """Measured fp32 matmul throughput in GFLOP/s, with torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return 2 * n ** 3 * done / (time.perf_counter() - start) / 1e9


def _per_token(cfg: dict, r: int, adapters: int, ctx: float) -> float:
    H, I, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = H * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    linear = 2 * (H * (2 * H + 2 * kv) + 3 * H * I)
    lora = 2 * r * ((H + H) * 2 + (H + kv) * 2 + 2 * (H + I) + (I + H)) * adapters
    return layers * (linear + lora + 4 * H * ctx)


def _backward(cfg: dict, r: int, adapters: int, ctx: float) -> float:
    lora_and_attn = _per_token(cfg, r, adapters, ctx) - _per_token(cfg, 0, 0, 0)
    return _per_token(cfg, 0, 0, 0) + 2 * lora_and_attn


def update_flops(cfg: dict, rows: int, prompt: float, response: float, epochs: int, r: int,
                 critic: bool = True) -> float:
    """FLOPs of one update on ``rows`` sequences of ``prompt`` + ``response`` tokens (means)."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    L, head = prompt + response, 2 * H * V
    sample = prompt * _per_token(cfg, r, 1, prompt / 2) + response * (_per_token(cfg, r, 1, prompt + response / 2)
                                                                       + head)
    ref = L * _per_token(cfg, r, 1, L / 2) + response * head
    critic_pass = L * _per_token(cfg, r, 2, L / 2)
    policy_step = ref + L * _backward(cfg, r, 1, L / 2) + response * head
    value_step = critic_pass + L * _backward(cfg, r, 2, L / 2)
    per_row = sample + ref + critic_pass * (2 if critic else 1) + epochs * (policy_step + (value_step if critic else 0))
    return rows * per_row
