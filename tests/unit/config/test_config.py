"""The Hydra tree: every group composes, and mistakes fail at once with Hydra's message."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from tests.conftest import CONF_DIR, compose_config

pytestmark = pytest.mark.unit

PRIMARY = sorted(p.stem for p in Path(CONF_DIR).glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (Path(CONF_DIR) / g).glob("*.yaml"))
          for g in ("model", "logger", "lora", "data", "paths", "world")}
DECODINGS = sorted(p.stem for p in (Path(CONF_DIR) / "decoding").glob("*.yaml"))


def test_every_stage_has_a_primary_config():
    assert {"base", "datagen", "sft", "rm", "ppo", "eval", "generate", "pipeline"} <= set(PRIMARY)


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes_and_resolves(name, root):
    cfg = compose_config(name)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # no ??? left anywhere
    assert cfg.paths.run_dir == f"{root}/artifacts/default"


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    stage = "datagen" if group == "world" else "base" if group in ("paths",) else "sft"
    cfg = compose_config(stage, [f"{group}={option}"])
    OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("option", DECODINGS)
def test_every_decoding_composes(option):
    cfg = compose_config("sft", [f"decoding@samples.decoding={option}"])
    assert cfg.samples.decoding.name == option


@pytest.mark.parametrize("model", ["llama", "qwen2", "gpt2"])
def test_real_model_configs_name_a_hub_id_and_keep_remote_code_off(model):
    cfg = compose_config("sft", [f"model={model}"])
    assert "/" in cfg.model.path and cfg.model.trust_remote_code is False


def test_override_changes_the_setting():
    assert compose_config("sft", ["lora.r=4"]).lora.r == 4


def test_misspelled_key_fails():
    with pytest.raises(ConfigCompositionException) as e:
        compose_config("sft", ["lora.rank=4"])
    assert "Key 'rank' not in 'LoraConfig'" in str(e.value.__cause__)


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException) as e:
        compose_config("sft", ["lora.r=four"])
    assert isinstance(e.value.__cause__, ValidationError)


def test_command_line_typo_exits_nonzero_with_hydra_message():
    out = subprocess.run([sys.executable, "-m", "stages.base", "trian.max_steps=3"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "Could not override 'trian.max_steps'" in out.stderr


def test_schemas_hold_no_defaults():
    import dataclasses

    from omegaconf import MISSING

    import pipeline.config as c
    for schema in (c.BaseStageConfig, c.SFTStageConfig, c.RMStageConfig, c.PPOStageConfig, c.PPOConfig,
                   c.HFTrainConfig, c.ModelConfig, c.LoraConfig, c.LoggerConfig, c.PathsConfig):
        for f in dataclasses.fields(schema):
            assert f.default is MISSING, f"{schema.__name__}.{f.name} has a default in code"


@pytest.mark.parametrize("overrides, message", [
    (["train.label_smoothing=0.1"], r"train.label_smoothing=0.1 has no effect with train.loss_type=\['apo_zero'\]"),
    (["train.loss_type=[sigmoid,sft]", "train.loss_weights=[1.0]"], "train.loss_weights has 1 entries for 2 losses"),
    (["train.loss_type=[sigmoid,sft]", "train.loss_weights=null"],  # use_weighting: true, the default
     r"train.use_weighting=true does not work with 'sft' in train.loss_type"),
])
def test_dpo_refuses_loss_settings_trl_would_ignore(overrides, message):
    from pipeline.core.errors import ConfigError
    from stages.dpo import check_losses
    with pytest.raises(ConfigError, match=message):
        check_losses(compose_config("dpo", overrides).train)
    check_losses(compose_config("dpo", ["train.loss_type=[robust]", "train.label_smoothing=0.1",
                                        "train.loss_weights=null"]).train)
    check_losses(compose_config("dpo").train)  # the shipped default: WPO
    check_losses(compose_config("dpo", ["train.loss_type=[sigmoid,sft]", "train.use_weighting=false"]).train)
