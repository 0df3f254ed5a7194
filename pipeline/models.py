"""Loading tokenizers, base models and LoRA adapters, hub ids and local folders alike.

Weights load from safetensors only (``use_safetensors=True``): a pickle checkpoint is
refused rather than executed. ``trust_remote_code`` is whatever ``model.trust_remote_code``
says, and the shipped configs say false.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import peft
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.artifacts import Artifact, find_parent
from pipeline.runtime import PipelineError
from pipeline.tiny import CHAT_TEMPLATE, PAD

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_model_source(cfg, override: Optional[str] = None) -> tuple[str, Optional[Artifact]]:
    """Where the base weights come from: ``model.path``, else the ``base`` artifact
    (``override`` when set, the same run's otherwise)."""
    if cfg.model.path:
        return cfg.model.path, None
    base = find_parent(cfg.paths.run_dir, "base", override)
    return str(base.path / "model"), base


def load_tokenizer(source: str, model_cfg):
    """The tokenizer, with a dedicated pad token and a chat template guaranteed.

    Many hub tokenizers (GPT-2, Llama-2) ship without a pad token; setting pad = eos would
    make a real EOS indistinguishable from padding, so a new ``<|pad|>`` is added instead.
    """
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD})
    if model_cfg.chat_template:
        tok.chat_template = Path(model_cfg.chat_template).read_text()
    elif not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def model_kwargs(model_cfg) -> dict:
    if model_cfg.dtype not in DTYPES:
        raise PipelineError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_cfg.dtype!r}")
    kwargs = dict(dtype=DTYPES[model_cfg.dtype], use_safetensors=True,
                  trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.load_in_4bit:
        kwargs["quantization_config"] = qlora_quantization(model_cfg)
    return kwargs


def qlora_quantization(model_cfg):
    """4-bit base weights for QLoRA (Dettmers et al. 2023), as `model.bnb_4bit_*` say; CUDA only."""
    if not torch.cuda.is_available():
        raise PipelineError(
            "model.load_in_4bit=true (QLoRA) needs a CUDA GPU and bitsandbytes, and this machine "
            "has no CUDA device. Drop the override (train in "
            f"{model_cfg.dtype}) or run on a GPU machine.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise PipelineError("QLoRA needs bitsandbytes: pip install '.[qlora]'") from e
    from transformers import BitsAndBytesConfig
    compute = DTYPES["bfloat16"] if model_cfg.dtype == "float32" else DTYPES[model_cfg.dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=model_cfg.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=compute)


def _fit_embeddings(model, tokenizer) -> None:
    # A pad token added above needs a row in the embedding table; its values never
    # matter because padded positions are masked everywhere.
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def load_causal_lm(source: str, model_cfg, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs(model_cfg))
    _fit_embeddings(model, tokenizer)
    return model


def load_sequence_classifier(source: str, model_cfg, tokenizer):
    """The backbone with a fresh scalar head (``num_labels=1``) that reads the last real token."""
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, **model_kwargs(model_cfg))
    _fit_embeddings(model, tokenizer)
    return model


def lora_config(lora_cfg, task_type: str, modules_to_save: Optional[list[str]] = None) -> peft.LoraConfig:
    target = lora_cfg.target_modules
    if not isinstance(target, str):
        target = list(target)
    return peft.LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=target, bias=lora_cfg.bias, task_type=task_type,
        modules_to_save=modules_to_save,
    )
