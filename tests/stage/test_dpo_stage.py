"""DPO stage: TRL's DPOTrainer on the tiny chain, the SFT model as its reference."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.artifacts import find_parent, load_artifact, sha256_file
from pipeline.core.errors import ArtifactError, ConfigError
from pipeline.data.layouts import load_validated, prompt_row
from pipeline.generation.decoding import DecodingConfig
from pipeline.generation.samples import sample_responses
from pipeline.models.policies import load_policy
from pipeline.models.reward import load_reward_model, load_sft_tokenizer, score_conversations
from pipeline.training.policy_pairs import policy_pairs
from stages import dpo
from stages import pipeline as pipeline_stage
from tests.conftest import compose_config
from tests.stage.conftest import QUIET

pytestmark = pytest.mark.stage

TINY_DPO = ["pairs.source=data", "train.max_steps=6", "train.per_device_train_batch_size=8",
            "train.per_device_eval_batch_size=32", "train.eval_steps=0"] + QUIET


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


def test_the_entropy_term_adds_minus_coef_times_the_chosen_answers_entropy_and_sharpens(chain, tmp_path):
    """train.entropy_coef: the training loss is TRL's loss minus coef times the policy's mean
    entropy on the chosen answers, taken from TRL's own forward pass (its gradient lowers the
    entropy when coef < 0); coef 0 leaves TRL's loss as it is."""
    cfg = compose_config("dpo", TINY_DPO + ["train.learning_rate=1e-2"])
    sft = find_parent(cfg.paths.run_dir, "sft")
    fmt = load_sft_tokenizer(sft)
    rows = dpo.dpo_rows(fmt, cfg.data.prefs.eval, cfg)[:16]
    entropy, losses = {}, {}
    for coef in (0.0, -5.0):
        cfg.train.entropy_coef = coef
        trainer = dpo.dpo_trainer(cfg, sft, fmt, rows, rows, tmp_path / str(coef), "none")
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        losses[coef] = trainer.compute_loss(trainer.model, batch)
        if coef:
            measured = trainer._metrics["train"]["entropy_chosen"][-1]
            assert measured > 0
            assert losses[coef].item() == pytest.approx(losses[0.0].item() + 5.0 * measured, rel=1e-4)
            # The same loss when TRL asks for the outputs too; without gradients (evaluation) TRL's own.
            loss, _ = trainer.compute_loss(trainer.model, batch, return_outputs=True)
            assert loss.item() == pytest.approx(losses[coef].item(), rel=1e-5)
            with torch.no_grad():
                assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(losses[0.0].item(), rel=1e-5)
        trainer.train()
        trainer._metrics["train"].clear()
        trainer.compute_loss(trainer.model, batch)  # the trained policy's entropy on the same answers
        entropy[coef] = trainer._metrics["train"]["entropy"][-1]  # TRL's: chosen and rejected tokens
    assert entropy[-5.0] < entropy[0.0] - 0.05


ON_POLICY = ["pairs.source=policy", "pairs.prompts=12", "pairs.samples_per_prompt=3", "pairs.batch_size=16",
             "pairs.max_new_tokens=64"]  # the tiny chain's SFT rarely stops within 24 tokens


def test_on_policy_pairs_are_the_sft_policys_samples_ranked_by_the_rm(chain):
    cfg = compose_config("dpo", TINY_DPO + ON_POLICY)
    sft, rm = find_parent(cfg.paths.run_dir, "sft"), find_parent(cfg.paths.run_dir, "rm")
    pairs, stats = policy_pairs(cfg, sft, rm)
    assert stats["pairs/prompts"] == 12 and stats["pairs/count"] == len(pairs) > 0
    # Every side is one of the SFT policy's own samples (same seed, same prompts) ...
    model, fmt = load_policy("sft", cfg)
    prompts = [p["messages"] for p in load_validated(list(cfg.data.ppo_prompts), "train", prompt_row, {}, "skip")][:12]
    dec = DecodingConfig("s", True, 1.0, 0, 1.0, 1, cfg.pairs.max_new_tokens)
    samples = sample_responses(model, fmt, [p for p in prompts for _ in range(3)], dec, 16, cfg.seed)
    by_prompt = {str(p): {s.response for s in samples[3 * i:3 * i + 3]} for i, p in enumerate(prompts)}
    for pair in pairs:
        assert {pair["chosen"][0]["content"], pair["rejected"][0]["content"]} <= by_prompt[str(pair["prompt"])]
    # ... and the RM scores the chosen one higher, by the recorded margin.
    reward, _ = load_reward_model(rm, sft, cfg.model)
    chosen = score_conversations(reward, fmt, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], 16)
    rejected = score_conversations(reward, fmt, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs], 16)
    assert (chosen > rejected).all()
    assert torch.allclose(chosen - rejected, torch.tensor([p["margin"] for p in pairs]), atol=1e-4)


@pytest.mark.parametrize("source", ["policy", "both"])
def test_on_policy_dpo_runs_and_records_its_rm(chain, source):
    metrics = dpo.run(compose_config("dpo", TINY_DPO + ON_POLICY + [f"pairs.source={source}"]))
    assert 0 < metrics["pairs/count"] <= 12 and "eval_rewards/accuracies" in metrics
    cfg = compose_config("dpo", TINY_DPO)
    offline = len(dpo.dpo_rows(load_sft_tokenizer(find_parent(cfg.paths.run_dir, "sft")), cfg.data.prefs.train, cfg))
    trained = metrics["train_pairs"] + metrics["train_pairs_dropped_too_long"]
    assert trained == metrics["pairs/count"] + (offline if source == "both" else 0)
    art = load_artifact(chain / "artifacts/default/dpo", "dpo")
    # its parent is the RM that ranked its pairs (whose parent is the SFT it starts from)
    assert art.manifest["parent"]["stage"] == "rm" and art.metrics == metrics
    policy, fmt = load_policy("dpo", compose_config("eval", QUIET))  # the base is found through the RM
    assert policy is not None


def test_a_rebuilt_rm_makes_on_policy_dpo_stale_for_the_pipeline(chain):
    dpo.run(compose_config("dpo", TINY_DPO + ON_POLICY))
    cfg = pipeline_stage.compose_all(["dpo"], TINY_DPO + ON_POLICY)["dpo"]
    assert pipeline_stage.up_to_date("dpo", cfg)
    rm_manifest = chain / "artifacts/default/rm/manifest.json"
    (chain / "artifacts/default/rm/adapter/adapter_model.safetensors").write_bytes(b"rebuilt")
    rebuilt = json.loads(rm_manifest.read_text())
    rebuilt["files"]["adapter/adapter_model.safetensors"] = sha256_file(
        chain / "artifacts/default/rm/adapter/adapter_model.safetensors")
    rm_manifest.write_text(json.dumps(rebuilt))  # as a fresh `make rm` would leave it: a new checksum
    assert not pipeline_stage.up_to_date("dpo", cfg)


def test_on_policy_dpo_without_an_rm_names_make_rm(chain):
    shutil.rmtree(chain / "artifacts/default/rm")
    with pytest.raises(ArtifactError, match="make rm"):
        dpo.run(compose_config("dpo", TINY_DPO + ON_POLICY))
    assert not (chain / "artifacts/default/dpo").exists()


def test_unknown_pair_source_is_refused_by_name(chain):
    with pytest.raises(ConfigError, match=r"pairs.source='prefs' must be one of \['data', 'policy', 'both'\]"):
        dpo.run(compose_config("dpo", TINY_DPO + ["pairs.source=prefs"]))
