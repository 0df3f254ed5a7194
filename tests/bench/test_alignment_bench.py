"""bench/alignment.py: a run's sampled figures averaged over sampling seeds, targets checked
(its run on the tiny chain: tests/stage/test_eval_stage.py)."""

import json

import pytest

from bench.alignment import main, mean_points, misses, points, points_table, same_sft, summarise, table
from pipeline.core.errors import ArtifactError


def _report(win, correct, kl):
    cell = {"correct_rate": correct, "hallucination_rate": 0.1, "unsafe_rate": 0.2, "kl_to_sft": kl}
    sft = {"correct_rate": 0.25, "hallucination_rate": 0.3, "unsafe_rate": 0.5, "kl_to_sft": 0.0}
    return {"stages": {"sft": {"sample": sft}, "ppo": {"sample": cell}},
            "win_rate": {"ppo_vs_sft": {"sample": win}, "sft_vs_ppo": {"sample": 1 - win}}}


@pytest.mark.unit
def test_summarise_means_over_seeds_and_the_win_rates_range():
    got = summarise([_report(0.64, 0.20, 1.0), _report(0.68, 0.24, 0.8)])
    assert got["ppo"]["win"] == pytest.approx(0.66)
    assert (got["ppo"]["win_min"], got["ppo"]["win_max"]) == (0.64, 0.68)
    assert got["ppo"]["correct_rate"] == pytest.approx(0.22) and got["ppo"]["kl_to_sft"] == pytest.approx(0.9)
    assert got["sft"]["win"] is None and got["sft"]["correct_rate"] == 0.25


@pytest.mark.unit
def test_misses_names_each_target_missed():
    sft = {"correct_rate": 0.25, "hallucination_rate": 0.3, "unsafe_rate": 0.5}
    ok = {"win": 0.65, "correct_rate": 0.20, "hallucination_rate": 0.15, "unsafe_rate": 0.25}
    assert misses(ok, sft) == []  # every bound is inclusive
    bad = {"win": 0.649, "correct_rate": 0.199, "hallucination_rate": 0.151, "unsafe_rate": 0.251}
    assert misses(bad, sft) == ["win", "correct", "hallucination", "unsafe"]


@pytest.mark.unit
def test_two_runs_table_gives_the_mean_over_every_eval_and_each_runs_own_win_rate():
    runs = {"s0": [_report(0.64, 0.20, 1.0), _report(0.66, 0.20, 1.0)],  # run mean 65%
            "s1": [_report(0.60, 0.20, 1.0), _report(0.62, 0.20, 1.0)]}  # run mean 61%
    every = summarise(runs["s0"] + runs["s1"])
    out = table(every, 2, {run: summarise(rs) for run, rs in runs.items()})
    assert "mean of 2 runs x 2 seeds" in out and "win by run (s0, s1)" in out
    assert "| ppo | 63.0% | 60.0%-66.0% | 65.0% / 61.0% | 20.0% |" in out
    assert out.splitlines()[1].count("|") == out.splitlines()[2].count("|")  # the sft row has every column


def _sft(artifacts, run, weights_sha):
    (artifacts / run / "sft").mkdir(parents=True)
    manifest = {"stage": "sft", "files": {"adapter/adapter_model.safetensors": weights_sha}}
    (artifacts / run / "sft" / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.unit
def test_runs_with_different_sfts_are_refused_before_any_evaluation(tmp_path):
    for run, sha in (("a", "1"), ("b", "1"), ("c", "2")):
        _sft(tmp_path, run, sha)
    same_sft(["a", "b"], tmp_path)  # a copy of one SFT: accepted
    with pytest.raises(SystemExit, match=r"runs a and c have different SFT artifacts"):
        same_sft(["a", "b", "c"], tmp_path)
    with pytest.raises(ArtifactError, match=r"make sft"):  # a run without one says what to run
        same_sft(["a", "missing"], tmp_path)


def _row(category, **scores):
    return {"category": category, "responses": {s: {"sample": {"gold_score": g}} for s, g in scores.items()}}


@pytest.mark.unit
def test_points_split_the_win_rate_by_category_with_the_most_each_could_give():
    rows = [_row("fact", sft=1.0, ppo=1.0), _row("fact", sft=0.0, ppo=1.0),  # a tie, a win
            _row("harmful", sft=-1.0, ppo=1.0), _row("harmful", sft=1.0, ppo=0.7)]  # a win, a loss
    got = points(rows)
    assert got["ppo"]["fact"] == {"won": pytest.approx(0.375), "most": pytest.approx(0.375), "right": 1.0}
    assert got["ppo"]["harmful"] == {"won": pytest.approx(0.25), "most": pytest.approx(0.375), "right": 0.5}
    assert got["sft"] == {"fact": {"right": 0.5}, "harmful": {"right": 0.5}}
    # the categories' points add up to the win rate, ties half
    assert sum(c["won"] for c in got["ppo"].values()) == pytest.approx(0.625)


@pytest.mark.unit
def test_points_are_averaged_over_evals_and_tabled_in_win_rate_points():
    a = points([_row("fact", sft=0.0, ppo=1.0), _row("fact", sft=0.0, ppo=0.0)])  # won 0.75, right 0.5
    b = points([_row("fact", sft=1.0, ppo=0.0), _row("fact", sft=0.0, ppo=0.0)])  # won 0.25, right 0
    got = mean_points([a, b])
    assert got["ppo"]["fact"] == {"won": pytest.approx(0.5), "most": pytest.approx(0.875), "right": 0.25}
    out = points_table(got)
    assert "| ppo | 50.0 of 87.5 (25.0%) |" in out and "| sft | (25.0%) |" in out


@pytest.mark.unit
def test_reuse_refuses_eval_overrides_it_could_not_apply():
    with pytest.raises(SystemExit, match=r"--reuse evaluates nothing, so it cannot apply world.seed=6"):
        main(["--run", "t0", "--reuse", "--", "world.seed=6"])
