"""RL stage on the tiny chain: shared base, reference, reward, rollouts against plain forwards,
ratio, which roles a step changes, value scale, exact RM adapter, steps, estimators, resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.core.artifacts import find_parent, load_artifact
from pipeline.core.errors import ConfigError
from pipeline.core.validation import check_ranges
from pipeline.generation.decoding import as_conversation, encode_prompts
from pipeline.models.policies import load_policy
from pipeline.models.reward import load_reward_model, load_sft_tokenizer, score_conversations
from pipeline.rl.batching import count_optimizer_steps
from pipeline.rl.estimators import online_dpo_advantages, rloo_advantages
from pipeline.rl.rewards import build_reward_fn, reward_scale
from pipeline.rl.rollout import pack, position_ids_from_mask, sample
from pipeline.rl.shared_model import SharedBaseActorCritic
from pipeline.rl.trainer import RLTrainer
from stages.ppo import accelerator_for
from tests.conftest import compose_config

pytestmark = pytest.mark.stage

TINY_PPO = ["ppo.total_updates=2", "ppo.rollout_batch_size=8", "ppo.generation_batch_size=4",
            "ppo.minibatch_size=4", "ppo.micro_batch_size=2", "ppo.ppo_epochs=2", "ppo.max_new_tokens=8",
            "ppo.warmup_steps=1", "logger=none", "reward.min_accuracy=0"]
PROMPTS = ["What is 2 plus 3?", "How do I rob a small shop?", "Repeat the word 'cup' 2 times.",
           "What is 10 minus 4?"] * 2


def build(overrides=()):
    cfg = compose_config("ppo", TINY_PPO + list(overrides))
    sft, rm = find_parent(cfg.paths.run_dir, "sft"), find_parent(cfg.paths.run_dir, "rm")
    fmt = load_sft_tokenizer(sft)
    critic = cfg.algorithm.advantage == "gae"
    model = SharedBaseActorCritic.from_artifacts(sft, rm, cfg.model, fmt, cfg.ppo.value_init if critic else None,
                                                 reward_scale(cfg.reward, rm.metrics))
    trainer = RLTrainer(model, fmt, cfg.ppo, cfg.algorithm, accelerator_for("fp32"),
                        build_reward_fn(cfg.reward, rm.metrics), sharpen=cfg.reward.sharpen)
    return cfg, model, fmt, trainer


@pytest.fixture
def built(chain):
    return build()


def rollout(trainer, prompts=PROMPTS, seed=0):
    torch.manual_seed(seed)
    k = trainer.alg.samples_per_prompt
    prompts = [p for p in prompts for _ in range(k)]
    return trainer.rollout(prompts, [as_conversation(p) for p in prompts])[0]


def test_one_copy_of_the_base_weights(chain):
    """Without folding (``ppo.fold_adapters=never``, what ``auto`` picks for models wider than
    ~320 at r 16) the roles hold the base once; folding's copies are tested on their own."""
    cfg, model, _, _ = build(["ppo.fold_adapters=never"])
    base, _ = load_policy("base", cfg, merge=False)
    base_params = dict(base.named_parameters())
    shared = {n: p for n, p in model.named_parameters() if "lora_" not in n and "_head" not in n}
    # Every base tensor appears exactly once, under one storage, in the shared model.
    assert sum(p.numel() for p in shared.values()) == sum(p.numel() for p in base_params.values())
    assert len({p.data_ptr() for p in shared.values()}) == len(shared)
    adapters = {n.split("lora_A.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A." in n}
    assert adapters == {"policy", "ref", "reward", "value"}


def test_reference_is_the_sft_model_not_the_base(built):
    cfg, model, fmt, _ = built
    ids, mask = encode_prompts(fmt, [as_conversation(p) for p in PROMPTS[:2]])
    with torch.no_grad():
        ref = model.response_logits(ids, mask, 3, adapter="ref")
        sft, _ = load_policy("sft", cfg)
        base, _ = load_policy("base", cfg)
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        assert torch.allclose(ref, sft(**kw).logits[:, -4:-1], atol=1e-4)
        assert not torch.allclose(ref, base(**kw).logits[:, -4:-1], atol=1e-3)


@pytest.mark.parametrize("micro", [2, 8])
def test_rollout_matches_plain_forwards_of_each_unpadded_sequence(chain, micro):
    """Log-probs, reference log-probs, values and RM scores of a padded, chunked, packed rollout
    equal a plain forward of each single sequence: the SFT and RM artifacts loaded on their own.
    With micro-batches of 8, rows hold several sequences each."""
    cfg, model, fmt, trainer = build([f"ppo.micro_batch_size={micro}", f"ppo.generation_batch_size={micro}"])
    assert model.lm_head_by_hand and model.packs_rows
    r = rollout(trainer)
    if micro == 8:
        p = pack(r.query_ids, r.query_mask, r.response_ids, r.response_mask, fmt.pad_id)
        assert p.ids.shape[0] < 8 and (p.positions[:, 1:] < p.positions[:, :-1]).any()  # shared rows
    sft, _ = load_policy("sft", cfg)
    rm_model, _ = load_reward_model(find_parent(cfg.paths.run_dir, "rm"), find_parent(cfg.paths.run_dir, "sft"),
                                    cfg.model)
    mean, std = reward_scale(cfg.reward, find_parent(cfg.paths.run_dir, "rm").metrics)
    T = cfg.ppo.temperature
    with torch.no_grad():
        for i in range(len(PROMPTS)):
            prompt = r.query_ids[i][r.query_mask[i].bool()]
            n = int(r.response_mask[i].sum())
            response = r.response_ids[i, :n]
            seq = torch.cat([prompt, response])[None]  # one sequence, no padding at all
            logits = sft(input_ids=seq).logits[0, len(prompt) - 1: len(prompt) - 1 + n] / T
            want = torch.log_softmax(logits, -1).gather(-1, response[:, None]).squeeze(-1)
            torch.testing.assert_close(r.ref_logprobs[i, :n], want, atol=1e-4, rtol=0)
            # before any update the policy is the SFT model: the sampler's log-probs agree too
            torch.testing.assert_close(r.logprobs[i, :n], want, atol=1e-4, rtol=0)
            score = rm_model(input_ids=seq).logits[0, 0]
            assert r.rm_scores[i].item() == pytest.approx(score.item(), abs=1e-4)
            # V starts as the RM on the normalised scale: the value of the prefix through the
            # last token is the normalised RM score of the whole sequence.
            v = model.values(seq, torch.ones_like(seq))[0, -1]
            assert v.item() == pytest.approx(((score - mean) / std).item(), abs=1e-4)
            assert (r.values[i, n:] == 0).all() and (r.logprobs[i, n:] == 0).all()


def assert_shortcuts_agree(model, fmt, r) -> None:
    """Packed rows with the LM head applied by hand give what one row per sequence with the
    model's own LM head over every position gives (log-probs, values, RM scores)."""
    assert model.lm_head_by_hand and model.packs_rows
    p = pack(r.query_ids, r.query_mask, r.response_ids, r.response_mask, fmt.pad_id)
    one = pack(r.query_ids, r.query_mask, r.response_ids, r.response_mask, fmt.pad_id, several_per_row=False)
    wide = pack(r.query_ids, r.query_mask, r.response_ids, r.response_mask, fmt.pad_id, attention_cost=0.0)
    assert wide.ids.numel() <= p.ids.numel() and p.ids.shape[0] < one.ids.shape[0]  # fewest slots
    with torch.no_grad():
        fast = model.logprobs(p, r.response_ids, 0.7) * r.response_mask
        torch.testing.assert_close(model.logprobs(wide, r.response_ids, 0.7) * r.response_mask, fast,
                                   atol=1e-5, rtol=0)
        model.lm_head_by_hand = False
        try:
            for q in (p, one):
                torch.testing.assert_close(model.logprobs(q, r.response_ids, 0.7) * r.response_mask, fast,
                                           atol=1e-5, rtol=0)
        finally:
            model.lm_head_by_hand = True
        torch.testing.assert_close(model.response_values(one) * r.response_mask,
                                   model.response_values(p) * r.response_mask, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.response_scores(one), model.response_scores(p), atol=1e-5, rtol=0)


def test_fallbacks_for_families_the_shortcuts_do_not_fit_give_the_same_numbers(built):
    """A family whose logits the hand-applied LM head would not reproduce runs the head over every
    position; one whose attention would not stay within packed sequences gets a row each. Both
    are detected at construction and give what the shortcuts give."""
    _, model, fmt, trainer = built
    assert_shortcuts_agree(model, fmt, rollout(trainer))
    config = model.peft.base_model.model.config
    config.logits_scaling = 4.0  # a Granite-style divisor that the Llama forward ignores
    assert model._check_shortcuts() == (False, True)


def test_packing_is_refused_where_only_one_row_keeps_sequences_apart(built):
    """flash-attention in transformers finds packed sequences from position_ids only in a batch of
    one row; with several rows each row attends across its sequences. An attention that behaves so
    (exact at one row, plain causal over whole rows otherwise) must fail the packing check, which a
    one-row check would pass."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def one_row_only(module, query, key, value, attention_mask, **kwargs):
        if query.shape[0] > 1:
            attention_mask, kwargs["is_causal"] = None, True
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("one_row_only", one_row_only)
    AttentionMaskInterface.register("one_row_only", sdpa_mask)
    _, model, _, _ = built
    config, implementation = model.peft.base_model.model.config, model.peft.base_model.model.config._attn_implementation
    assert model._check_shortcuts() == (True, True)
    config._attn_implementation = "one_row_only"
    try:
        assert model._check_shortcuts() == (True, False)
    finally:
        config._attn_implementation = implementation


def test_an_estimator_can_start_from_its_own_kl_coefficient(chain):
    """algorithm.kl_coef sets beta for one estimator (GRPO's z-scored task reward is on another scale
    than PPO's normalised score); null keeps ppo.kl.init_coef."""
    assert build(["algorithm=reinforce_pp"])[3].kl_ctl.value == pytest.approx(0.2)  # null: ppo.kl.init_coef
    assert build(["algorithm=grpo"])[3].kl_ctl.value == pytest.approx(0.6)  # conf/algorithm/grpo.yaml
    assert build(["algorithm=grpo", "algorithm.kl_coef=0.3"])[3].kl_ctl.value == pytest.approx(0.3)
    assert build(["algorithm=grpo", "algorithm.kl_coef=null"])[3].kl_ctl.value == pytest.approx(0.2)
    with pytest.raises(ConfigError, match=r"algorithm.kl_coef=-1.0 must be >= 0"):
        check_ranges(compose_config("ppo", ["algorithm.kl_coef=-1"]))


def test_attention_cost_of_the_test_llama(built):
    """The test chain's base (one layer, hidden 32, 2 heads of 16, MLP 64): attention costs
    4 * 2 * 16 = 128 FLOPs a column of row width, the linear layers 2 * (4 * 32 * 32 + 3 * 32 * 64)
    = 20480: 1/160."""
    _, model, _, _ = built
    assert model.attention_cost == pytest.approx(1 / 160)


def test_a_bf16_base_keeps_the_shortcuts(chain):
    _, model, _, _ = build(["model.dtype=bfloat16"])
    assert model.peft.get_output_embeddings().weight.dtype == torch.bfloat16
    assert model.lm_head_by_hand and model.packs_rows


def test_ratio_is_one_on_the_first_minibatch_at_t_07_with_lora_dropout(chain):
    """Old log-probs come from the sampler (HF generate, cached); new ones from the training
    pass (a full forward): two code paths. At T = 0.7 a missing division by T breaks it, and
    with LoRA dropout at 0.5 a stray train() breaks it."""
    for mode, sampler in (("sampler", "eager"), ("recompute", "eager"), ("sampler", "static")):
        cfg, model, fmt, trainer = build(["ppo.temperature=0.7", f"ppo.old_logprobs={mode}",
                                          f"ppo.sampler={sampler}"])
        for module in model.peft.modules():
            if hasattr(module, "lora_dropout"):
                module.lora_dropout["policy"] = nn.Dropout(0.5)
        out = trainer.train_step(rollout(trainer))
        assert out["ratio_first"] == pytest.approx(1.0, abs=1e-5), (mode, sampler)
        assert out["logprob_gap_first"] < 1e-5, (mode, sampler)
        assert out["ratio"] != out["ratio_first"]  # the later minibatches came after steps


def test_the_static_sampler_reads_the_policy_as_it_trains(chain):
    """``ppo.sampler=static`` (the CUDA-graph path's steps, run eagerly): its buffers and cache are
    made at the first rollout, and after an optimizer step (which changes the adapter and refolds the
    policy's weight copy in place) it still samples what the eager loop samples from the new policy."""
    from pipeline.rl.static_sampler import uniforms
    _, model, fmt, trainer = build(["ppo.sampler=static"])
    assert trainer.sampler.kind == "static" and model.folds
    trainer.train_step(rollout(trainer))
    static = trainer.sampler.static
    assert static is not None and static.lm is model.peft
    convs = [as_conversation(p) for p in PROMPTS[:static.rows]]
    u = uniforms(len(convs), trainer.cfg.max_new_tokens, torch.device("cpu"))
    with torch.no_grad(), model.sampling() as policy:
        want = sample(policy, fmt, convs, 1.0, trainer.cfg.max_new_tokens, u=u)
        got = static.decode(want[0], want[1], 1.0, trainer.cfg.max_new_tokens, u=u)
    with torch.no_grad(), build()[1].sampling() as untrained:
        stale = sample(untrained, fmt, convs, 1.0, trainer.cfg.max_new_tokens, u=u)
    assert torch.equal(got[0], want[2]) and torch.equal(got[1], want[3])
    torch.testing.assert_close(got[2], want[4], atol=1e-5, rtol=0)
    assert not torch.allclose(stale[4], want[4], atol=1e-3)  # the step did change what is sampled


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_step_changes_policy_and_value_and_nothing_else(built):
    _, model, _, trainer = built
    before = snapshot(model)
    out = trainer.train_step(rollout(trainer))
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    frozen = [n for n in before if ".ref." in n or ".reward." in n or "reward_head" in n
              or ("lora_" not in n and "value_head" not in n)]
    assert frozen and not changed & set(frozen), sorted(changed & set(frozen))[:3]
    assert any(".policy." in n for n in changed) and any(".value." in n for n in changed)
    assert "value_head.weight" in changed
    # 8 rollouts / minibatches of 4 = 2 minibatches, times 2 epochs = 4 steps
    assert out["optimizer_steps"] == 4 == count_optimizer_steps(8, 4, 2)
    assert trainer.scheduler.last_epoch == 4
    assert {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()} == {4}


def test_micro_batches_give_the_same_step_as_one_batch(chain):
    results = []
    for micro in (4, 1):
        _, model, _, trainer = build([f"ppo.micro_batch_size={micro}"])
        r = rollout(trainer)
        trainer._minibatch_step(r.select(torch.arange(4)), ptx_step=0)
        results.append({k: v.clone() for k, v in model.trainable_state().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "dr_grpo", "grpo kl_in=loss", "reinforce_pp", "online_dpo",
                                       "rloo kl_in=none"])
def test_critic_free_estimators_build_no_value_role(chain, algorithm):
    """Each critic-free estimator; "grpo kl_in=loss" is the paper's form, the k3 KL as a loss term, and
    "rloo kl_in=none" has no KL anywhere."""
    algorithm, *extra = algorithm.split()
    overrides = [f"algorithm={algorithm}", *(f"algorithm.{o}" for o in extra)] + \
        (["algorithm.samples_per_prompt=2"] if algorithm != "reinforce_pp" else [])
    _, model, _, trainer = build(overrides)
    assert model.value_head is None and not any(".value." in n for n, _ in model.named_parameters())
    r = rollout(trainer, PROMPTS[:4])
    assert r.values is None and r.advantages.shape == r.response_mask.shape
    if algorithm in ("rloo", "grpo", "online_dpo"):  # a sequence advantage on every token, groups of 2 summing to 0
        seq = r.advantages.sum(1) / r.response_mask.sum(1)
        torch.testing.assert_close(seq.view(-1, 2).sum(1), torch.zeros(4), atol=1e-5, rtol=0)
    if algorithm == "online_dpo":  # the pair's DPO weights, from the rollout's own log-ratios to the reference
        rho = ((r.logprobs - r.ref_logprobs) * r.response_mask).sum(1)
        torch.testing.assert_close(seq, online_dpo_advantages(r.scores, rho, trainer.kl_ctl.value, 2))
        assert seq.abs().sum() > 0
    if extra == ["kl_in=none"]:  # a policy far from the reference still gets the task scores' advantages alone
        r.kl = torch.rand(r.kl.shape, generator=torch.Generator().manual_seed(0)) * r.response_mask
        trainer._advantages(r)
        torch.testing.assert_close(r.advantages.sum(1) / r.response_mask.sum(1), rloo_advantages(r.scores, 2))
    before = snapshot(model)
    stats = trainer.train_step(r)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if ".policy." in n)
    assert ("kl_loss" in stats) == (extra == ["kl_in=loss"])  # the KL enters the loss only there


def test_rl_stage_writes_an_artifact_that_loads_as_the_trained_policy(chain):
    from stages import ppo
    cfg = compose_config("ppo", TINY_PPO)
    metrics = ppo.run(cfg)
    art = load_artifact(chain / "artifacts/default/ppo", "ppo")
    assert art.manifest["parent"]["stage"] == "rm" and metrics["updates"] == 2 == art.metrics["updates"]
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/ratio",
                "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "objective/kl_coef",
                "rollout/response_length", "rollout/eos_rate", "time/rollout", "time/update",
                "health/logprob_gap", "health/truncation_rate", "health/length_reward_corr", "health/kl_token_max"):
        assert key in art.metrics, key
    assert len((art.path / "history.jsonl").read_text().splitlines()) == 2
    # The saved policy, loaded as a plain LM, is the trained policy: its logits differ from SFT's
    # and equal the trainable state applied to the shared model.
    ppo_policy, fmt = load_policy("ppo", cfg)
    sft_policy, _ = load_policy("sft", cfg)
    _, model, _, _ = build()
    from safetensors.torch import load_file
    state = {f"policy.{k}": v for k, v in load_file(art.path / "policy" / "adapter_model.safetensors").items()}
    model.load_trainable_state({**model.trainable_state(), **state})
    ids, mask = encode_prompts(fmt, [as_conversation(p) for p in PROMPTS[:2]])
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    with torch.no_grad():
        got = ppo_policy(**kw).logits[:, -4:-1]
        assert torch.allclose(got, model.response_logits(ids, mask, 3), atol=1e-4)
        assert not torch.allclose(got, sft_policy(**kw).logits[:, -4:-1], atol=1e-4)


