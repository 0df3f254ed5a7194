"""bench/alignment.py: a run's sampled figures averaged over sampling seeds, targets checked
(its run on the tiny chain: tests/stage/test_eval_stage.py)."""

import pytest

from bench.alignment import misses, same_sft, summarise, table


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
    same_sft(runs)  # one SFT: accepted
    every = summarise(runs["s0"] + runs["s1"])
    out = table(every, 2, {run: summarise(rs) for run, rs in runs.items()})
    assert "mean of 2 runs x 2 seeds" in out and "win by run (s0, s1)" in out
    assert "| ppo | 63.0% | 60.0%-66.0% | 65.0% / 61.0% | 20.0% |" in out
    assert out.splitlines()[1].count("|") == out.splitlines()[2].count("|")  # the sft row has every column


@pytest.mark.unit
def test_runs_with_different_sfts_are_refused():
    other = _report(0.64, 0.20, 1.0)
    other["stages"]["sft"]["sample"] = dict(other["stages"]["sft"]["sample"], correct_rate=0.3)
    with pytest.raises(SystemExit, match=r"runs a and b have different SFT samples at seed 0"):
        same_sft({"a": [_report(0.64, 0.20, 1.0)], "b": [other]})
