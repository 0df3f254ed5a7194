"""Schemas of the config groups the stages share: paths, model, lora, logger, data.

Every field has its type and *no default*: the values live only in the YAML under ``conf/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

# --- groups --------------------------------------------------------------------------


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    artifacts_dir: str = MISSING
    run_dir: str = MISSING
    wandb_dir: str = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub id or local directory. null means "the run's `base` artifact" (`make base`).
    path: Optional[str] = MISSING
    trust_remote_code: bool = MISSING
    dtype: str = MISSING  # float32 | bfloat16 | float16
    # Path to a jinja chat template; null keeps the tokenizer's own (or the project's
    # default when the tokenizer has none, e.g. GPT-2).
    chat_template: Optional[str] = MISSING
    # 4-bit base weights (QLoRA, bitsandbytes); needs CUDA.
    load_in_4bit: bool = MISSING
    bnb_4bit_quant_type: str = MISSING  # nf4 | fp4
    bnb_4bit_use_double_quant: bool = MISSING


@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING  # "all-linear" or a list of module names
    bias: str = MISSING
    use_rslora: bool = MISSING  # scale by alpha / sqrt(r) (Kalajdzievski 2023)
    use_dora: bool = MISSING  # weight-decomposed LoRA (Liu et al. 2024)
    rank_pattern: dict[str, int] = MISSING  # per-module ranks, e.g. {q_proj: 4}
    alpha_pattern: dict[str, int] = MISSING  # per-module alphas


@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb | none
    project: str = MISSING
    entity: Optional[str] = MISSING
    mode: str = MISSING  # offline | online | disabled
    num_samples: int = MISSING  # rows in the sampled-responses table


@dataclass
class SplitConfig:
    train: list[str] = MISSING
    eval: list[str] = MISSING


@dataclass
class DataConfig:
    """Where each stage reads its data: local .json/.jsonl/.parquet files or hub ids."""

    name: str = MISSING
    pretrain: str = MISSING  # text rows {"text"}: base pretraining, PPO-ptx
    pretrain_eval: Optional[str] = MISSING  # held-out text: eval's corpus NLL (alignment tax); null = skip
    sft: SplitConfig = MISSING
    prefs: SplitConfig = MISSING
    ppo_prompts: list[str] = MISSING
    eval_prompts: list[str] = MISSING
    val_prompts: list[str] = MISSING  # held out like eval_prompts: `make eval ARGS="prompts=val"`
    hub_split: str = MISSING  # split used when a source is a hub dataset id (or a folder) without `:<split>`
    # The public sets a preset reads (conf/data/: hh_rlhf, ultrafeedback, tldr, alpaca), by name: a hub
    # id, or a local folder laid out like its splits (<folder>/<split>.jsonl). Sources name them as
    # ${data.hub.<name>}:<split>[:${data.max_rows}] (pipeline/data/sources.py).
    hub: dict[str, str] = MISSING
    max_rows: Optional[int] = MISSING  # rows per source in the presets' sources; null = all
    # The pipeline's field names -> a dataset's own, e.g. {prompt: question, chosen: response_j}
    columns: dict[str, str] = MISSING
    # skip | error: leave rows no stage can use out (counted by reason, printed, recorded as
    # data/skipped_<reason>), or stop at the first. See pipeline/data/bad_rows.py.
    bad_rows: str = MISSING


# --- stage schemas --------------------------------------------------------------------


@dataclass
class StageConfig:
    """Keys every stage shares."""

    run_name: str = MISSING
    seed: int = MISSING
    paths: PathsConfig = MISSING
    logger: LoggerConfig = MISSING
