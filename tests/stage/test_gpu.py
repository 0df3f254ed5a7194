"""GPU tier: the mixed-precision paths on a CUDA device (skipped without one).

The session fixtures build the tiny chain with ``precision=auto`` (bf16 on such a GPU, through
HF Trainer's accelerator); these tests rerun the trained stages in bf16 / fp16 in the same
process (each stage builds its accelerator in its own precision) and check that training stays
finite, that PPO's first ratio is still 1 under autocast, and that a bf16 base trains with its
adapters folded.
"""

import math

import pytest
import torch

from pipeline.core.artifacts import find_parent
from pipeline.models.reward import load_sft_tokenizer
from pipeline.rl.rewards import build_reward_fn, reward_scale
from pipeline.rl.shared_model import SharedBaseActorCritic
from pipeline.rl.trainer import RLTrainer
from stages import ppo, rm, sft
from stages.ppo import accelerator_for
from tests.conftest import compose_config
from tests.stage.conftest import QUIET, TINY_RM, TINY_SFT
from tests.stage.test_ppo_stage import TINY_PPO, rollout

pytestmark = [pytest.mark.gpu, pytest.mark.stage]


def half_precisions():
    if not torch.cuda.is_available():
        return ["bf16"]  # collected, then skipped by the gpu marker
    return ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]


@pytest.mark.parametrize("precision", half_precisions())
def test_sft_and_rm_train_in_half_precision(chain, precision):
    sft_metrics = sft.run(compose_config("sft", TINY_SFT + QUIET + [f"train.precision={precision}"]))
    assert math.isfinite(sft_metrics["train_loss"]) and math.isfinite(sft_metrics["eval_loss"])
    rm_metrics = rm.run(compose_config("rm", TINY_RM + QUIET + [f"train.precision={precision}"]))
    assert math.isfinite(rm_metrics["train_loss"]) and 0.0 <= rm_metrics["eval_accuracy"] <= 1.0


@pytest.mark.parametrize("precision", half_precisions())
def test_ppo_ratio_is_one_and_updates_stay_finite_under_autocast(chain, precision):
    cfg = compose_config("ppo", TINY_PPO + [f"ppo.precision={precision}"])
    acc = accelerator_for(precision)
    sft_art, rm_art = find_parent(cfg.paths.run_dir, "sft"), find_parent(cfg.paths.run_dir, "rm")
    fmt = load_sft_tokenizer(sft_art)
    model = SharedBaseActorCritic.from_artifacts(sft_art, rm_art, cfg.model, fmt, cfg.ppo.value_init,
                                                 reward_scale(cfg.reward, rm_art.metrics)).to(acc.device)
    assert model.value_head.weight.dtype == torch.float32  # trainable head keeps fp32 weights
    trainer = RLTrainer(model, fmt, cfg.ppo, cfg.algorithm, acc, build_reward_fn(cfg.reward, rm_art.metrics))
    out = trainer.train_step(rollout(trainer))
    # sampler (cached, half precision) vs training pass: equal up to half-precision matmuls
    assert out["ratio_first"] == pytest.approx(1.0, abs=2e-2)
    metrics = ppo.run(cfg)
    assert all(math.isfinite(metrics[k]) for k in ("objective/kl", "loss/policy_avg", "loss/value_avg"))


def on_device(overrides: list[str]):
    """The tiny chain's RL stage on the accelerator's device, fp32 accelerator (no autocast)."""
    cfg = compose_config("ppo", TINY_PPO + overrides)
    acc = accelerator_for("fp32")
    sft_art, rm_art = find_parent(cfg.paths.run_dir, "sft"), find_parent(cfg.paths.run_dir, "rm")
    fmt = load_sft_tokenizer(sft_art)
    model = SharedBaseActorCritic.from_artifacts(sft_art, rm_art, cfg.model, fmt, cfg.ppo.value_init,
                                                 reward_scale(cfg.reward, rm_art.metrics)).to(acc.device)
    trainer = RLTrainer(model, fmt, cfg.ppo, cfg.algorithm, acc, build_reward_fn(cfg.reward, rm_art.metrics))
    return cfg, model, fmt, trainer, acc


def test_a_bf16_base_trains_with_folded_adapters_on_the_gpu(chain):
    """bf16 folded copies with fp32 adapters: the hand-written backward (fp32 accelerator, so no
    autocast and _FoldedLoRA runs) and the refold after each optimizer step."""
    cfg, model, fmt, trainer, acc = on_device(["model.dtype=bfloat16", "ppo.fold_adapters=always"])
    assert model.folds and model.peft.get_output_embeddings().weight.dtype == torch.bfloat16
    out = trainer.train_step(rollout(trainer))
    assert out["optimizer_steps"] == 4 and math.isfinite(out["ratio"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_decode_graphs_sample_what_the_same_steps_sample_eagerly(chain, dtype):
    """``ppo.sampler=graphs``: each bucket's decode step captured once and replayed. On the same
    uniforms it draws what the same steps run eagerly draw (pipeline/rl/static_sampler.py), before
    and after an optimizer step (the replays must read the weights updated in place), and its
    log-probs are the trainer's (the first ratio of an update is 1)."""
    from pipeline.generation.decoding import as_conversation, encode_prompts
    from pipeline.rl.static_sampler import StaticSampler, uniforms
    from tests.stage.test_ppo_stage import PROMPTS
    cfg, model, fmt, trainer, acc = on_device([f"model.dtype={dtype}", "ppo.sampler=graphs"])
    assert trainer.sampler.kind == "graphs"
    convs = [as_conversation(p) for p in PROMPTS]
    q_ids, q_mask = (t.to(acc.device) for t in encode_prompts(fmt, convs))
    T = cfg.ppo.max_new_tokens
    with model.sampling() as policy:
        graphs = StaticSampler(policy, fmt, len(convs), q_ids.shape[1], T, graphs=True, check_every=2)
        plain = StaticSampler(policy, fmt, len(convs), q_ids.shape[1], T, graphs=False, check_every=2)
    for _ in range(2):
        u = uniforms(len(convs), T, q_ids.device)
        with torch.no_grad(), model.sampling():
            got, want = graphs.decode(q_ids, q_mask, 1.0, T, u), plain.decode(q_ids, q_mask, 1.0, T, u)
        assert graphs._graphs
        same = (got[0] == want[0]).all(1)  # rows drawn alike throughout
        if dtype == "float32":
            assert same.all()
        else:  # bf16 rounding may flip a draw that sits at a CDF boundary
            assert same.float().mean() >= 0.75, same
        both = same[:, None] & (want[1] > 0)
        torch.testing.assert_close(got[2][both], want[2][both], atol=1e-3 if dtype == "float32" else 5e-2, rtol=0)
        out = trainer.train_step(rollout(trainer))  # through trainer.sampler: graphs too
        assert out["ratio_first"] == pytest.approx(1.0, abs=2e-2) and out["optimizer_steps"] == 4