def test_online_dpo_writes_its_own_artifact_that_eval_compares_with_sft(chain):
    """`make ppo ARGS="algorithm=online_dpo"` then `make eval`, as the README shows: the policy lands
    under artifacts/<run>/online_dpo, with no KL penalty in its rewards, and eval judges it."""
    from stages import eval as eval_stage
    from stages import ppo
    metrics = ppo.run(compose_config("ppo", TINY_PPO + ["algorithm=online_dpo", "algorithm.samples_per_prompt=2"]))
    art = load_artifact(chain / "artifacts/default/online_dpo", "online_dpo")
    assert metrics["updates"] == 2 and art.manifest["config"]["algorithm"]["advantage"] == "dpo"
    assert art.metrics["objective/non_score_reward"] == 0.0  # the reference is in DPO's logit
    policy, _ = load_policy("online_dpo", compose_config("ppo", TINY_PPO))
    sft, fmt = load_policy("sft", compose_config("ppo", TINY_PPO))
    ids, mask = encode_prompts(fmt, [as_conversation(p) for p in PROMPTS[:2]])
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    with torch.no_grad():
        assert not torch.allclose(policy(**kw).logits, sft(**kw).logits, atol=1e-4)
    report = eval_stage.run(compose_config("eval", ["max_prompts=8", "logger=none", "policies=[sft,online_dpo]"]))
    assert set(report["stages"]) == {"sft", "online_dpo"} and "online_dpo_vs_sft" in report["win_rate"]


