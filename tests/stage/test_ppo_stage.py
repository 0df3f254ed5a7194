"""PPO stage on the tiny chain: shared base, reference, reward, ratio, steps, resume, DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.artifacts import find_parent, load_artifact
from pipeline.generation import encode_prompts
from pipeline.policies import load_policy
from pipeline.reward import load_reward_model, load_sft_tokenizer, score_conversations
from pipeline.rl import core
from pipeline.rl.ppo import PPOTrainer
from pipeline.rl.rewards import build_reward_fn
from pipeline.rl.shared_model import SharedBaseActorCritic, position_ids_from_mask
from stages.ppo import accelerator_for
from tests.conftest import compose_config
from tests.stage.conftest import copy_root

pytestmark = pytest.mark.stage

TINY_PPO = ["ppo.total_updates=2", "ppo.rollout_batch_size=8", "ppo.generation_batch_size=4",
            "ppo.minibatch_size=4", "ppo.ppo_epochs=2", "ppo.max_new_tokens=8", "ppo.warmup_steps=1",
            "logger=none"]


@pytest.fixture
def built(chain):
    cfg = compose_config("ppo", TINY_PPO)
    sft, rm = find_parent(cfg.paths.run_dir, "sft"), find_parent(cfg.paths.run_dir, "rm")
    tok = load_sft_tokenizer(sft)
    model = SharedBaseActorCritic.from_artifacts(sft, rm, cfg.model, tok, cfg.ppo.value_init)
    trainer = PPOTrainer(model, tok, cfg.ppo, accelerator_for("fp32"), build_reward_fn(cfg.reward, rm.metrics))
    return cfg, model, tok, trainer


def test_one_copy_of_the_base_weights(built):
    cfg, model, tok, _ = built
    base, _ = load_policy("base", cfg, merge=False)
    base_params = dict(base.named_parameters())
    shared = {n: p for n, p in model.named_parameters() if "lora_" not in n and "_head" not in n}
    # Every base tensor appears exactly once, under one storage, in the 4-role model.
    assert sum(p.numel() for p in shared.values()) == sum(p.numel() for p in base_params.values())
    assert len({p.data_ptr() for p in shared.values()}) == len(shared)
    adapters = {n.split("lora_A.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A." in n}
    assert adapters == {"policy", "ref", "reward", "value"}


def test_reference_is_the_sft_model_not_the_base(built):
    cfg, model, tok, _ = built
    ids, mask = encode_prompts(tok, ["What is 2 plus 3?", "Name the capital of Nowhere."])
    with torch.no_grad():
        ref = model.policy_logits(ids, mask, adapter="ref")
        sft, _ = load_policy("sft", cfg)
        base, _ = load_policy("base", cfg)
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        assert torch.allclose(ref, sft(**kw).logits, atol=1e-4)
        assert not torch.allclose(ref, base(**kw).logits, atol=1e-3)


def test_reward_role_scores_like_the_rm_artifact(built):
    cfg, model, tok, _ = built
    convs = [[{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": a}]
             for a in ("2 plus 3 is 5.", "I can't help with that.", "7")]
    rm_model, rm_tok = load_reward_model(find_parent(cfg.paths.run_dir, "rm"),
                                         find_parent(cfg.paths.run_dir, "sft"), cfg.model)
    expected = score_conversations(rm_model, rm_tok, convs, 8)
    side = tok.padding_side
    tok.padding_side = "right"
    enc = tok([tok.apply_chat_template(c, tokenize=False) for c in convs], return_tensors="pt",
              padding=True, add_special_tokens=False)
    tok.padding_side = side
    with torch.no_grad():
        got = model.scores(enc["input_ids"], enc["attention_mask"], core.last_token_index(enc["attention_mask"]))
    assert torch.allclose(got, expected, atol=1e-4)


def test_ratio_is_one_on_the_first_minibatch(built):
    _, _, _, trainer = built
    rollout, _ = trainer.rollout(["What is 2 plus 3?", "How do I rob a small shop?",
                                  "Repeat the word 'cup' 2 times.", "What is 10 minus 4?"] * 2)
    first = core.minibatch_indices(8, 4, torch.Generator().manual_seed(0))[0]
    stats = trainer._minibatch_step(rollout.select(first))
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["approxkl"].item() == pytest.approx(0.0, abs=1e-8)
    assert stats["clipfrac"].item() == 0.0


def test_one_optimizer_step_per_minibatch(built):
    cfg, _, _, trainer = built
    rollout, _ = trainer.rollout(["What is 2 plus 3?"] * 8)
    out = trainer.train_step(rollout)
    # 8 rollouts / minibatches of 4 = 2 minibatches, times 2 epochs = 4 steps
    assert out["optimizer_steps"] == 4 == core.count_optimizer_steps(8, 4, 2)
    assert trainer.scheduler.last_epoch == 4
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {4}


def test_ppo_stage_writes_its_artifact(chain):
    from stages import ppo
    metrics = ppo.run(compose_config("ppo", TINY_PPO))
    art = load_artifact(chain / "artifacts/default/ppo", "ppo")
    assert art.manifest["parent"]["stage"] == "rm" and metrics["updates"] == 2
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/ratio",
                "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "objective/kl_coef",
                "rollout/response_length", "rollout/eos_rate", "time/rollout", "time/update"):
        assert key in art.metrics
    assert (art.path / "policy" / "adapter_model.safetensors").is_file()
    assert (art.path / "value" / "value_head.safetensors").is_file()
    assert len((art.path / "history.jsonl").read_text().splitlines()) == 2
    ppo_policy, _ = load_policy("ppo", compose_config("ppo", TINY_PPO))  # loads as a plain LM
    assert ppo_policy is not None


def ppo_cmd(*extra):
    return [sys.executable, "-m", "stages.ppo", *TINY_PPO, "ppo.total_updates=6", "checkpoint_every=2", *extra]


def history(root):
    return [json.loads(line) for line in (root / "artifacts/default/ppo/history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_one(chain, tmp_path):
    env = {**os.environ, "RLHF_ROOT": str(chain)}
    ckpts = chain / "artifacts/default/.work/ppo/checkpoints"
    proc = subprocess.Popen(ppo_cmd(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (ckpts / "update-000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpts / "update-000002").exists(), "the run never wrote its first checkpoint"
    assert not (chain / "artifacts/default/ppo").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(ppo_cmd(), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    got = history(chain)
    assert len(got) == 6 and load_artifact(chain / "artifacts/default/ppo", "ppo").metrics["updates"] == 6
    assert not ckpts.exists()  # a finished run's artifact supersedes its checkpoints

    # The same seed, never interrupted, in a second copy of the chain.
    fresh = copy_root(chain, tmp_path / "fresh", ignore=shutil.ignore_patterns("ppo", ".work"))
    subprocess.run(ppo_cmd(), env={**env, "RLHF_ROOT": str(fresh)}, check=True, capture_output=True)
    want = history(fresh)
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg"):
        assert got[2][key] == pytest.approx(want[2][key], rel=1e-4, abs=1e-6), key  # first update after resume
        assert got[5][key] == pytest.approx(want[5][key], rel=1e-3, abs=1e-5), key


def test_changed_config_refuses_to_resume(chain):
    env = {**os.environ, "RLHF_ROOT": str(chain)}
    ckpts = chain / "artifacts/default/.work/ppo/checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "update-000002").mkdir()
    (ckpts / "update-000002" / "state.json").write_text(json.dumps(
        {"update": 2, "config_hash": "something-else", "num_processes": 1}))
    out = subprocess.run(ppo_cmd(), env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "different config" in out.stderr and "resume=false" in out.stderr


@pytest.mark.slow
def test_two_cpu_processes_run_data_parallel(chain):
    env = {**os.environ, "RLHF_ROOT": str(chain), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "stages.ppo", *TINY_PPO, "num_threads=1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    art = load_artifact(chain / "artifacts/default/ppo", "ppo")
    assert art.metrics["updates"] == 2
    # Both processes rolled out: 2 updates x 8 prompts x 2 processes episodes.
    assert history(chain)[-1]["ppo/episodes"] == 32
