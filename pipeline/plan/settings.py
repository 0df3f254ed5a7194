"""The settings the memory model needs, read from a stage's composed config (sft, rm or ppo).

Bytes per weight follow ``model.dtype`` (0.5 with ``model.load_in_4bit``); activations are 16-bit
on a GPU unless the stage's precision is fp32 (``auto`` is bf16 or fp16 there, fp32 on CPU), and
never wider than the weights (a bf16 base computes in bf16 whatever the precision).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Optional

from pipeline.core.errors import ConfigError
from pipeline.models.loading import DTYPES

PRECISION_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# The keys a setting is changed with, per stage.
KEYS = {"sft": {"micro": "train.per_device_train_batch_size", "checkpointing": "train.gradient_checkpointing"},
        "ppo": {"micro": "ppo.micro_batch_size", "gen": "ppo.generation_batch_size",
                "checkpointing": "ppo.gradient_checkpointing"}}
KEYS["rm"] = KEYS["sft"]


@dataclass(frozen=True)
class Settings:
    stage: str  # sft | rm | ppo
    kw: dict[str, Any]  # the memory model's arguments (pipeline/plan/memory.py); ppo's micro, gen may be "auto"
    dtype: str  # model.dtype
    four_bit: bool  # model.load_in_4bit
    plain_act: int  # bytes per activation without 4-bit
    micro_of: int  # the micro-batch divides it: sft / rm the rows per optimizer step, ppo the minibatch
    gen_of: int = 0  # ppo: the rollout batch, which the generation batch divides

    def bytes_for(self, four_bit: bool) -> tuple[float, int]:
        """(bytes per weight, bytes per activation) in the configured dtype, or in 4-bit."""
        if four_bit:
            return 0.5, 2  # the QLoRA compute dtype is bf16 (or the model's 16-bit dtype)
        return float(DTYPES[self.dtype].itemsize), self.plain_act

    def label(self, four_bit: bool, checkpointing: bool) -> str:
        return ("4-bit" if four_bit else PRECISION_NAMES[self.dtype]) + (", checkpointing" if checkpointing else "")

    def with_(self, **kw) -> "Settings":
        return replace(self, kw={**self.kw, **kw})


def activation_bytes(dtype: str, precision: str, on_gpu: bool) -> int:
    """Bytes per activation without 4-bit."""
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}; fix the override or the "
                          "YAML under conf/model/")
    compute = 4 if precision == "fp32" or (precision == "auto" and not on_gpu) else 2
    return min(DTYPES[dtype].itemsize, compute)


def settings(stage: str, cfg, *, on_gpu: bool, prompt: Optional[int] = None,
             ranks: Optional[tuple[int, int]] = None) -> Settings:
    """``stage``'s settings from its composed config. ppo needs the longest ``prompt`` (tokens) and the
    LoRA ``ranks`` of the SFT and RM adapters it builds on."""
    four_bit, dtype = bool(cfg.model.load_in_4bit), cfg.model.dtype
    if stage not in KEYS:
        raise ValueError(f"stage must be one of {list(KEYS)}, got {stage!r}")
    train = cfg.ppo if stage == "ppo" else cfg.train
    s = Settings(stage, {}, dtype, four_bit, activation_bytes(dtype, train.precision, on_gpu), 0)
    weight, act = s.bytes_for(four_bit)
    common = dict(weight_bytes=weight, act_bytes=act, checkpointing=bool(train.gradient_checkpointing))
    if stage in ("sft", "rm"):
        return replace(s.with_(**common, r=cfg.lora.r, micro=train.per_device_train_batch_size,
                                length=train.max_length),
                       micro_of=train.per_device_train_batch_size * train.gradient_accumulation_steps)
    return replace(s.with_(**common, r=ranks[0], r_rm=ranks[1], micro=train.micro_batch_size,
                            gen=train.generation_batch_size, prompt=prompt, response=train.max_new_tokens,
                            fold=train.fold_adapters, critic=cfg.algorithm.advantage == "gae",
                            held_cache=train.sampler in ("static", "graphs") or (train.sampler == "auto" and on_gpu)),
                   micro_of=train.minibatch_size, gen_of=train.rollout_batch_size)


def adapter_ranks(sft, rm) -> tuple[int, int]:
    """The LoRA ranks of the SFT and RM artifacts' adapters (``adapter/adapter_config.json``)."""
    return tuple(int(json.loads((a.path / "adapter" / "adapter_config.json").read_text())["r"]) for a in (sft, rm))
