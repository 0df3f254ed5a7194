"""What a stage holds on the device at its peak, for a model shape, a batch and a precision.

Counted for a Llama-style decoder (pipeline/plan/arch.py), with H the hidden size, I the MLP width,
H_kv the key/value width, V the vocabulary, L the layers. Every stage holds, all run long (``static``):

    weights       base parameters x bytes per weight (fp32: 4, bf16 and fp16: 2, 4-bit: 0.5 on the linear
                  layers, the embeddings and LM head kept in 16-bit)
    adapters      per LoRA adapter r x sum over the 7 adapted linears of (in + out) x L parameters, fp32
                  (peft keeps adapters in fp32 on a 16-bit base)
    optimizer     for each trained adapter (and head): fp32 gradient + Adam's two moments

and for one micro-batch of N tokens, while training:

    activations   saved for the backward pass: per token and layer ~ 10 H + 4 I values (norm inputs and
                  outputs, q, k, v, attention output, the residuals, gate, up, their product); with
                  gradient checkpointing, each layer's input (H) plus one layer's worth, recomputed
    logits        what the loss holds of the LM head's output (per stage, below)

The stages:

    sft   base (with its LM head) + 1 trained adapter; N = micro x train.max_length (TRL cuts longer
          rows). TRL's SFTTrainer (1.16) never holds the N x V logits: its fused LM head
          (trl.trainer.utils.add_fused_lm_head, trl.kernels.chunked_logprob) projects tiles of at most
          4096 tokens x 32768 vocabulary entries at the compute dtype, in the forward and again in the
          backward, and sums the hidden states' gradient in fp32 (N x H) beside its own copy of the
          scored hidden states (N x H).
    rm    a sequence classifier: the base without its LM head, the SFT adapter merged in (no extra
          memory), 1 trained adapter and a scalar head (a trained copy beside the original, TRL's
          modules_to_save); each pair is two sequences, so N = 2 x micro x train.max_length (TRL drops
          longer pairs), and the head's output is one fp32 value per token.
    ppo   one frozen base and four adapters: policy and reference (the SFT's rank), reward and value (the
          RM's), two trained (+ value head); without a critic (rloo, grpo, reinforce_pp, online_dpo) no
          value adapter and one trained. Training and sampling alternate, so the peak holds the larger of
            training   activations of micro x (prompt + response) tokens, one role at a time (the policy
                       and value terms are backpropagated separately), and one chunk of at most 32M logits
                       (pipeline.rl.logprobs.head_logprobs: the LM head and the log-prob run over chunks
                       of rows, recomputed in the backward pass), fp32, for the output and its gradient
            sampling   the KV cache, generation_batch x (prompt + response) x L x 2 x H_kv at the
                       activation dtype, and the sampler's generation_batch x V working copies: fp32 logits
                       and log-probs, float64 CDF and its input (pipeline.rl.rollout.draw). The static
                       sampler (ppo.sampler static or graphs; auto on a GPU) holds its cache all run, at
                       the prompt width rounded up to a multiple of 64, so there the cache is static
          plus, where ppo.fold_adapters folds (auto: where an adapter costs >= 10% of a layer's FLOPs,
          r sum(in + out) / sum(in x out)), a copy of the adapted linear weights per role with its
          adapters folded in.

Not counted: the CUDA context, allocator slack and short-lived temporaries (attention scores, masks),
and the passes without gradient outside the training step (SFT and RM evaluation, RM scoring of
held-out pairs, SFT's samples, PPO's scoring passes), which hold one layer's temporaries for their
batch. Checked on one H200 (Llama-3-8B shape, bf16, LoRA r 16, gradient checkpointing, README):
measured peaks allocated sft 15.84 GiB (micro 4, rows <= 128 tokens), rm 15.00 GiB, ppo 18.65 GiB
(micro 4, generation 16, prompt ~530 + 256 tokens); this model says 15.84, 15.04 and 18.03.
"""

from __future__ import annotations

from pipeline.rl.logprobs import LOGPROB_CHUNK
from pipeline.rl.static_sampler import RolloutSampler
from pipeline.rl.trainer import FOLD_SHARE

GiB = 2 ** 30
STATIC_ROUND = RolloutSampler.ROUND  # the static sampler's prompt widths are multiples of this
# TRL 1.16's fused LM head (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE, trl.trainer.utils.
# _CHUNKED_LOGPROB_CHUNK_SIZE): the tile of logits it holds at a time. A unit test pins them to TRL's.
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768


def lora_params(a, r: int) -> float:
    """Parameters of one LoRA adapter of rank ``r`` on the 7 linear layers of every block."""
    mlp = (3 if a.gated else 2) * (a.hidden + a.intermediate)
    per_layer = (a.hidden * 2) * 2 + (a.hidden + a.kv) * 2 + mlp
    return r * per_layer * a.layers


def linear_params(a) -> float:
    """Parameters of the adapted linear layers: q, o (H x H), k, v (H x H_kv), gate, up, down (H x I)."""
    return (2 * a.hidden * a.hidden + 2 * a.hidden * a.kv + (3 if a.gated else 2) * a.hidden * a.intermediate) \
        * a.layers


def weights(a, weight_bytes: float, lm_head: bool = True) -> float:
    """The base's bytes; the embeddings (and LM head) stay 16-bit under 4-bit quantisation."""
    embed = a.vocab * a.hidden * (1 if a.tied or not lm_head else 2)
    body = a.params - a.vocab * a.hidden * (1 if a.tied else 2)
    return body * weight_bytes + embed * max(weight_bytes, 2.0)


