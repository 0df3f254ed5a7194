"""Sample any stage's policy (base, sft or ppo) and print each prompt with its response.

The decoding strategies are the files in ``conf/decoding/`` (greedy, beam, sample, top_k,
top_p); any of their fields can be overridden. Prompts come from ``prompt=...`` or from
``prompt_file=`` a ``.txt`` (one per line) or a ``.jsonl`` / ``.json`` / ``.parquet`` of prompt
rows (``{"prompt": "..."}``, or messages with a system turn and several turns). Sampling stops at
the model's stop tokens (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, eos).

    make generate ARGS="stage=sft prompt='What is 2 plus 3?' decoding=top_p"
    make generate ARGS="stage=base prompt_file=prompts.jsonl decoding=sample decoding.temperature=0.7"
    python -m stages.generate stage=ppo prompt="Where is the capital of Dravia?" decoding=beam
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.errors import PipelineError
from pipeline.core.runtime import seed_everything, user_errors
from pipeline.core.validation import check_ranges
from pipeline.data.layouts import load_validated, prompt_row, prompt_text
from pipeline.generation.decoding import as_conversation, check_decoding, generate
from pipeline.models.policies import POLICY_STAGES, load_policy


def read_prompts(cfg: DictConfig) -> list[list[dict]]:
    """Exactly one of ``prompt`` and ``prompt_file``, as conversations; a malformed line names
    its file and line."""
    if (cfg.prompt is None) == (cfg.prompt_file is None):
        raise PipelineError("give exactly one of prompt='...' or prompt_file=path (.txt, .jsonl, .json, .parquet)")
    if cfg.prompt is not None:
        if not cfg.prompt.strip():
            raise PipelineError("prompt is empty; give it some text")
        return [as_conversation(cfg.prompt)]
    path = Path(cfg.prompt_file)
    if path.suffix != ".txt":
        return [r["messages"] for r in load_validated([str(path), ], "train", prompt_row)]
    if not path.is_file():
        raise PipelineError(f"prompt_file {path} not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise PipelineError(f"{path}: no prompts found (the file is empty or blank); add one prompt per line")
    return [as_conversation(line) for line in lines]


def run(cfg: DictConfig) -> list[tuple[str, str]]:
    if cfg.stage not in POLICY_STAGES:
        raise PipelineError(f"stage={cfg.stage} has no policy to sample; use one of {list(POLICY_STAGES)}")
    check_ranges(cfg)
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.num_threads)

    # --- prompts and decoding first: a bad file or setting fails before any model loads ---
    prompts = read_prompts(cfg)
    check_decoding(cfg.decoding)

    # --- the stage's policy, adapter merged ---
    model, fmt = load_policy(cfg.stage, cfg)

    # --- generate and print ---
    responses = generate(model, fmt, prompts, cfg.decoding, cfg.batch_size, cfg.seed)
    print(f"{cfg.stage} policy, decoding {cfg.decoding.name}:")
    texts = [prompt_text(p) for p in prompts]
    for prompt, response in zip(texts, responses):
        print(f"\n> {prompt}\n{response}")
    return list(zip(texts, responses))


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
