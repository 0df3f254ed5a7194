"""DPO stage: TRL's DPOTrainer on the tiny chain, the SFT model as its reference."""

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.artifacts import find_parent, load_artifact
from pipeline.models.policies import load_policy
from pipeline.models.reward import load_sft_tokenizer
from stages import dpo
from tests.conftest import compose_config
from tests.stage.conftest import QUIET

pytestmark = pytest.mark.stage

TINY_DPO = ["train.max_steps=6", "train.per_device_train_batch_size=8", "train.per_device_eval_batch_size=32",
            "train.eval_steps=0"] + QUIET


def test_the_reference_is_the_sft_model_so_the_implicit_reward_starts_at_zero(chain, tmp_path):
    cfg = compose_config("dpo", TINY_DPO)
    sft = find_parent(cfg.paths.run_dir, "sft")
    fmt = load_sft_tokenizer(sft)
    rows = dpo.dpo_rows(fmt, cfg.data.prefs.eval, cfg)[:32]
    trainer = dpo.dpo_trainer(cfg, sft, fmt, rows, rows, tmp_path, "none")
    before = trainer.evaluate()
    # beta * (log pi - log pi_ref) with pi = pi_ref = SFT: zero. With the base as reference
    # (LoRA "adapter disabled") it would be far from zero.
    assert abs(before["eval_rewards/chosen"]) < 1e-5 and abs(before["eval_rewards/margins"]) < 1e-5


def test_dpo_trains_a_policy_adapter_that_loads_as_a_stage(chain):
    metrics = dpo.run(compose_config("dpo", TINY_DPO))
    art = load_artifact(chain / "artifacts/default/dpo", "dpo")
    assert art.manifest["parent"]["stage"] == "sft" and art.metrics == metrics
    assert "eval_rewards/accuracies" in metrics and metrics["train_loss"] > 0
    trained = load_file(art.path / "policy" / "adapter_model.safetensors")
    started = load_file(chain / "artifacts/default/sft/adapter/adapter_model.safetensors")
    assert trained.keys() == started.keys()  # the SFT adapter's layout, on the base
    assert any(not torch.equal(trained[k], started[k]) for k in trained)
    assert not any("embed" in k for k in trained)  # no embedding copy in the adapter
    policy, fmt = load_policy("dpo", compose_config("eval", QUIET))
    assert fmt.stop_ids and policy is not None
    assert not (chain / "artifacts/default/.work/dpo").exists()  # a finished stage removes its checkpoints
