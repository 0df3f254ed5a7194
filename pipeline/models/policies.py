"""Loading any stage's policy as a plain causal LM: base, sft, dpo or an RL stage.

Artifacts hold LoRA adapters, never full copies of the base: ``sft/adapter``, ``dpo/policy``
and ``<algorithm>/policy`` (ppo, rloo, grpo, ...) are all adapters on the *base* weights (the
DPO and RL policy adapters start as copies of the SFT adapter). For sampling, the adapter is
merged into the base so generation runs at plain-model speed.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from pipeline.core.artifacts import RL_STAGES, Artifact, find_parent, recorded_parent
from pipeline.data.chat import load_saved_chat_format
from pipeline.models.loading import load_causal_lm, load_tokenizer

POLICY_STAGES = ("base", "sft", "dpo", *RL_STAGES)
ADAPTER_DIR = {"sft": "adapter", "dpo": "policy", **{s: "policy" for s in RL_STAGES}}


def base_source_for(art: Artifact) -> str:
    """The base weights under an sft/ppo adapter: follow the parent chain down to ``base``,
    or the hub id / path the chain's config named when there is no base artifact."""
    while art.stage != "base":
        parent = recorded_parent(art)  # refuses an adapter whose base was rebuilt since
        if parent is None:
            return art.manifest["config"]["model"]["path"]
        art = parent
    return str(art.path / "model")


def adapter_dir(art: Artifact) -> Path:
    return art.path / ADAPTER_DIR[art.stage]


def load_policy(stage: str, cfg, merge: bool = True):
    """(model, chat format) of ``stage``'s policy in eval mode, from ``cfg.paths.run_dir``.

    ``base`` with a configured ``model.path`` loads that model directly.
    """
    if stage not in POLICY_STAGES:
        raise ValueError(f"stage must be one of {POLICY_STAGES}, got {stage!r}")
    if stage == "base":
        if cfg.model.path:
            source = cfg.model.path
        else:
            source = str(find_parent(cfg.paths.run_dir, "base").path / "model")
        fmt = load_tokenizer(source, cfg.model)
        return load_causal_lm(source, cfg.model, fmt).eval(), fmt
    return load_policy_artifact(find_parent(cfg.paths.run_dir, stage), cfg.model, merge)


def load_policy_artifact(art: Artifact, model_cfg, merge: bool = True):
    """(model, chat format) of a policy artifact (sft, dpo or an RL stage) in eval mode: its
    adapter on the base it records, merged for plain-model speed unless ``merge`` is off."""
    fmt = load_saved_chat_format(adapter_dir(art))
    model = load_causal_lm(base_source_for(art), model_cfg, fmt)
    model = PeftModel.from_pretrained(model, adapter_dir(art))
    if merge:
        model = model.merge_and_unload()
    return model.eval(), fmt
