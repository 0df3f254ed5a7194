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
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline.core.artifacts import Artifact, find_parent
from pipeline.core.errors import PipelineError
from pipeline.data.chat import ChatFormat, load_chat_format

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_model_source(cfg, override: Optional[str] = None) -> tuple[str, Optional[Artifact]]:
    """Where the base weights come from: ``model.path``, else the ``base`` artifact
    (``override`` when set, the same run's otherwise)."""
    if cfg.model.path:
        return cfg.model.path, None
    base = find_parent(cfg.paths.run_dir, "base", override)
    return str(base.path / "model"), base


def load_tokenizer(source: str, model_cfg) -> ChatFormat:
    """The tokenizer with its chat template, stop set and a dedicated pad token (pipeline/data/chat.py)."""
    return load_chat_format(source, model_cfg.chat_template, model_cfg.trust_remote_code)


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


def _fit_embeddings(model, fmt: ChatFormat) -> None:
    # A pad token added by the loader needs a row in the embedding table. Padded positions are
    # masked everywhere, but with tied embeddings the row is also the pad token's output logit:
    # it is set to the mean of the existing rows, the same on every load, so that resumed runs,
    # data-parallel replicas and reloaded adapters all see one model. Being reproducible, it is
    # never saved into adapters (save_embedding_layers=False).
    old = model.get_input_embeddings().num_embeddings
    if old < len(fmt.tokenizer):
        model.resize_token_embeddings(len(fmt.tokenizer), mean_resizing=False)
        head = model.get_output_embeddings()  # None for a sequence classifier
        with torch.no_grad():
            for table in {model.get_input_embeddings().weight, *([head.weight] if head is not None else [])}:
                table[old:] = table[:old].mean(0)
    model.config.pad_token_id = fmt.pad_id
    # A fresh generation config: the hub's generation_config.json (repetition penalty, top_k,
    # min_new_tokens, suppress_tokens, ...) would otherwise fill every key a caller leaves unset.
    model.generation_config = fmt.generation_config()


def _absolute(source: str) -> str:
    """A local folder as an absolute path: adapters record where their base came from, and must
    load from any working directory. Hub ids stay as they are."""
    return str(Path(source).resolve()) if Path(source).exists() else source


def _contiguous_input(module, args):
    # `logits_to_keep` hands the LM head a slice of the hidden states, a non-contiguous view;
    # linear() then runs as a batched matmul against the broadcast (V, H) weight, about half as
    # fast as one matmul over the flattened rows, in the forward and the backward pass alike.
    return (args[0].contiguous(), *args[1:])


def load_causal_lm(source: str, model_cfg, fmt: ChatFormat):
    model = AutoModelForCausalLM.from_pretrained(_absolute(source), **model_kwargs(model_cfg))
    _fit_embeddings(model, fmt)
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    return model


def load_sequence_classifier(source: str, model_cfg, fmt: ChatFormat):
    """The backbone with a fresh scalar head (``num_labels=1``) that reads the last real token."""
    model = AutoModelForSequenceClassification.from_pretrained(_absolute(source), num_labels=1,
                                                               **model_kwargs(model_cfg))
    _fit_embeddings(model, fmt)
    return model


def lora_config(lora_cfg, task_type: str, modules_to_save: Optional[list[str]] = None) -> peft.LoraConfig:
    target = lora_cfg.target_modules
    if not isinstance(target, str):
        target = list(target)
    return peft.LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=target, bias=lora_cfg.bias, task_type=task_type,
        modules_to_save=modules_to_save, use_rslora=lora_cfg.use_rslora, use_dora=lora_cfg.use_dora,
        rank_pattern=dict(lora_cfg.rank_pattern), alpha_pattern=dict(lora_cfg.alpha_pattern),
    )
