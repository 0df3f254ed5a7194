"""The whole InstructGPT recipe in one command: base, sft, rm, ppo, then the comparison.

Each stage runs in this process through its own ``run(cfg)``, with its config composed
from ``conf/<stage>.yaml`` exactly as ``python -m stages.<stage>`` composes it, plus the
command-line overrides whose top-level key that config has (``run_name`` and ``seed``
are in all of them; ``arch.*`` only reaches base, ``train.*`` every trained stage).
The world's data is written first when a file is missing. A stage whose artifact was
built from this exact config and this exact parent is skipped; ``eval`` reruns whenever
an earlier stage ran.

    make pipeline
    make pipeline ARGS="algorithm=rloo"          # the RL stage with RLOO: artifacts/<run>/rloo
    make pipeline ARGS="stages=[base,sft,rm,dpo,eval]"
    make pipeline ARGS="run_name=exp seed=1"
    make pipeline ARGS="run_name=small train.max_steps=50 arch.num_hidden_layers=2 logger=none"

The overrides are read here rather than by ``@hydra.main``: they target the stages'
configs, and Hydra would reject e.g. ``arch.hidden_size=64`` against conf/pipeline.yaml.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.artifacts import Artifact, find_parent, is_up_to_date, stage_path
from pipeline.core.errors import ArtifactError, PipelineError
from pipeline.core.runtime import resolved, user_errors

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# What each stage records as its parent artifact (what `staged_artifact(parent=...)` gets).
PARENT = {"base": None, "sft": "base", "rm": "sft", "dpo": "sft", "ppo": "rm"}
STAGES = ("base", "sft", "rm", "dpo", "ppo", "eval")


# --- configs: each stage's own, with the overrides that concern it -------------------------


def compose_stage(name: str, overrides: list[str]) -> DictConfig:
    """``conf/<name>.yaml`` with ``overrides``, as ``python -m stages.<name>`` composes it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=name):
        return compose(config_name=name, overrides=overrides)


def top_level_key(override: str) -> str:
    """The config key an override lands under: ``train.max_steps=3`` -> ``train``,
    ``decoding@samples.decoding=top_k`` -> ``samples``, ``logger=none`` -> ``logger``."""
    parsed = OverridesParser.create().parse_overrides([override])[0]
    return (parsed.package or parsed.key_or_group).split(".")[0]


def overrides_for(keys: set[str], overrides: list[str]) -> list[str]:
    """The overrides whose top-level key is among ``keys`` (``hydra.*`` goes everywhere)."""
    return [o for o in overrides if top_level_key(o) in keys | {"hydra"}]


def compose_all(names: list[str], overrides: list[str]) -> dict[str, DictConfig]:
    """Every config up front, so a typo fails before hours of training, not after.

    An override no config has (``trian.max_steps=3``) is an error, not silently dropped.
    """
    keys = {name: set(compose_stage(name, [])) for name in names}
    unused = [o for o in overrides if not any(top_level_key(o) in k | {"hydra"} for k in keys.values())]
    if unused:
        raise PipelineError(f"no stage config has the key of {unused}; the configs are "
                            f"conf/{{{','.join(names)}}}.yaml")
    return {name: compose_stage(name, overrides_for(keys[name], overrides)) for name in names}


# --- stages: which exist, which are up to date ----------------------------------------------


def stage_runner(name: str) -> Callable[[DictConfig], object]:
    """``stages.<name>.run``, imported only when the pipeline needs it."""
    return importlib.import_module(f"stages.{name}").run


def parent_artifact(stage: str, cfg: DictConfig) -> Optional[Artifact]:
    """The artifact the stage records as its parent; ArtifactError when it is missing."""
    if stage == "eval":
        from stages.eval import eval_parent
        return eval_parent(cfg.paths.run_dir)
    parent = PARENT[stage]
    if parent is None or (parent == "base" and cfg.model.path):  # a hub model has no base artifact
        return None
    # `parents.<stage>` in the config points at another run's artifact; null = this run's.
    override = cfg.parents[parent] if "parents" in cfg and parent in cfg.parents else None
    return find_parent(cfg.paths.run_dir, parent, override)


def artifact_name(stage: str, cfg: DictConfig) -> str:
    """The RL stage writes under its algorithm's name (ppo, rloo, grpo, ...)."""
    return cfg.algorithm.name if stage == "ppo" else stage


def up_to_date(stage: str, cfg: DictConfig) -> bool:
    try:
        parent = parent_artifact(stage, cfg)
    except ArtifactError:
        return False  # the stage itself will say which parent is missing and how to build it
    return is_up_to_date(cfg.paths.run_dir, artifact_name(stage, cfg), resolved(cfg), parent)


def data_files(data: DictConfig) -> list[str]:
    """The local files the ``data`` config lists (hub dataset ids left out)."""
    sources = [data.pretrain, *([data.pretrain_eval] if data.pretrain_eval else []), *data.sft.train,
               *data.sft.eval, *data.prefs.train, *data.prefs.eval, *data.ppo_prompts, *data.eval_prompts]
    return [s for s in sources if Path(s).suffix in (".json", ".jsonl", ".parquet")]


# --- the pipeline ------------------------------------------------------------------------------


def run(cfg: DictConfig, overrides: list[str]) -> dict[str, str]:
    """Run ``cfg.stages`` in order; returns what happened to each: ran or skipped."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"stages: unknown {unknown}; choose from {list(STAGES)}, in that order")
    runners = {name: stage_runner(name) for name in cfg.stages}

    # --- compose: every stage's config before anything runs ---
    configs = compose_all(["datagen", *cfg.stages], overrides)

    # --- data: the embedded world, when a listed file is missing ---
    missing = [f for f in data_files(cfg.data) if not Path(f).is_file()]
    if missing:
        print(f"pipeline: {missing[0]} is missing: writing the world's data first")
        stage_runner("datagen")(configs["datagen"])

    # --- stages in order; eval reruns whenever something before it ran ---
    outcome, ran_any = {}, False
    for name in cfg.stages:
        stage_cfg = configs[name]
        if name == "base" and stage_cfg.model.path:  # a pretrained model: nothing to build
            print(f"skip base: model.path={stage_cfg.model.path}")
            outcome[name] = "skipped"
            continue
        if not (name == "eval" and ran_any) and up_to_date(name, stage_cfg):
            print(f"skip {artifact_name(name, stage_cfg)}: up to date")
            outcome[name] = "skipped"
            continue
        print(f"\n=== {name} ===")
        t0 = time.time()
        runners[name](stage_cfg)
        print(f"pipeline: {name} took {time.time() - t0:.0f}s")
        outcome[name], ran_any = "ran", True

    # --- the comparison table ---
    report = stage_path(cfg.paths.run_dir, "eval") / "report.md"
    print("\npipeline: " + ", ".join(f"{k} {v}" for k, v in outcome.items()))
    if report.is_file():
        print("\n" + report.read_text())
    return outcome


@user_errors
def launch(overrides: list[str]) -> dict[str, str]:
    """Compose conf/pipeline.yaml with the overrides that concern it, then run."""
    if any(o in ("-m", "--multirun") for o in overrides):
        raise PipelineError("make pipeline runs one configuration; sweep a single stage instead "
                            "(make sft ARGS=\"-m lora.r=4,8\")")
    keys = set(compose_stage("pipeline", []))
    return run(compose_stage("pipeline", overrides_for(keys, overrides)), overrides)


def main() -> None:
    try:
        launch(sys.argv[1:])
    except (HydraException, OmegaConfBaseException) as e:  # a bad override: Hydra's message
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
