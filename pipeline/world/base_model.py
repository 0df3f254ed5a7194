"""The embedded world's base model: a byte-level BPE tokenizer and a small Llama.

The Llama block is the real ``transformers`` one (RMSNorm, SwiGLU MLP, rotary position
embeddings), only narrow and shallow, so every code path the stages exercise is the one
a 7B Llama takes. Pretraining is a plain next-token loop in the style of nanoGPT.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.data.chat import DEFAULT_TEMPLATE, PAD

EOS = "<|eos|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) with a dedicated pad token: pad != eos, always.

    A separate pad id matters downstream: masks are never rebuilt from token values, and
    a real EOS is never mistaken for padding (see shared/notes/ppo-checklist.md).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=[PAD, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
        additional_special_tokens=ROLE_TOKENS, model_max_length=1 << 30,
    )
    hf.chat_template = DEFAULT_TEMPLATE
    return hf


def build_llama(arch, tokenizer) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by ``arch`` (a TinyArchConfig)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        tie_word_embeddings=arch.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(config)


def random_blocks(stream: torch.Tensor, block_size: int, batch_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of shape (B, block_size): random windows and the same shifted by one."""
    starts = torch.randint(0, len(stream) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([stream[s: s + block_size] for s in starts])
    y = torch.stack([stream[s + 1: s + block_size + 1] for s in starts])
    return x, y


def cosine_lr(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * learning_rate``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio * cfg.learning_rate
    return floor + 0.5 * (cfg.learning_rate - floor) * (1 + math.cos(math.pi * progress))


def pretrain(model: LlamaForCausalLM, stream: torch.Tensor, cfg, seed: int,
             log: Callable[[dict], None]) -> dict[str, float]:
    """Next-token pretraining with AdamW; returns final train loss, perplexity and timing."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.learning_rate, betas=(0.9, 0.95))
    model.train()
    start, ema = time.time(), None
    tokens_per_step = cfg.batch_size * cfg.block_size
    bar = tqdm(range(cfg.max_steps), desc="base", mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg)
        x, y = random_blocks(stream, cfg.block_size, cfg.batch_size, gen)
        logits = model(input_ids=x).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"pretraining loss became {loss.item()} at step {step}; "
                "lower train.learning_rate or raise train.warmup_steps")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tokens_per_step * (step + 1) / (time.time() - start):.0f}",
                        refresh=False)
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            log({"train/loss": loss.item(), "train/loss_ema": ema,
                 "train/lr": opt.param_groups[0]["lr"], "train/step": step})
    model.eval()
    seconds = time.time() - start
    return {"train_loss": ema, "train_perplexity": math.exp(ema), "train_seconds": seconds,
            "tokens_seen": cfg.max_steps * cfg.batch_size * cfg.block_size}
