"""pipeline.eval's metric math on worked examples, the report layout, and the
generate / pipeline entry points' argument handling (no trained model needed)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.core.errors import PipelineError
from pipeline.eval.metrics import (METRICS, category_scores, gold_metrics, response_words, stage_metrics, win_rate,
                                   win_rates)
from pipeline.eval.plots import plot_category_scores, plot_rl_history, plot_stage_scores
from pipeline.eval.intervals import rate_intervals, win_rate_intervals
from pipeline.eval.report import build_report, flat_metrics, render_markdown, response_records
from pipeline.eval.rollouts import Rollout, response_logprobs, rollout_kl, sequence_kl
from pipeline.world.judge import Verdict
from tests.conftest import compose_config

pytestmark = pytest.mark.unit


def verdict(score, category, correct=False, hallucinated=False, unsafe=False, verbose=False):
    return Verdict(score, category, correct, hallucinated, unsafe, verbose)


# Four verdicts, one per label:
#   arithmetic, correct          ->  1.0
#   fact, wrong                  ->  0.0
#   unanswerable, hallucinated   -> -1.0
#   harmful, refused but verbose ->  0.7 (1.0 - 0.3)
FOUR = [verdict(1.0, "arithmetic", correct=True),
        verdict(0.0, "fact"),
        verdict(-1.0, "unanswerable", hallucinated=True),
        verdict(0.7, "harmful", correct=True, verbose=True)]


# --- metrics from verdicts -----------------------------------------------------------------


def test_gold_metrics_rates_use_their_own_category():
    m = gold_metrics(FOUR)
    assert m["gold_score"] == pytest.approx(0.7 / 4)  # (1 + 0 - 1 + 0.7) / 4
    assert m["correct_rate"] == 0.5  # checkable: arithmetic right, fact wrong; harmful not counted
    assert m["hallucination_rate"] == 1.0  # the one unanswerable prompt
    assert m["unsafe_rate"] == 0.0  # the one harmful prompt was refused
    assert m["verbose_rate"] == 0.25  # 1 of all 4


def test_correct_rate_counts_only_prompts_with_a_checkable_answer():
    # A refusal of a harmful request or an "I don't know" is no wrong answer: 1 of 1, not 1 of 3.
    m = gold_metrics([verdict(1.0, "arithmetic", correct=True), verdict(1.0, "unanswerable"), verdict(1.0, "harmful")])
    assert m["correct_rate"] == 1.0


def test_gold_metrics_is_none_without_prompts_of_a_kind():
    m = gold_metrics([verdict(1.0, "repeat", correct=True)])
    assert m["correct_rate"] == 1.0
    assert m["hallucination_rate"] is None and m["unsafe_rate"] is None


def test_category_scores_follow_the_world_order():
    scores = category_scores(FOUR + [verdict(0.0, "arithmetic")])
    assert list(scores) == ["arithmetic", "fact", "unanswerable", "harmful"]  # no repeat prompt
    assert scores["arithmetic"] == 0.5 and scores["harmful"] == pytest.approx(0.7)


def test_win_rate_counts_ties_half():
    # win, tie, loss, tie -> (1 + 0.5 + 0 + 0.5) / 4
    assert win_rate([1.0, 0.0, 0.7, -1.0], [0.0, 0.0, 1.0, -1.0]) == 0.5
    assert win_rate([1.0, 1.0, 1.0], [0.0, 1.0, 0.0]) == pytest.approx(2.5 / 3)
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 0.0])


def test_win_rates_cover_every_ordered_pair():
    scores = {"base": {"greedy": [0.0, 0.0]}, "sft": {"greedy": [1.0, 0.0]}, "ppo": {"greedy": [1.0, 1.0]}}
    wins = win_rates(scores)
    assert set(wins) == {"base_vs_sft", "base_vs_ppo", "sft_vs_base", "sft_vs_ppo",
                         "ppo_vs_base", "ppo_vs_sft"}
    assert wins["sft_vs_base"]["greedy"] == 0.75  # win, tie
    assert wins["ppo_vs_sft"]["greedy"] == 0.75  # tie, win
    assert wins["base_vs_sft"]["greedy"] == 0.25  # the complement


# --- KL to the reference -----------------------------------------------------------------


def test_sequence_kl_sums_masked_log_ratios():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-0.1, -0.4, float("-inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5 (a single sample may be negative); position 2 masked
    # row 1: 0 + 0.2 = 0.2; the -inf past EOS must not leak in
    assert torch.allclose(sequence_kl(logp, ref, mask), torch.tensor([-0.5, 0.2]))


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def test_response_logprobs_match_an_unpadded_forward(tiny_lm):
    long, short, response, T = [3, 4, 5, 6, 7], [5, 6, 7], [8, 9, 1], 0.7
    # Row 1 is left-padded by two; both responses are masked after their EOS (the 1).
    p_ids = torch.tensor([long, [0, 0] + short])
    p_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    r_ids = torch.tensor([response + [0], response + [0]])
    r_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    got = response_logprobs(tiny_lm, p_ids, p_mask, r_ids, r_mask, T)  # (2, 4)

    for row, prompt in enumerate((long, short)):
        with torch.no_grad():
            logits = tiny_lm(torch.tensor([prompt + response])).logits[0] / T  # (P + 3, V)
        # the logit at position P - 1 + j predicts response token j
        P = len(prompt)
        want = torch.log_softmax(logits[P - 1:P + 2], -1)[torch.arange(3), torch.tensor(response)]
        assert torch.allclose(got[row, :3], want, atol=1e-5)


def test_rollout_kl_of_a_policy_to_itself_is_zero(tiny_lm):
    batch = (torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]),
             torch.tensor([[7, 8, 1, 0]]), torch.tensor([[1, 1, 1, 0]]))
    rollout = Rollout(texts=["x"], ended=torch.tensor([True]), lengths=torch.tensor([3.0]), batches=[batch])
    assert rollout_kl(tiny_lm, tiny_lm, rollout, 1.0).abs().max().item() < 1e-6


# --- the report ------------------------------------------------------------------------------


RESPONSES = ["7", "lamp lamp", "I don't know.", "I can't help with that."]
RM = {"base": [0.0, 0.0, 0.0, 0.0], "sft": [0.5, -0.5, 1.0, 0.0], "ppo": [1.0, 0.5, 1.0, 0.5]}


def make_report(stages=("base", "sft", "ppo"), decodings=("greedy", "sample"), gold=True, with_intervals=False):
    rollout = Rollout(texts=RESPONSES, ended=torch.tensor([True, True, False, True]),
                      lengths=torch.tensor([2.0, 3.0, 5.0, 8.0]), batches=[])
    metrics = {s: {d: stage_metrics(FOUR if gold else None, rollout, RM[s] if s != "base" else None,
                                    None if d == "greedy" else (0.0 if s == "sft" else 3.0), 1.5)
                   for d in decodings} for s in stages}
    scores = {s: {d: [v.score for v in FOUR] for d in decodings} for s in stages}
    rm_scores = {s: {d: RM[s] for d in decodings} for s in stages}
    categories = {s: {d: category_scores(FOUR) for d in decodings} for s in stages}
    health = {"ppo": {"logprob_gap": 1e-6, "truncation_rate": 0.25}}
    intervals = {s: {d: rate_intervals(FOUR if gold else None, rollout.ended.tolist()) for d in decodings}
                 for s in stages} if with_intervals else None
    return build_report("unit", 4, metrics, win_rates(scores) if gold else None, win_rates(rm_scores),
                        categories if gold else None, health, {"dpo": "no artifact"}, seconds=1.0,
                        intervals=intervals, win_ci=win_rate_intervals(scores) if with_intervals and gold else None)


def test_report_json_layout():
    report = json.loads(json.dumps(make_report()))  # survives JSON unchanged
    assert set(report["stages"]) == {"base", "sft", "ppo"}
    cell = report["stages"]["ppo"]["sample"]
    assert list(cell) == [key for key, _, _ in METRICS]
    assert cell["eos_rate"] == 0.75 and cell["response_words"] == 2.75  # (1 + 2 + 3 + 5) / 4
    assert cell["response_tokens"] == 4.5 and cell["corpus_nll"] == 1.5  # (2 + 3 + 5 + 8) / 4
    assert cell["rm_score"] == 0.75 and cell["kl_to_sft"] == 3.0  # (1 + 0.5 + 1 + 0.5) / 4
    assert report["stages"]["base"]["sample"]["rm_score"] is None
    assert report["stages"]["ppo"]["greedy"]["kl_to_sft"] is None
    assert report["win_rate"]["ppo_vs_sft"] == {"greedy": 0.5, "sample": 0.5}  # all ties
    # RM judge: ppo [1, .5, 1, .5] vs sft [.5, -.5, 1, 0] -> win, win, tie, win = 3.5 / 4
    assert report["rm_win_rate"]["ppo_vs_sft"] == {"greedy": 0.875, "sample": 0.875}
    assert report["categories"]["sft"]["greedy"]["harmful"] == pytest.approx(0.7)
    assert report["judge"] == "gold" and report["health"]["ppo"]["truncation_rate"] == 0.25


def test_report_outside_the_world_has_no_gold_rows_and_rm_win_rates():
    report = make_report(gold=False)
    assert report["judge"] == "rm" and report["win_rate"] is None and report["categories"] is None
    assert report["stages"]["ppo"]["sample"]["gold_score"] is None
    md = render_markdown(report)
    assert "gold score" not in md and "Win rates (gold judge" not in md
    assert "## Win rates (reward model, ties count half)" in md and "| ppo vs sft | 87.5% | 87.5% |" in md
    assert "| RM score (mean) |" in md and "| response tokens (mean) |" in md


def test_report_markdown_has_stage_columns_and_win_rates():
    md = render_markdown(make_report())
    assert "| metric | base | sft | ppo |" in md
    assert "## greedy" in md and "## sample" in md
    for pair in ("| sft vs base |", "| ppo vs sft |", "| ppo vs base |"):
        assert pair in md
    assert "| base vs sft |" not in md  # the complement is left to the reader
    assert "n/a" in md  # greedy KL, base RM score
    assert "## Rollout health" in md and "| logprob_gap | 1e-06 |" in md
    assert "Not in this report:\n- dpo: no artifact" in md


def test_flat_metrics_drop_missing_values():
    flat = flat_metrics(make_report())
    assert flat["ppo/sample/kl_to_sft"] == 3.0 and flat["win_rate/sft_vs_base/greedy"] == 0.5
    assert "ppo/greedy/kl_to_sft" not in flat and "base/greedy/rm_score" not in flat


def test_response_records_put_stages_side_by_side():
    texts = {"base": {"greedy": ["a", "b"]}, "sft": {"greedy": ["c", "d"]}}
    scores = {"base": {"greedy": [0.0, 1.0]}, "sft": {"greedy": [1.0, -1.0]}}
    rows = response_records(["p1", "p2"], ["fact", "harmful"], texts, scores, None)
    assert rows[1] == {"prompt": "p2", "category": "harmful", "responses": {
        "base": {"greedy": {"response": "b", "gold_score": 1.0, "rm_score": None}},
        "sft": {"greedy": {"response": "d", "gold_score": -1.0, "rm_score": None}}}}


def test_plots_are_written(tmp_path):
    bars = plot_category_scores({"base": {"fact": -0.2}, "sft": {"fact": 0.8, "harmful": 0.1}},
                                "t", tmp_path / "bars.png")
    history = [{"objective/scores": -1.0 + i / 10, "objective/rlhf_reward": -1.1 + i / 10,
                "objective/kl": i / 20} for i in range(5)]
    curves = plot_rl_history({"ppo": history, "rloo": history[:3]}, tmp_path / "rl.png")
    rm_bars = plot_stage_scores({"sft": 0.1, "ppo": 0.5}, "t", tmp_path / "rm.png")
    for png in (bars, curves, rm_bars):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- entry points: arguments, not models ---------------------------------------------------------


def test_generate_names_file_and_line_of_a_malformed_prompt(root):
    from stages import generate

    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2 plus 3?"}\n\n{"prompt": 3}\n')
    cfg = compose_config("generate", [f"prompt_file={prompts}"])
    with pytest.raises(PipelineError, match=rf"{prompts}, line 3: field `prompt` must be a non-empty list"):
        generate.run(cfg)  # fails before any model loads: the run has no artifacts at all


@pytest.mark.parametrize("overrides, message", [
    (["prompt=hi", "prompt_file=x.txt"], "exactly one of"),
    ([], "exactly one of"),
    (["prompt=hi", "stage=rm"], "stage=rm has no policy"),
])
def test_generate_rejects_bad_arguments(root, overrides, message):
    from stages import generate

    with pytest.raises(PipelineError, match=message):
        generate.run(compose_config("generate", overrides))


def test_pipeline_routes_each_override_to_the_configs_that_have_its_key():
    from stages.pipeline import overrides_for, top_level_key

    assert top_level_key("train.max_steps=3") == "train"
    assert top_level_key("decoding@samples.decoding=top_k") == "samples"
    assert top_level_key("+decoding@decodings.nucleus=top_p") == "decodings"
    user = ["run_name=exp", "seed=1", "arch.hidden_size=32", "train.max_steps=3", "max_prompts=8",
            "hydra.job.chdir=false"]
    base_keys = set(compose_config("base"))
    eval_keys = set(compose_config("eval"))
    assert overrides_for(base_keys, user) == ["run_name=exp", "seed=1", "arch.hidden_size=32",
                                              "train.max_steps=3", "hydra.job.chdir=false"]
    assert overrides_for(eval_keys, user) == ["run_name=exp", "seed=1", "max_prompts=8",
                                              "hydra.job.chdir=false"]


def test_pipeline_rejects_an_override_no_stage_has(root):
    from stages.pipeline import compose_all

    with pytest.raises(PipelineError, match=r"trian\.max_steps"):
        compose_all(["base", "sft"], ["trian.max_steps=3"])
    assert compose_all(["base"], ["arch.hidden_size=32"])["base"].arch.hidden_size == 32


def test_response_words_is_the_mean_word_count_even_for_one_response():
    assert response_words(["I can't help with that."]) == 5.0
    assert response_words(["a b", "c d e f"]) == 3.0 and response_words([]) == 0.0


def test_the_rm_agreement_table_and_metrics_by_category():
    report = make_report()
    report["rm_agreement"] = {"all": {"greedy": {"share": 0.75, "pairs": 8}, "sample": {"share": None, "pairs": 0}},
                              "fact": {"greedy": {"share": 0.5, "pairs": 4}, "sample": {"share": 0.625, "pairs": 8}}}
    md = render_markdown(report)
    assert "## Reward model vs gold judge, by category" in md
    assert "| category | greedy | sample |\n|---|---:|---:|" in md
    assert "| all | 75.0% of 8 | n/a of 0 |" in md and "| fact | 50.0% of 4 | 62.5% of 8 |" in md
    flat = flat_metrics(report)
    assert {k: v for k, v in flat.items() if k.startswith("rm_agreement/")} == {
        "rm_agreement/all/greedy": 0.75, "rm_agreement/fact/greedy": 0.5, "rm_agreement/fact/sample": 0.625}
