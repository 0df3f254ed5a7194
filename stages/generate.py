"""Sample any stage's policy (base, sft or ppo) and print each prompt with its response.

The decoding strategies are the files in ``conf/decoding/`` (greedy, beam, sample, top_k,
top_p); any of their fields can be overridden. Prompts come from ``prompt=...`` or from
``prompt_file=`` a ``.txt`` (one per line) or ``.jsonl`` (``{"prompt": ...}`` per line).

    make generate ARGS="stage=sft prompt='What is 2 plus 3?' decoding=top_p"
    make generate ARGS="stage=base prompt_file=prompts.jsonl decoding=sample decoding.temperature=0.7"
    python -m stages.generate stage=ppo prompt="Where is the capital of Dravia?" decoding=beam
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.generation import check_decoding, generate, read_prompt_file
from pipeline.policies import POLICY_STAGES, load_policy
from pipeline.runtime import PipelineError, seed_everything, user_errors


def read_prompts(cfg: DictConfig) -> list[str]:
    """Exactly one of ``prompt`` and ``prompt_file``; a malformed file line names file:line."""
    if (cfg.prompt is None) == (cfg.prompt_file is None):
        raise PipelineError("give exactly one of prompt='...' or prompt_file=path (.txt or .jsonl)")
    if cfg.prompt is not None:
        if not cfg.prompt.strip():
            raise PipelineError("prompt is empty; give it some text")
        return [cfg.prompt]
    try:
        return read_prompt_file(cfg.prompt_file)
    except FileNotFoundError:
        raise PipelineError(f"prompt_file {cfg.prompt_file} not found") from None
    except ValueError as e:
        raise PipelineError(str(e)) from None


def run(cfg: DictConfig) -> list[tuple[str, str]]:
    if cfg.stage not in POLICY_STAGES:
        raise PipelineError(f"stage={cfg.stage} has no policy to sample; use one of {list(POLICY_STAGES)}")
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.num_threads)

    # --- prompts and decoding first: a bad file or setting fails before any model loads ---
    prompts = read_prompts(cfg)
    check_decoding(cfg.decoding)

    # --- the stage's policy, adapter merged ---
    model, tokenizer = load_policy(cfg.stage, cfg)

    # --- generate and print ---
    responses = generate(model, tokenizer, prompts, cfg.decoding, cfg.batch_size, cfg.seed)
    print(f"{cfg.stage} policy, decoding {cfg.decoding.name}:")
    for prompt, response in zip(prompts, responses):
        print(f"\n> {prompt}\n{response}")
    return list(zip(prompts, responses))


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
