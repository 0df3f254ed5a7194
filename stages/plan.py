"""`make plan`: the memory the sft, rm and ppo stages would hold on a GPU, and the settings that fit a
card, before anything runs: the model's shape comes from its config.json, no weights load.

    make plan ARGS="model=llama3 gpu_memory=24GiB"
    make plan ARGS="model=qwen2 model.path=/models/qwen2.5-7b gpu_memory=80GB ppo.micro_batch_size=auto"
    make plan ARGS="gpu_memory=24e9 train.max_length=1024 train.gradient_checkpointing=true lora.r=64"

Each stage's config is composed from conf/<stage>.yaml with the overrides whose top-level key it has,
as `make pipeline` composes them (train.* reaches sft and rm, ppo.* the RL stage), and planned for
the plan's ``model``. With ``model.path`` null the shape is the run's base artifact's, or, before
`make base`, the world's model as conf/base.yaml sets it. The memory model: pipeline/plan/memory.py.
"""

from __future__ import annotations

import sys

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.artifacts import find_parent
from pipeline.core.errors import ArtifactError, ConfigError
from pipeline.core.runtime import user_errors
from pipeline.plan.arch import Arch, arch_of, read_arch
from pipeline.plan.card import the_card
from pipeline.plan.report import plan_stage, table
from pipeline.plan.settings import settings
from stages.pipeline import compose_stage, overrides_for, top_level_key

STAGES = ("sft", "rm", "ppo")


def arch_for(cfg: DictConfig) -> tuple[Arch, str]:
    """The planned model's shape and where it was read: ``model.path``, else the run's base artifact,
    else the world's model as conf/base.yaml (with any arch.* / tokenizer.* overrides) would build it."""
    if cfg.model.path:
        return read_arch(cfg.model.path, cfg.model.name), cfg.model.path
    try:
        base = str(find_parent(cfg.paths.run_dir, "base").path / "model")
        return read_arch(base, cfg.model.name), base
    except ArtifactError:
        world = compose_stage("base", [o for o in cfg.overrides if top_level_key(o) in ("arch", "tokenizer")])
        a = world.arch
        return arch_of(cfg.model.name, layers=a.num_hidden_layers, hidden=a.hidden_size,
                       intermediate=a.intermediate_size, heads=a.num_attention_heads,
                       kv_heads=a.num_key_value_heads, vocab=world.tokenizer.vocab_size,
                       tied=a.tie_word_embeddings), "conf/base.yaml: the world's model, no base artifact yet"


def stage_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """sft, rm and ppo composed with the overrides that concern each, all planned for the plan's model."""
    configs = {}
    for name in STAGES:
        keys = set(compose_stage(name, [])) - {"model"}
        configs[name] = compose_stage(name, overrides_for(keys, list(cfg.overrides)))
        configs[name].model = cfg.model
    return configs


def run(cfg: DictConfig) -> dict[str, dict]:
    """Print the plan; returns each stage's (settings, breakdown, peak, fits, options)."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown {unknown}; choose from {list(STAGES)}")
    card, card_source = the_card(cfg.gpu_memory)
    arch, source = arch_for(cfg)
    configs = stage_configs(cfg)
    ranks = (configs["sft"].lora.r, configs["rm"].lora.r)  # PPO's adapters: policy and reference, reward and value
    plans = {}
    for name in cfg.stages:
        # Planned for a card: under precision auto the activations are 16-bit, as on any CUDA device.
        s = settings(name, configs[name], on_gpu=card is not None, prompt=cfg.ppo_prompt_tokens, ranks=ranks)
        plans[name] = plan_stage(arch, s, card)
    print(table(arch, source, card, card_source, plans))
    return plans


@user_errors
def launch(overrides: list[str]) -> dict[str, dict]:
    """Compose conf/plan.yaml with its own overrides; the rest go to the stages' configs."""
    if any(o in ("-m", "--multirun") for o in overrides):
        raise ConfigError("make plan takes one configuration; run it once per setting")
    own = set(compose_stage("plan", [])) - {"run_name", "seed", "paths"}
    known = set().union(*(set(compose_stage(s, [])) for s in STAGES), own, {"hydra", "arch", "tokenizer"})
    unused = [o for o in overrides if top_level_key(o) not in known]
    if unused:
        raise ConfigError(f"no key of conf/plan.yaml or conf/{{sft,rm,ppo}}.yaml matches {unused}")
    cfg = compose_stage("plan", overrides_for(own | {"run_name", "seed", "paths"}, overrides))
    cfg.overrides = [o for o in overrides if top_level_key(o) not in own]
    return run(cfg)


def main() -> None:
    try:
        launch(sys.argv[1:])
    except (HydraException, OmegaConfBaseException) as e:  # a bad override: Hydra's message
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
