"""Export a stage's policy as a plain Hugging Face model folder: the adapter merged into the base.

The folder holds the merged weights (safetensors), the tokenizer with its chat template and pad
token, and a ``generation_config.json`` whose ``eos_token_id`` lists every stop token, so it
loads and generates with ``transformers`` alone (no peft, no code from this project)::

    model = AutoModelForCausalLM.from_pretrained("artifacts/default/export-ppo")

    make export                          # the ppo policy -> artifacts/<run>/export-ppo
    make export ARGS="stage=dpo"
    make export ARGS="stage=sft"
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.artifacts import find_parent, staged_artifact
from pipeline.core.errors import PipelineError
from pipeline.core.runtime import output_run_dir, resolved, user_errors
from pipeline.core.tracking import start_tracking
from pipeline.core.validation import check_ranges
from pipeline.models.policies import POLICY_STAGES, load_policy


def run(cfg: DictConfig) -> str:
    if cfg.stage not in POLICY_STAGES or cfg.stage == "base":
        raise PipelineError(f"stage={cfg.stage}: export takes a trained policy, one of {list(POLICY_STAGES[1:])}")
    check_ranges(cfg)
    torch.set_num_threads(cfg.num_threads)
    parent = find_parent(cfg.paths.run_dir, cfg.stage)

    # --- load: base + the stage's adapter, merged; fresh generation config with the stop set ---
    model, fmt = load_policy(cfg.stage, cfg, merge=True)

    # --- save: weights, tokenizer + template, generation_config.json ---
    folder = f"export-{cfg.stage}"
    with staged_artifact(output_run_dir(cfg), "export", resolved(cfg), parent=parent, folder=folder) as art:
        model.save_pretrained(art.dir, safe_serialization=True)
        fmt.save(art.dir)
        art.metrics = {"parameters": sum(p.numel() for p in model.parameters()), "stop_token_ids": list(fmt.stop_ids)}
    tracker = start_tracking(cfg, "export")
    tracker.log_artifact(art.artifact)
    tracker.finish()
    print(f"export: {cfg.stage} policy merged into {art.final} (loads with AutoModelForCausalLM; "
          f"stops at {fmt.tokenizer.convert_ids_to_tokens(list(fmt.stop_ids))})")
    return str(art.final)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