def activations(a, tokens: int, act_bytes: int, checkpointing: bool) -> float:
    """Bytes one micro-batch of ``tokens`` saves for its backward pass."""
    layer = (10 * a.hidden + 4 * a.intermediate) * act_bytes
    if checkpointing:
        return tokens * (a.layers * a.hidden * act_bytes + layer)
    return tokens * a.layers * layer


def _total(parts: dict[str, float], static: tuple[str, ...], training: tuple[str, ...],
           sampling: tuple[str, ...] = ()) -> dict[str, float]:
    out = {**parts, "static": sum(parts[k] for k in static), "training": sum(parts[k] for k in training),
           "sampling": sum(parts[k] for k in sampling)}
    out["peak"] = out["static"] + max(out["training"], out["sampling"])
    return out


def sft_breakdown(a, *, weight_bytes: float, act_bytes: int, r: int, micro: int, length: int,
                  checkpointing: bool) -> dict[str, float]:
    """Bytes the SFT stage holds at its peak (the training step)."""
    tokens = micro * length
    adapter = lora_params(a, r) * 4
    logits = min(tokens, TRL_TOKEN_TILE) * min(a.vocab, TRL_VOCAB_TILE) * act_bytes \
        + tokens * a.hidden * (4 + act_bytes)
    return _total({"weights": weights(a, weight_bytes), "adapters": adapter, "optimizer": 3 * adapter,
                   "activations": activations(a, tokens, act_bytes, checkpointing), "logits": logits},
                  ("weights", "adapters", "optimizer"), ("activations", "logits"))


def rm_breakdown(a, *, weight_bytes: float, act_bytes: int, r: int, micro: int, length: int,
                 checkpointing: bool) -> dict[str, float]:
    """Bytes the RM stage holds at its peak (the training step on ``micro`` pairs)."""
    tokens = 2 * micro * length
    adapter = lora_params(a, r) * 4 + 2 * a.hidden * 4  # + the scalar head and its trained copy
    return _total({"weights": weights(a, weight_bytes, lm_head=False), "adapters": adapter,
                   "optimizer": 3 * (lora_params(a, r) + a.hidden) * 4,
                   "activations": activations(a, tokens, act_bytes, checkpointing), "logits": tokens * 4.0},
                  ("weights", "adapters", "optimizer"), ("activations", "logits"))


def folds(a, r: int, fold: str = "auto", weight_bytes: float = 4) -> bool:
    """Whether ppo.fold_adapters=``fold`` folds each role's adapters into a weight copy (auto: an
    fp32 base only, as pipeline/rl/trainer.py ``folds`` decides)."""
    return fold == "always" or (fold == "auto" and weight_bytes == 4 and lora_params(a, r) / linear_params(a) >= FOLD_SHARE)


def ppo_breakdown(a, *, weight_bytes: float, act_bytes: int, r: int, micro: int, gen: int, prompt: int,
                  response: int, checkpointing: bool, r_rm: int | None = None, fold: str = "auto",
                  critic: bool = True, device: str = "cuda", held_cache: bool = False) -> dict[str, float]:
    """Bytes the RL stage holds at its peak (the training pass, or sampling, whichever is larger) on
    ``device`` ("cuda": what a plan is for; "cpu": the LM head's chunk is smaller there).
    ``held_cache``: the static sampler's KV cache (ppo.sampler static or graphs), kept through
    training so its captured graphs stay valid, at the prompt width rounded up as it rounds it."""
    r_rm = r if r_rm is None else r_rm
    roles = 4 if critic else 3
    trained = lora_params(a, r) + (lora_params(a, r_rm) if critic else 0)
    tokens = micro * (prompt + response)
    parts = {"weights": weights(a, weight_bytes),
             "adapters": (2 * lora_params(a, r) + (roles - 2) * lora_params(a, r_rm)) * 4,
             "optimizer": trained * 4 * 3,  # gradient + two Adam moments, fp32
             "activations": activations(a, tokens, act_bytes, checkpointing),
             "logits": 2 * min(micro * response, max(1, LOGPROB_CHUNK[device] // a.vocab)) * a.vocab * 4,
             "sampler": gen * a.vocab * (4 + 4 + 8 + 8),
             "folded": roles * linear_params(a) * weight_bytes if folds(a, r, fold, weight_bytes) else 0.0}
    if held_cache:
        width = -(-prompt // STATIC_ROUND) * STATIC_ROUND + response
        parts["kv cache (held)"] = gen * width * a.layers * 2 * a.kv * act_bytes
        return _total(parts, ("weights", "adapters", "optimizer", "folded", "kv cache (held)"),
                      ("activations", "logits"), ("sampler",))
    parts["kv cache (sampling)"] = gen * (prompt + response) * a.layers * 2 * a.kv * act_bytes
    return _total(parts, ("weights", "adapters", "optimizer", "folded"), ("activations", "logits"),
                  ("kv cache (sampling)", "sampler"))


BREAKDOWNS = {"sft": sft_breakdown, "rm": rm_breakdown, "ppo": ppo_breakdown}


def breakdown(stage: str, a, **settings) -> dict[str, float]:
    """``stage``'s bytes by part, with ``static``, ``training``, ``sampling`` and ``peak``."""
    return BREAKDOWNS[stage](a, **settings)