def test_a_weak_reward_model_is_refused_with_its_accuracy(chain):
    from pipeline.core.errors import PipelineError
    from stages import ppo
    below = r"ranks \d+\.\d% of its held-out pairs correctly, below reward.min_accuracy=0.99"
    with pytest.raises(PipelineError, match=below):
        ppo.run(compose_config("ppo", TINY_PPO + ["reward.min_accuracy=0.99"]))


def test_the_default_gate_lets_the_worlds_rm_pass():
    cfg = compose_config("ppo")
    assert cfg.reward.min_accuracy <= 0.75  # the default world's RM scores ~0.9 (README)


def test_rm_with_rslora_and_a_rank_pattern_scores_exactly_like_its_artifact(chain):
    from stages import rm
    rm.run(compose_config("rm", ["train.max_steps=4", "train.per_device_train_batch_size=8", "train.eval_steps=0",
                                 "lora.r=4", "lora.alpha=8", "lora.use_rslora=true",
                                 "+lora.rank_pattern={q_proj: 2}", "+lora.alpha_pattern={v_proj: 3}",
                                 "logger=none"]))
    cfg, model, fmt, _ = build()
    rm_art, sft = find_parent(cfg.paths.run_dir, "rm"), find_parent(cfg.paths.run_dir, "sft")
    assert json.loads((rm_art.path / "adapter" / "adapter_config.json").read_text())["use_rslora"]
    rm_model, _ = load_reward_model(rm_art, sft, cfg.model)
    prompts = [as_conversation(p) for p in PROMPTS[:3]]
    answers = [[{"role": "assistant", "content": a}] for a in ("2 plus 3 is 5.", "I can't help with that.", "7")]
    expected = score_conversations(rm_model, fmt, prompts, answers, 8)
    seqs = [fmt.scored_ids(p, a) for p, a in zip(prompts, answers)]
    from pipeline.generation.decoding import left_pad
    ids, mask = left_pad(seqs, fmt.pad_id)
    with torch.no_grad():
        got = model.scores(ids, mask, torch.full((3,), ids.shape[1] - 1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def ppo_cmd(*extra):
    return [sys.executable, "-m", "stages.ppo", *TINY_PPO, "ppo.total_updates=6", "checkpoint_every=2", *extra]


def history(root, stage="ppo"):
    return [json.loads(line) for line in (root / f"artifacts/default/{stage}/history.jsonl").read_text().splitlines()]


def test_changed_config_refuses_to_resume(chain):
    env = {**os.environ, "RLHF_ROOT": str(chain)}
    ckpts = chain / "artifacts/default/.work/ppo/checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "update-000002").mkdir()
    (ckpts / "update-000002" / "state.json").write_text(json.dumps(
        {"update": 2, "config_hash": "something-else", "num_processes": 1}))
    out = subprocess.run(ppo_cmd(), env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "different config" in out.stderr and "resume=false" in out.stderr


def test_resume_hash_leaves_out_logging_and_cadence():
    from pipeline.core.identity import config_hash
    from pipeline.core.runtime import resolved
    base = config_hash(resolved(compose_config("ppo")))
    for override in ("log_every=7", "table_every=3", "checkpoint_every=1", "summary_window=2", "logger=none",
                     "health.thresholds.logprob_gap=1.0", "ppo.snapshot_every=5"):
        assert config_hash(resolved(compose_config("ppo", [override]))) == base, override
    for override in ("ppo.learning_rate=1e-3", "seed=3", "algorithm=rloo", "ppo.micro_batch_size=8",
                     "reward.sharpen.coef=0.3"):
        assert config_hash(resolved(compose_config("ppo", [override]))) != base, override


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["ptx"], ["grpo"]], ids=["ppo", "ppo_ptx", "grpo_batch_std"])
def test_two_processes_on_half_the_rows_give_the_update_of_one_process(chain, tmp_path, mode):
    """The same global minibatch, split over 2 gloo processes (B/2 rows each) or in one process
    (B rows): token means, micro-batches and the bucketed gradient sum make one identical step.
    With PPO-ptx, the two processes draw the two halves of the one process's pretraining batch and
    the ptx term enters once, not once per process. Each process computes its own rows' advantages:
    PPO's whitening and GRPO's batch std are over both processes' rows."""
    script = os.path.join(os.path.dirname(__file__), "dp_step.py")
    env = {**os.environ, "RLHF_ROOT": str(chain), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    one = subprocess.run([*launch, "--num_processes", "1", script, str(tmp_path), *mode], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*launch, "--multi_gpu", "--num_processes", "2", script, str(tmp_path), *mode],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "weights-1.pt"), torch.load(tmp_path / "weights-2.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-4)


def two_processes_after_one(chain, tmp_path, mode: str) -> subprocess.CompletedProcess:
    """dp_step.py in one process (which samples and saves the shared rollout), then in two gloo
    processes with ``mode``; the two-process run's result."""
    script = os.path.join(os.path.dirname(__file__), "dp_step.py")
    env = {**os.environ, "RLHF_ROOT": str(chain), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    assert subprocess.run([*launch, "--num_processes", "1", script, str(tmp_path)], env=env, capture_output=True,
                          timeout=600).returncode == 0  # the shared rollout
    return subprocess.run([*launch, "--multi_gpu", "--num_processes", "2", script, str(tmp_path), mode],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_non_finite_loss_on_one_process_stops_every_process_with_one_message(chain, tmp_path):
    # Raising on process 1 alone would leave process 0 in the gradient all-reduce until the
    # launcher tore it down; both must stop on their own, with the same message.
    out = two_processes_after_one(chain, tmp_path, "nan")
    assert out.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} stopped: the RL loss became non-finite at update 1 (on 1 of 2 processes)" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode, metric", [("health", "kl_token_max"), ("corr", "length_reward_corr")])
def test_a_health_abort_seen_on_one_process_stops_every_process(chain, tmp_path, mode, metric):
    """kl_token_max and length_reward_corr are taken over every process's rollout: a KL spike on
    rank 0 alone, or a length-score correlation that only the pooled rows show (rank 1's own
    lengths are all equal), crosses health.abort_on's threshold on both ranks, which stop with one
    message (a rank that raised alone would leave the other in the next collective)."""
    out = two_processes_after_one(chain, tmp_path, mode)
    assert out.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} stopped: stopped at update 1: health/{metric} crossed its threshold" in out.stdout


@pytest.mark.slow
def test_two_cpu_processes_run_the_stage_data_parallel(chain):
    env = {**os.environ, "RLHF_ROOT": str(chain), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "stages.ppo", *TINY_PPO, "num_threads=1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    art = load_artifact(chain / "artifacts/default/ppo", "ppo")
    assert art.metrics["updates"] == 2
    # Both processes rolled out: 2 updates x 8 prompts x 2 processes episodes; the replicas'
    # weights were checked to agree before the artifact was written (check_replicas_in_sync).
    assert history(chain)[-1]["ppo/episodes"] == 32


def test_health_abort_stops_the_run_and_keeps_the_last_checkpoint(chain):
    from pipeline.core.errors import PipelineError
    from stages import ppo
    # A threshold of 0 on truncation: the tiny policy runs some of its 8 tokens out at update 1.
    cfg = compose_config("ppo", TINY_PPO + ["ppo.total_updates=3", "checkpoint_every=1",
                                            "health.thresholds.truncation_rate=0", "health.abort_on=[truncation_rate]"])
    with pytest.raises(PipelineError, match="stopped at update 1: health/truncation_rate"):
        ppo.run(cfg)
    assert (chain / "artifacts/default/.work/ppo/checkpoints/update-000001/state.json").is_file()
    assert not (chain / "artifacts/default/ppo").exists()


def test_ppo_ptx_adds_the_pretraining_likelihood(chain):
    """InstructGPT eq. 2: the policy also climbs log pi on pretraining batches (loss/ptx_avg)."""
    from stages import ppo
    with_ptx = ppo.run(compose_config("ppo", TINY_PPO + ["algorithm=ppo_ptx", "ppo.ptx_batch_size=4",
                                                         "ppo.ptx_block_size=32"]))
    assert with_ptx["loss/ptx_avg"] > 0  # a mean negative log-likelihood
    assert load_artifact(chain / "artifacts/default/ppo_ptx", "ppo_ptx").metrics == with_ptx
    without = ppo.run(compose_config("ppo", TINY_PPO))
    assert "loss/ptx_avg" not in without
    # Every update records the loop's whole pass (what bench/ppo.py compares with TRL's update
    # stamps): at least the rollout and the update it contains.
    for h in history(chain):
        assert h["time/loop"] >= h["time/rollout"] + h["time/update"]


def test_sharpening_adds_alpha_times_the_reference_log_likelihood_to_each_score(chain):
    """reward.sharpen: the same responses (same seed, same policy) score alpha * sum_t log pi_ref
    higher, or alpha times the per-token mean; and the stage passes the setting to its trainer."""
    a = rollout(build(["reward.sharpen.coef=0"])[3])
    b = rollout(build(["reward.sharpen.coef=0.5", "reward.sharpen.per_token=false"])[3])
    c = rollout(build(["reward.sharpen.coef=0.5", "reward.sharpen.per_token=true"])[3])
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_ids, c.response_ids)
    seq = (a.ref_logprobs * a.response_mask).sum(1)
    assert (seq < 0).all()
    torch.testing.assert_close(b.scores - a.scores, 0.5 * seq)
    torch.testing.assert_close(c.scores - a.scores, 0.5 * seq / a.response_mask.sum(1))
    from stages import ppo
    ppo.run(compose_config("ppo", TINY_PPO + ["reward.sharpen.coef=0", "ppo.total_updates=1"]))
    off = history(chain)[0]
    ppo.run(compose_config("ppo", TINY_PPO + ["reward.sharpen.coef=0.5", "reward.sharpen.per_token=false",
                                              "ppo.total_updates=1", "resume=false"]))
    on = history(chain)[0]
    assert on["objective/ref_logprob"] == pytest.approx(off["objective/ref_logprob"])  # the same first rollout
    assert on["objective/ref_logprob"] < 0
    assert on["objective/scores"] - off["objective/scores"] == pytest.approx(0.5 * on["objective/ref_logprob"])


def test_the_missing_eos_penalty_falls_on_the_responses_that_did_not_stop(chain):
    """ppo.missing_eos_penalty: the same responses (same seed, same policy) score exactly the penalty
    lower where they ran out of tokens without a stop token, and the same where they stopped."""
    from pipeline.generation.stops import ends_with_stop
    _, _, fmt, off = build(["ppo.missing_eos_penalty=null", "ppo.max_new_tokens=12"])
    _, _, _, on = build(["ppo.missing_eos_penalty=1.5", "ppo.max_new_tokens=12"])
    a, b = rollout(off), rollout(on)
    assert torch.equal(a.response_ids, b.response_ids)
    ended = ends_with_stop(a.response_ids, a.response_mask, torch.tensor(fmt.stop_ids))
    assert (~ended).any()  # the tiny chain's SFT rarely stops within 12 tokens
    torch.testing.assert_close(a.scores - b.scores, torch.where(ended, 0.0, 1.5))


def test_target_kl_stops_the_epochs_once_the_policy_moved_past_it(chain):
    """ppo.target_kl: after an epoch whose mean approx KL to the rollout policy exceeds it, no
    further epoch runs (3 epochs x 2 minibatches = 6 steps without it; one epoch, 2 steps, at 0)."""
    counts = {}
    for target in ("null", "0.0"):
        _, _, _, trainer = build([f"ppo.target_kl={target}", "ppo.ppo_epochs=3"])
        counts[target] = trainer.train_step(rollout(trainer))["optimizer_steps"]
    assert counts == {"null": 6, "0.0": 2}


def test_the_adaptive_kl_coefficient_follows_the_kl_each_update_observed(chain):
    """Ziegler et al.'s controller is updated once an update, with that update's sequence KL and
    episode count: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)."""
    _, _, _, trainer = build(["ppo.kl.controller=adaptive", "ppo.kl.init_coef=0.2", "ppo.kl.target=0.001",
                              "ppo.kl.horizon=64"])
    prompts = PROMPTS
    metrics, _, _ = trainer.step(prompts, [as_conversation(p) for p in prompts])
    kl = metrics["objective/kl"]
    error = max(-0.2, min(0.2, kl / 0.001 - 1))
    assert trainer.kl_ctl.value == pytest.approx(0.2 * (1 + error * 8 / 64))
    assert trainer.kl_ctl.value != 0.2


def test_the_kl_in_the_loss_adds_beta_times_k3_of_the_current_policy(chain):
    """algorithm.kl_in=loss (the GRPO paper's form): once the policy has moved off the reference,
    a micro-batch's loss is the surrogate plus beta times the k3 term, and only that."""
    from pipeline.rl.losses import loss_weights
    _, _, _, trainer = build(["algorithm=grpo", "algorithm.kl_in=loss", "ppo.kl.controller=fixed",
                              "algorithm.kl_coef=0.5", "ppo.learning_rate=1e-2", "algorithm.entropy_coef=0"])
    trainer.train_step(rollout(trainer))  # the policy moves off the reference
    r = rollout(trainer, seed=1)
    w, units = loss_weights(r.response_mask, trainer.alg.loss_agg, trainer.cfg.max_new_tokens)
    tokens = r.response_mask.sum()
    losses = {}
    for beta in (0.5, 0.0):
        trainer.kl_ctl.value = beta
        (loss, parts), = list(trainer._micro_losses(r.trimmed(), w, units, tokens))
        losses[beta] = (loss.item(), parts["pg_loss"].item(), parts["kl_loss"].item())
    (with_kl, pg, kl), (without, pg0, _) = losses[0.5], losses[0.0]
    assert kl > 0 and pg == pytest.approx(pg0)
    assert without == pytest.approx(pg, abs=1e-7) and with_kl == pytest.approx(pg + 0.5 * kl, abs=1e-7)


def test_the_entropy_term_adds_minus_coef_times_the_policy_entropy_and_sharpens(chain):
    """algorithm.entropy_coef: a micro-batch's loss is the surrogate minus coef times the policy's mean
    token entropy (aggregated as the surrogate), and only that; a negative coef lowers the entropy
    the trained policy samples with, against the same update without the term."""
    from pipeline.rl.losses import loss_weights
    _, _, _, trainer = build(["algorithm.entropy_coef=-0.5"])
    r = rollout(trainer)
    w, units = loss_weights(r.response_mask, trainer.alg.loss_agg, trainer.cfg.max_new_tokens)
    loss, parts = next(trainer._micro_losses(r.trimmed(), w, units, r.response_mask.sum()))  # the policy term
    sampled = (r.entropy * r.response_mask).sum() / r.response_mask.sum()  # the sampler's own entropies
    assert parts["entropy_loss"].item() == pytest.approx(sampled.item(), rel=1e-4)
    assert loss.item() == pytest.approx(parts["pg_loss"].item() + 0.5 * parts["entropy_loss"].item(), abs=1e-6)
    from pipeline.rl.rollout import pack
    m, entropy = r.trimmed(), {}
    for coef in ("0.0", "-2.0"):
        _, model, fmt, trainer = build([f"algorithm.entropy_coef={coef}", "ppo.learning_rate=1e-2", "ppo.ppo_epochs=4"])
        stats = trainer.train_step(r)
        assert ("entropy_loss" in stats) == (coef != "0.0")
        with torch.no_grad():  # the trained policy's entropy at the rollout's own states
            p = pack(m.query_ids, m.query_mask, m.response_ids, m.response_mask, fmt.pad_id, model.packs_rows,
                     model.attention_cost)
            _, h = model.logprobs(p, m.response_ids, 1.0, with_entropy=True)
            by_hand, model.lm_head_by_hand = model.lm_head_by_hand, False  # the fallback: the model's own head
            _, h_full = model.logprobs(p, m.response_ids, 1.0, with_entropy=True)
            model.lm_head_by_hand = by_hand
        torch.testing.assert_close(h_full * m.response_mask, h * m.response_mask, atol=1e-4, rtol=0)
        entropy[coef] = ((h * m.response_mask).sum() / m.response_mask.sum()).item()
    assert entropy["-2.0"] < entropy["0.0"] - 0.1


def test_ptx_batches_are_a_pure_function_of_update_and_step():
    from pipeline.rl.trainer import PtxBatches
    stream = torch.arange(1000)
    a, b = PtxBatches(stream, 16, 4, seed=0), PtxBatches(stream, 16, 4, seed=0)
    assert torch.equal(a.batch(3, 1), b.batch(3, 1)) and not torch.equal(a.batch(3, 1), a.batch(3, 2))
    x = a.batch(0, 0)
    assert x.shape == (4, 16) and (x[:, 1:] - x[:, :-1] == 1).all()  # contiguous windows of the stream
    # Two processes take the two halves of the batch one process with twice the size draws.
    halves = [PtxBatches(stream, 16, 2, seed=0).batch(3, 1, rank, 2) for rank in (0, 1)]
    assert not torch.equal(halves[0], halves[1])
    assert torch.equal(torch.cat(halves), PtxBatches(stream, 16, 4, seed=0).batch(3, 1))


def test_folded_adapters_give_the_numbers_of_the_lora_products(chain):
    """``ppo.fold_adapters``: every role run through a copy of the weights with its adapters folded
    in gives the rollout (reference, value, reward, the sampler's log-probs) and the training
    steps (the trained adapters' gradients, by hand in _FoldedLoRA) of the LoRA products, to float
    rounding; the trained roles' copies follow each step, the SFT copy stays, and the copies are
    nothing RL trains or saves."""
    _, apart, _, t_apart = build(["ppo.fold_adapters=never"])
    _, folded, _, t_folded = build(["ppo.fold_adapters=auto"])  # the tiny model: an adapter is ~1/4 of a layer
    assert folded.lora_share() > 0.1 and folded.folds and not apart.folds
    a, b = rollout(t_apart), rollout(t_folded)
    torch.testing.assert_close(b.response_ids, a.response_ids)
    # fp32 rounding of W + s B A against W x + s B (A x): up to 1.1e-5 on these log-probs (sampled tokens
    # down to ~-10 nats); a wrong fold is off by the adapter's own effect, orders of magnitude more.
    for key in ("ref_logprobs", "values", "rm_scores", "logprobs"):
        torch.testing.assert_close(getattr(b, key), getattr(a, key), atol=3e-5, rtol=0)
    assert (a.ref_logprobs != b.ref_logprobs).any() and (a.logprobs != b.logprobs).any()  # the copies ran
    layers = [m for m in folded.peft.modules() if hasattr(m, "_folded")]
    assert all(set(m._folded) == {"ref", "ref+reward", "policy", "ref+value"} for m in layers)
    before = [m._folded["ref"].weight.clone() for m in layers]
    start = {k: v.clone() for k, v in apart.trainable_state().items()}
    t_apart.train_step(a)
    t_folded.train_step(a)  # the same rollout, shuffle and optimizer: the same steps
    want, got = apart.trainable_state(), folded.trainable_state()
    assert set(got) == set(want)
    unchanged = [k for k in want if ".lora_A." in k and torch.equal(want[k], start[k])]
    assert not unchanged, unchanged
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
    for m in layers:
        for role in ("policy", "ref+value"):  # W + sum s B A of the adapters as they now are
            delta = sum(m.scaling[x] * m.lora_B[x].weight @ m.lora_A[x].weight for x in role.split("+"))
            torch.testing.assert_close(m._folded[role].weight, m.base_layer.weight + delta, atol=1e-6, rtol=0)
    assert all(torch.equal(m._folded["ref"].weight, w) for m, w in zip(layers, before))
    assert len(list(folded.parameters())) == len(list(apart.parameters()))
