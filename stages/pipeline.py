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

``+experiment=<name>`` (conf/experiment/<name>.yaml, ``# @package _global_``) stands for its group
choices (``override /data: hh_rlhf`` -> ``data=hh_rlhf``, to every config with that group) and its
settings, each to the configs that have its key (``ppo.micro_batch_size`` to the RL stage only);
the command line's own overrides come after it and win:

    make pipeline ARGS="+experiment=qwen_hh"
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
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.artifacts import Artifact, find_parent, is_up_to_date, stage_path
from pipeline.core.errors import ArtifactError, PipelineError
from pipeline.core.runtime import resolved, user_errors

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# What each stage records as its parent artifact (what `staged_artifact(parent=...)` gets).
PARENT = {"base": None, "sft": "base", "rm": "sft", "dpo": "sft", "ppo": "rm"}  # dpo: rm with pairs.source=policy|both
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
    overrides, settings, choices = expand_experiments(overrides)
    keys = {name: set(compose_stage(name, [])) for name in names}
    known = set(compose_stage("pipeline", [])).union(*keys.values(), {"hydra"})  # conf/pipeline.yaml's `stages` too
    unused = [o for o in overrides if o not in settings and top_level_key(o) not in known]
    if unused:
        raise PipelineError(f"no stage config has the key of {unused}; the configs are "
                            f"conf/{{{','.join(names)}}}.yaml")
    configs = {name: stage_overrides(name, keys[name], overrides, settings) for name in names}
    # An experiment's settings for the stages not run here (its ppo.* under stages=[sft]) are no typo.
    experiments = [o for o in overrides if o in settings | choices]
    others = [n for n in ("pipeline", *STAGES) if n not in names and settings]
    landed = {o for n in others for o in stage_overrides(n, set(compose_stage(n, [])), experiments, settings)}
    lost = sorted(settings - landed.union(*configs.values()))
    if lost:
        raise PipelineError(f"no stage config has the key of the experiment's {lost} (conf/experiment/)")
    return {name: compose_stage(name, own) for name, own in configs.items()}


# --- experiments: conf/experiment/<name>.yaml as overrides, each to the configs that have its key -------


def expand_experiments(overrides: list[str]) -> tuple[list[str], set[str], set[str]]:
    """The overrides with each ``+experiment=<name>`` replaced, in place, by its group choices and
    settings; the set of those settings (``key=value``), which reach only configs with the key; and
    the set of its group choices (``data=hh_rlhf``)."""
    out, settings, choices = [], set(), set()
    for o in overrides:
        if top_level_key(o) != "experiment":
            out.append(o)
            continue
        path = CONF_DIR / "experiment" / f"{OverridesParser.create().parse_overrides([o])[0].value()}.yaml"
        if not path.is_file():
            have = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
            raise PipelineError(f"{o}: no {path}; the experiments are {have}")
        exp = OmegaConf.load(path)
        for entry in exp.pop("defaults", []):
            group, choice = next(iter(entry.items())) if OmegaConf.is_dict(entry) else (None, None)
            if group is None or not group.startswith("override /"):
                raise PipelineError(f"{path}: its defaults may only hold `- override /<group>: <choice>`, "
                                    f"got {entry}")
            out.append(f"{group.removeprefix('override /')}={choice}")
            choices.add(out[-1])
        flat = [f"{key}={hydra_value(value)}" for key, value in leaves(OmegaConf.to_container(exp))]
        out += flat
        settings |= set(flat)
    return out, settings, choices


def leaves(node, prefix: str = "") -> list[tuple[str, object]]:
    """``{"ppo": {"micro_batch_size": 4}}`` -> ``[("ppo.micro_batch_size", 4)]`` (lists and {} are leaves)."""
    if not isinstance(node, dict) or not node:
        return [(prefix, node)]
    return [kv for k, v in node.items() for kv in leaves(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")]


def hydra_value(value) -> str:
    """A YAML value in Hydra's override syntax (strings quoted, so ``${...}`` and ``:`` pass through)."""
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def stage_overrides(name: str, keys: set[str], overrides: list[str], settings: set[str]) -> list[str]:
    """The overrides for one config: its top-level keys' (``overrides_for``), and of the experiments'
    settings those whose whole key it has once the experiments' group choices are applied."""
    plain = overrides_for(keys, [o for o in overrides if o not in settings])
    if not settings:
        return plain
    cfg = compose_stage(name, plain)
    has = {o for o in settings if OmegaConf.select(cfg, o.split("=", 1)[0], default=_ABSENT) is not _ABSENT}
    return [o for o in overrides if o in has or (o not in settings and o in plain)]


_ABSENT = object()


# --- stages: which exist, which are up to date ----------------------------------------------


def stage_runner(name: str) -> Callable[[DictConfig], object]:
    """``stages.<name>.run``, imported only when the pipeline needs it."""
    return importlib.import_module(f"stages.{name}").run


def parent_artifact(stage: str, cfg: DictConfig) -> Optional[Artifact]:
    """The artifact the stage records as its parent; ArtifactError when it is missing."""
    if stage == "eval":
        from stages.eval import eval_parent
        return eval_parent(cfg.paths.run_dir)
    parent = "rm" if stage == "dpo" and cfg.pairs.source != "data" else PARENT[stage]  # on-policy DPO ranks with the RM
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
               *data.sft.eval, *data.prefs.train, *data.prefs.eval, *data.ppo_prompts, *data.eval_prompts,
               *data.val_prompts]
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
    expanded, settings, _ = expand_experiments(overrides)
    return run(compose_stage("pipeline", stage_overrides("pipeline", keys, expanded, settings)), overrides)


def main() -> None:
    try:
        launch(sys.argv[1:])
    except (HydraException, OmegaConfBaseException) as e:  # a bad override: Hydra's message
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
