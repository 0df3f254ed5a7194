"""A memory model of the RL stage: what it holds for a model, a batch shape and a precision.

    python bench/memory.py            # the table in the README: model (b) and 7-8B models on 24 GB

The stage keeps one frozen base and four LoRA adapters (policy, reference, reward, value) in
memory, trains two of them, samples ``generation_batch_size`` responses at a time, and runs
forward + backward passes on ``micro_batch_size`` rows at a time. Counted for a Llama-style
decoder (q, k, v, o projections and a gated MLP), with H the hidden size, I the MLP width,
H_kv the key/value width, V the vocabulary, L_seq = prompt + response tokens:

    weights       base parameters x bytes per weight (bf16: 2, fp32: 4, 4-bit: 0.5 on the linear
                  layers, the embeddings and LM head kept in 16-bit)
    adapters      4 x r x sum over the 7 linears of (in + out) x layers, fp32
    optimizer     for the 2 trained adapters (+ value head): fp32 gradient + Adam's two moments
    activations   saved for the backward pass of one micro-batch and one role at a time (the
                  policy and value terms are backpropagated separately): per token and layer
                  ~ 10 H + 4 I values (norm inputs and outputs, q, k, v, attention output, the
                  residuals, gate, up, their product); with gradient checkpointing, one layer's
                  worth plus each layer's input (H)
    logits        one chunk of at most 8M logits (pipeline.rl.logprobs.head_logprobs: the LM head and
                  the log-prob run over chunks of rows and are recomputed in the backward pass),
                  fp32, once for the output and once for its gradient
    kv cache      generation_batch x L_seq x layers x 2 x H_kv at the model dtype, while sampling
    sampler       generation_batch x V fp32: one step's log-softmax and its probabilities
    folded        ppo.fold_adapters=auto, only where an adapter costs >= 10% of a layer's FLOPs
                  (r sum(in + out) / sum(in x out); none of the models in the table): a copy of the
                  adapted linear weights per role (reference, reward, policy, value) with its
                  adapters folded in
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.rl.logprobs import LOGPROB_CHUNK  # noqa: E402
from pipeline.rl.trainer import FOLD_SHARE  # noqa: E402

GiB = 2 ** 30


@dataclass
class Arch:
    name: str
    params: float  # total parameters
    layers: int
    hidden: int
    intermediate: int
    kv: int  # key/value width: hidden * kv_heads / heads
    vocab: int
    tied: bool


MODEL_B = Arch("model (b): random Llama, 32k vocab", 35.4e6, 6, 512, 1376, 512, 32000, True)
LLAMA3_8B = Arch("Llama-3-8B", 8.03e9, 32, 4096, 14336, 1024, 128256, False)
QWEN25_7B = Arch("Qwen2.5-7B", 7.62e9, 28, 3584, 18944, 512, 152064, False)


def lora_params(a: Arch, r: int) -> float:
    per_layer = (a.hidden * 2) * 2 + (a.hidden + a.kv) * 2 + 2 * (a.hidden + a.intermediate) + (a.intermediate
                                                                                                 + a.hidden)
    return r * per_layer * a.layers


def linear_params(a: Arch) -> float:
    """Parameters of the 7 adapted linear layers: q, o (H x H), k, v (H x H_kv), gate, up, down (H x I)."""
    return (2 * a.hidden * a.hidden + 2 * a.hidden * a.kv + 3 * a.hidden * a.intermediate) * a.layers


def breakdown(a: Arch, *, weight_bytes: float, act_bytes: int, r: int, micro: int, gen: int, prompt: int,
              response: int, checkpointing: bool) -> dict[str, float]:
    """Bytes the RL stage holds at its peak (the training pass, or sampling, whichever is larger)."""
    embed = a.vocab * a.hidden * (1 if a.tied else 2)
    weights = (a.params - embed) * weight_bytes + embed * max(weight_bytes, 2.0)
    adapters = 4 * lora_params(a, r) * 4
    optimizer = 2 * lora_params(a, r) * 4 * 3  # gradient + two Adam moments, fp32
    tokens = micro * (prompt + response)
    layer = (10 * a.hidden + 4 * a.intermediate) * act_bytes
    if checkpointing:
        activations = tokens * (a.layers * a.hidden * act_bytes + layer)
    else:
        activations = tokens * a.layers * layer
    logits = 2 * min(micro * response, max(1, LOGPROB_CHUNK // a.vocab)) * a.vocab * 4
    kv_cache = gen * (prompt + response) * a.layers * 2 * a.kv * act_bytes
    sampler = 2 * gen * a.vocab * 4
    folds = lora_params(a, r) / linear_params(a) >= FOLD_SHARE
    folded = linear_params(a) * weight_bytes if folds else 0.0  # each copy
    training, sampling = activations + logits, kv_cache + sampler
    return {"weights": weights, "adapters": adapters, "optimizer": optimizer, "activations": activations,
            "logits": logits, "kv cache (sampling)": kv_cache, "sampler": sampler, "folded": 4 * folded,
            "peak": weights + adapters + optimizer + 4 * folded + max(training, sampling)}


def row(a: Arch, label: str, **kw) -> str:
    b = breakdown(a, **kw)
    cells = " | ".join(f"{b[k] / GiB:.2f}" for k in ("weights", "adapters", "optimizer", "activations", "logits",
                                                      "kv cache (sampling)", "peak"))
    return f"| {a.name} | {label} | {cells} |"


def main() -> None:
    print("| model | setting | weights | adapters | optimizer | activations | logits | KV cache | peak (GiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    shape = dict(r=16, prompt=32, response=24)
    print(row(MODEL_B, "fp32, micro 32, gen 64 (the bench)", weight_bytes=4, act_bytes=4, micro=32, gen=64,
              checkpointing=False, **shape))
    long = dict(r=16, prompt=512, response=256)
    for arch in (LLAMA3_8B, QWEN25_7B):
        for label, wb, micro, gen, ckpt in (("bf16, micro 4, gen 16, checkpointing", 2, 4, 16, True),
                                            ("bf16, micro 4, gen 16", 2, 4, 16, False),
                                            ("4-bit, micro 8, gen 32, checkpointing", 0.5, 8, 32, True)):
            print(row(arch, label, weight_bytes=wb, act_bytes=2, micro=micro, gen=gen, checkpointing=ckpt, **long))


if __name__ == "__main__":
    main()
