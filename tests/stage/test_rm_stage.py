"""RM stage: real RewardTrainer on the tiny SFT model."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import pipeline.models.reward
from pipeline.core.artifacts import find_parent, load_artifact
from pipeline.data.layouts import load_validated, preference_example, preference_rows, tokenized
from pipeline.models.reward import load_reward_model
from pipeline.training.reward import evaluate_pairs
from stages import rm
from tests.conftest import compose_config
from tests.stage.conftest import QUIET, TINY_RM

pytestmark = pytest.mark.stage


def test_rm_trains_adapter_and_head_and_leaves_backbone(chain, monkeypatch):
    seen = {}
    real = pipeline.models.reward.sft_backbone_classifier

    def recording(*a, **k):
        model = real(*a, **k)
        seen["model"] = model
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(rm, "sft_backbone_classifier", recording)
    metrics = rm.run(compose_config("rm", TINY_RM + QUIET + ["train.max_steps=40",
                                                             "train.per_device_train_batch_size=16"]))
    for name, p in seen["model"].named_parameters():
        if "lora_" in name or "score" in name:
            continue
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.detach(), seen["before"][original]), f"backbone weight {original} changed"
    saved = load_file(chain / "artifacts/default/rm/adapter/adapter_model.safetensors")
    head = [v for k, v in saved.items() if "score" in k]
    assert len(head) == 1 and not torch.equal(head[0], seen["before"]["score.weight"])
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    # It learned the preferences: on 300 held-out pairs chance is 0.5 +- 0.03; 40 steps reach ~0.72.
    assert metrics["eval_accuracy"] >= 0.62 and metrics["eval_margin_mean"] > 0
    assert metrics["reward_std"] > 0


def test_saved_rm_reloads_to_identical_scores(chain):
    metrics = rm.run(compose_config("rm", TINY_RM + QUIET))
    cfg = compose_config("rm", TINY_RM + QUIET)
    model, fmt = load_reward_model(find_parent(cfg.paths.run_dir, "rm"), find_parent(cfg.paths.run_dir, "sft"),
                                   cfg.model)
    rows = load_validated(cfg.data.prefs.eval, cfg.data.hub_split,
                          tokenized(preference_rows, lambda r: preference_example(fmt, r)))
    reloaded, _, _ = evaluate_pairs(model, fmt, rows, cfg.score_batch_size)
    # In-process scores were recorded in the manifest at training time.
    assert reloaded["accuracy"] == metrics["eval_accuracy"]
    assert reloaded["margin_mean"] == pytest.approx(metrics["eval_margin_mean"], abs=1e-5)
    assert reloaded["chosen_mean"] == pytest.approx(metrics["eval_chosen_mean"], abs=1e-5)


def test_missing_sft_names_make_sft(world_root, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(world_root, root, symlinks=True)
    env = {"RLHF_ROOT": str(root), "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-m", "stages.rm", "logger=none"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "Run `make sft` first" in out.stderr and "Traceback" not in out.stderr


def test_use_margin_puts_the_margin_into_the_loss(chain):
    # -log sigmoid(d - m) > -log sigmoid(d) for m > 0; the world's margins are rank gaps >= 1,
    # so at the same seed the margin loss starts far higher (log(1 + e) vs log 2 at d = 0).
    plain = rm.run(compose_config("rm", TINY_RM + QUIET + ["train.use_margin=false"]))
    margin = rm.run(compose_config("rm", TINY_RM + QUIET + ["train.use_margin=true"]))
    assert margin["train_loss_mean"] > plain["train_loss_mean"] + 0.2
    assert plain["train_use_margin"] is False and margin["train_use_margin"] is True
    # the default, auto: every world comparison has a margin, so it trains as `true` does
    auto = rm.run(compose_config("rm", TINY_RM + QUIET))
    assert auto["train_use_margin"] is True
    assert auto["train_loss_mean"] == pytest.approx(margin["train_loss_mean"], rel=1e-4)


def test_conflicting_batch_orders_are_refused(chain):
    from pipeline.core.errors import PipelineError
    with pytest.raises(PipelineError, match="group_pairs=true and train.group_by_length=true"):
        rm.run(compose_config("rm", TINY_RM + QUIET + ["train.group_by_length=true"]))


FIXTURES = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.mark.parametrize("fixture", ["hh_rlhf.jsonl", "ultrafeedback_binarized.jsonl"])
def test_public_preference_layouts_train_the_rm(chain, fixture):
    path = FIXTURES / fixture
    metrics = rm.run(compose_config("rm", TINY_RM + QUIET + [f"data.prefs.train=[{path}]",
                                                              f"data.prefs.eval=[{path}]"]))
    assert metrics["train_loss"] > 0 and metrics["train_pairs_dropped_too_long"] == 0
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert metrics["train_use_margin"] is False  # auto: these pairs carry no margin


def test_public_hh_rows_with_defects_are_skipped_and_recorded(chain, capsys):
    # The released HH-RLHF set has empty final turns, chosen == rejected and repeated speakers:
    # by default (data.bad_rows=skip) they are counted, printed and recorded, not fatal.
    path = FIXTURES / "hh_rlhf_defects.jsonl"
    metrics = rm.run(compose_config("rm", TINY_RM + QUIET + [f"data.prefs.train=[{path}]",
                                                              f"data.prefs.eval=[{FIXTURES / 'hh_rlhf.jsonl'}]"]))
    assert metrics["data/skipped_empty_turn"] == 2 and metrics["data/skipped_identical_pair"] == 2
    assert metrics["data/merged_turns"] == 2 and metrics["data/skipped_malformed"] == 0
    assert load_artifact(chain / "artifacts/default/rm", "rm").metrics == metrics
    out = capsys.readouterr().out
    assert f"{path}" in out and "line 3" in out and "line 5" in out
    from pipeline.core.errors import PipelineError
    with pytest.raises(PipelineError, match=r"hh_rlhf_defects.jsonl, line 3: .*data.bad_rows=skip"):
        rm.run(compose_config("rm", TINY_RM + QUIET + [f"data.prefs.train=[{path}]", "data.bad_rows=error"]))
