"""The over-optimisation curve (pipeline/eval/curve.py), the agreement of two scorers and the judge's
report section (pipeline/eval/judge.py), and policy snapshots (pipeline/rl/snapshots.py): worked values."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.eval.curve import (
    SnapshotRuns,
    SnapshotSample,
    best_points,
    build_curves,
    curve_decoding,
    curve_point,
    sqrt_kl,
    stage_scores,
)
from pipeline.eval.judge import (add_judge_scores, agreement_by_category, agreements, check_judge, judge_report,
                                 pairwise_agreement)
from pipeline.eval.report import curve_lines, flat_metrics, judge_lines
from pipeline.rl.snapshots import Snapshots

pytestmark = pytest.mark.unit


# --- the curve ----------------------------------------------------------------------------------


def test_sqrt_kl_is_the_distance_and_a_negative_k1_mean_is_zero():
    assert sqrt_kl(0.25) == 0.5 and sqrt_kl(4.0) == 2.0 and sqrt_kl(0.0) == 0.0
    assert sqrt_kl(-0.03) == 0.0  # a k1 mean dips below 0 by noise near the start


def test_curve_point_means_each_scorer_over_the_prompts():
    p = curve_point(10, 2.25, proxy=[1.0, 2.0, 3.0], gold=[1.0, -1.0, 0.4], judge=None)
    assert p == {"update": 10, "kl": 2.25, "sqrt_kl": 1.5, "proxy": 2.0, "gold": pytest.approx(0.4 / 3),
                 "judge": None}


def test_best_point_is_the_highest_gold_score_the_earliest_on_a_tie():
    points = [curve_point(u, kl, None, [g], None) for u, kl, g in ((5, 0.25, 0.1), (10, 1.0, 0.6), (15, 4.0, 0.6))]
    assert best_points(points) == {"gold": {"update": 10, "score": 0.6, "sqrt_kl": 1.0}, "judge": None}
    assert best_points([]) == {"gold": None, "judge": None}


def snapshot_runs():
    """ppo's snapshots at updates 10, 20, 30 on 2 prompts, KL 0.25, 1 and 4 (sqrt: 0.5, 1, 2)."""
    return SnapshotRuns("sample", {"ppo": [SnapshotSample(10, ["a", "b"], 0.25), SnapshotSample(20, ["c", "d"], 1.0),
                                           SnapshotSample(30, ["e", "f"], 4.0)]})


def test_the_snapshots_texts_are_scored_beside_the_stages_and_split_off_again():
    runs = snapshot_runs()
    assert runs.texts() == {"ppo@10": {"sample": ["a", "b"]}, "ppo@20": {"sample": ["c", "d"]},
                            "ppo@30": {"sample": ["e", "f"]}}
    both = {"sft": {"sample": [0.0]}, "ppo": {"sample": [1.0]}, "ppo@10": {"sample": [2.0]}}
    assert stage_scores(both, ["sft", "ppo"]) == {"sft": {"sample": [0.0]}, "ppo": {"sample": [1.0]}}
    assert stage_scores(None, ["sft"]) is None


def test_the_proxy_rises_while_the_judge_peaks_worked_curve():
    """Gao et al.'s picture in three points: the proxy climbs with sqrt(KL), the judge peaks at update 20."""
    rm = {"sft": {"sample": [0.0, 0.0]}, "ppo@10": {"sample": [0.0, 1.0]}, "ppo@20": {"sample": [1.0, 2.0]},
          "ppo@30": {"sample": [3.0, 3.0]}}
    judge = {"sft": {"sample": [0.1, 0.1]}, "ppo@10": {"sample": [0.2, 0.2]}, "ppo@20": {"sample": [0.4, 0.8]},
             "ppo@30": {"sample": [0.0, 0.2]}}
    curves = build_curves(snapshot_runs(), rm, judge, gold=None, tasks=None, world=None)
    curve = curves["ppo"]
    assert curve["decoding"] == "sample"
    assert [(p["update"], p["sqrt_kl"], p["proxy"]) for p in curve["points"]] == [(10, 0.5, 0.5), (20, 1.0, 1.5),
                                                                                 (30, 2.0, 3.0)]
    assert [p["judge"] for p in curve["points"]] == pytest.approx([0.2, 0.6, 0.1])
    assert all(p["gold"] is None for p in curve["points"])  # not the world's prompts
    assert curve["origin"] == {"update": 0, "kl": 0.0, "sqrt_kl": 0.0, "proxy": 0.0, "gold": None,
                               "judge": pytest.approx(0.1)}
    assert curve["best"] == {"gold": None, "judge": {"update": 20, "score": pytest.approx(0.6), "sqrt_kl": 1.0}}

    report = {"curves": json.loads(json.dumps(curves)), "judge_model": None}
    md = "\n".join(curve_lines(report))
    assert "## Over-optimisation curve: ppo" in md
    assert "| update | sqrt(KL to SFT) | KL to SFT | proxy (RM) | independent judge |" in md  # no gold column
    assert "| 0 (sft) | 0.000 | 0.000 | +0.000 | +0.100 |" in md
    assert "| 20 | 1.000 | 1.000 | +1.500 | +0.600 |" in md
    assert "Best snapshot on the independent judge: update 20 (+0.600 at sqrt(KL) 1.000)." in md
    assert curve_lines({"curves": {}}) == [] and curve_lines({}) == []


def test_the_curve_samples_with_the_t1_decoding_only():
    decodings = OmegaConf.create({
        "greedy": {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_beams": 1},
        "warm": {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0, "num_beams": 1},
        "nucleus": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 0.9, "num_beams": 1},
        "sample": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_beams": 1}})
    assert curve_decoding(decodings) == "sample"
    assert curve_decoding({k: v for k, v in decodings.items() if k != "sample"}) is None


# --- agreement and the judge's section ----------------------------------------------------------


def test_pairwise_agreement_worked_example():
    a = {"x": [1.0, 0.0], "y": [2.0, 0.0], "z": [0.0, 5.0]}
    b = {"x": [3.0, 1.0], "y": [4.0, 1.0], "z": [5.0, 0.0]}
    # prompt 0: (x, y) agree, (x, z) and (y, z) disagree; prompt 1: (x, y) is a tie in a (left out),
    # (x, z) and (y, z) disagree: 1 of 5 counted pairs
    assert pairwise_agreement(a, b) == (pytest.approx(0.2), 5)
    assert pairwise_agreement(a, a) == (1.0, 5)
    assert pairwise_agreement(a, {s: [-v for v in vs] for s, vs in a.items()}) == (0.0, 5)
    assert pairwise_agreement({"x": [1.0], "y": [1.0]}, {"x": [0.0], "y": [2.0]}) == (None, 0)


def test_agreements_pair_every_two_scorers_present():
    rm = {"sft": {"greedy": [0.0, 1.0]}, "ppo": {"greedy": [1.0, 0.0]}}
    judge = {"sft": {"greedy": [0.0, 2.0]}, "ppo": {"greedy": [1.0, 3.0]}}
    out = agreements({"rm": rm, "judge": judge, "gold": None})
    assert out == {"rm_vs_judge": {"greedy": {"share": 0.5, "pairs": 2}}}


def test_agreement_by_category_worked_example():
    a = {"x": {"sample": [1.0, 0.0, 2.0]}, "y": {"sample": [0.0, 1.0, 1.0]}}
    b = {"x": {"sample": [0.0, 0.0, 3.0]}, "y": {"sample": [1.0, 2.0, 0.0]}}
    out = agreement_by_category(a, b, ["fact", "harm", "fact"])
    # fact: prompt 0 disagrees (a prefers x, b prefers y), prompt 2 agrees (both x); harm: prompt 1 agrees
    assert out == {"fact": {"sample": {"share": 0.5, "pairs": 2}},
                   "harm": {"sample": {"share": 1.0, "pairs": 1}},
                   "all": {"sample": {"share": pytest.approx(2 / 3), "pairs": 3}}}
    # a category the two scorers never both order has no share
    tied = agreement_by_category(a, {s: {"sample": [0.0, 0.0, 0.0]} for s in b}, ["fact", "harm", "fact"])
    assert tied["harm"]["sample"] == {"share": None, "pairs": 0}


def test_judge_report_win_rates_against_sft_worked():
    judged = {"sft": {"sample": [0.0, 1.0, 2.0, 3.0]}, "ppo": {"sample": [1.0, 1.0, 1.0, 4.0]},
              "base": {"sample": [0.0, 0.0, 0.0, 0.0]}}
    rm = {s: {"sample": list(v["sample"])} for s, v in judged.items()}
    report = judge_report("some/judge", judged, rm, None)
    assert report["source"] == "some/judge"
    assert report["scores"]["sft"]["sample"] == 1.5 and report["scores"]["ppo"]["sample"] == 1.75
    # ppo vs sft: win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4; base vs sft: tie, loss, loss, loss
    assert report["win_rate"] == {"ppo_vs_sft": {"sample": 0.625}, "base_vs_sft": {"sample": 0.125}}
    low, high = report["win_rate_ci"]["ppo_vs_sft"]["sample"]
    assert 0.0 <= low <= 0.625 <= high <= 1.0
    assert report["agreement"]["rm_vs_judge"]["sample"]["share"] == 1.0  # the same scores
    assert judge_report(None, None, rm, None) is None

    full = {"judge_model": json.loads(json.dumps(report)), "curves": {}}
    md = "\n".join(judge_lines(full))
    assert "## Independent judge: `some/judge`" in md
    assert "| judge score (mean), sample | +1.500 | +1.750 | +0.000 |" in md
    assert "| ppo vs sft | 62.5% [" in md and "| rm vs judge | 100.0% of " in md
    assert judge_lines({"judge_model": None}) == []


def test_flat_metrics_carry_the_judge_and_the_best_snapshot():
    from tests.unit.eval.test_metrics import make_report

    report = make_report()
    judged = {s: {d: [0.0, 1.0, 2.0, 3.0] for d in ("greedy", "sample")} for s in ("base", "sft", "ppo")}
    report["judge_model"] = judge_report("j", judged, None, None)
    report["curves"] = {"ppo": {"best": {"gold": {"update": 20, "score": 0.5, "sqrt_kl": 1.0}, "judge": None}}}
    flat = flat_metrics(report)
    assert flat["judge/ppo/sample/score"] == 1.5 and flat["judge_win_rate/ppo_vs_sft/greedy"] == 0.5
    assert flat["curve/ppo/best_gold_update"] == 20 and "curve/ppo/best_judge_update" not in flat


def test_responses_get_their_judge_score():
    records = [{"responses": {"sft": {"greedy": {"response": "a"}}}},
               {"responses": {"sft": {"greedy": {"response": "b"}}}}]
    add_judge_scores(records, {"sft": {"greedy": [0.5, -1.0]}})
    assert [r["responses"]["sft"]["greedy"]["judge_score"] for r in records] == [0.5, -1.0]


def test_a_judge_that_names_no_model_is_refused_before_sampling(tmp_path):
    check_judge(None)  # judge: null, the default
    with pytest.raises(PipelineError, match=r"judge=.*nope: no model folder, hub id or rm artifact"):
        check_judge(str(tmp_path / "nope"))


# --- snapshots ------------------------------------------------------------------------------------


class FakePeft:
    """Writes what peft's save_pretrained writes for a named adapter: <dir>/<name>/ plus a README."""

    def __init__(self):
        self.step = 0

    def save_pretrained(self, out, selected_adapters, save_embedding_layers):
        assert selected_adapters == ["policy"] and save_embedding_layers is False
        (Path(out) / "policy").mkdir(parents=True)
        (Path(out) / "policy" / "adapter_model.safetensors").write_text(f"weights after {self.step}")
        (Path(out) / "policy" / "adapter_config.json").write_text("{}")
        (Path(out) / "README.md").write_text("model card")


def test_snapshots_every_n_updates_survive_a_resume_and_land_in_the_artifact(tmp_path):
    work = tmp_path / ".work" / "ppo" / "snapshots"
    model = SimpleNamespace(peft=FakePeft())
    snaps = Snapshots(work, 2, resumed_at=0)
    for update in range(1, 6):  # a run killed after update 5, its last checkpoint at update 4
        model.peft.step = update
        snaps.maybe_save(update, model)
    assert [p.name for p in snaps.folders()] == ["update-000002", "update-000004"]
    assert sorted(p.name for p in (work / "update-000002").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    (work / "update-000006").mkdir()  # taken after the checkpoint the run resumes from
    snaps = Snapshots(work, 2, resumed_at=4)
    assert [p.name for p in snaps.folders()] == ["update-000002", "update-000004"]
    model.peft.step = 6
    snaps.maybe_save(6, model)

    history = [{"objective/kl": 0.1 * u, "objective/scores": float(u)} for u in range(1, 7)]
    artifact = tmp_path / "artifact"
    entries = snaps.copy_into(artifact, history)["snapshots"]
    assert entries == [{"update": u, "path": f"snapshots/update-{u:06d}", "kl": pytest.approx(0.1 * u),
                        "score": float(u)} for u in (2, 4, 6)]
    assert (artifact / "snapshots" / "update-000006" / "adapter_model.safetensors").read_text() == "weights after 6"
    snaps.remove()
    assert not (tmp_path / ".work" / "ppo").exists()


def test_snapshots_off_and_a_fresh_start_keep_nothing(tmp_path):
    work = tmp_path / "snapshots"
    (work / "update-000003").mkdir(parents=True)  # left by an earlier run
    for every in (None, 0):
        snaps = Snapshots(work, every, resumed_at=0)
        assert snaps.folders() == [] and snaps.maybe_save(2, None) is None
        assert snaps.copy_into(tmp_path / "artifact", []) == {}
    with pytest.raises(ConfigError, match="ppo.snapshot_every=-1"):
        Snapshots(work, -1, resumed_at=0)


def test_the_curve_plot_has_a_panel_per_scorer_present(tmp_path):
    from pipeline.eval.plots import plot_curves

    rm = {"ppo@10": {"sample": [1.0]}, "ppo@20": {"sample": [2.0]}, "ppo@30": {"sample": [3.0]}}
    curves = build_curves(snapshot_runs(), rm, None, gold=None, tasks=None, world=None)
    assert curves["ppo"]["origin"] is None  # SFT not evaluated: no point at 0
    path = plot_curves(curves, tmp_path / "overoptimisation.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_an_rl_artifact_without_snapshots_lists_none():
    from pipeline.core.artifacts import Artifact
    from pipeline.eval.curve import snapshots_of

    for metrics in ({}, {"snapshots": None}):
        assert snapshots_of(Artifact("ppo", Path("."), {"metrics": metrics})) == []
    entries = [{"update": 4}, {"update": 2}]
    assert snapshots_of(Artifact("ppo", Path("."), {"metrics": {"snapshots": entries}})) == [{"update": 2},
                                                                                             {"update": 4}]


def test_removing_the_snapshots_keeps_another_stages_work_folder(tmp_path):
    work = tmp_path / ".work"
    (work / "ppo" / "snapshots" / "update-000002").mkdir(parents=True)
    (work / "ppo" / "checkpoint-2").mkdir()  # the stage's own checkpoints, removed separately
    Snapshots(work / "ppo" / "snapshots", 2, resumed_at=2).remove()
    assert [p.name for p in (work / "ppo").iterdir()] == ["checkpoint-2"]
    Snapshots(work / "never" / "snapshots", None, resumed_at=0).remove()  # snapshots off: nothing to remove
    (work / "ppo" / "snapshots" / "update-000002").mkdir(parents=True)
    Snapshots(work / "ppo" / "snapshots", 2, resumed_at=0, main=False).remove()  # only the main process removes
    assert (work / "ppo" / "snapshots" / "update-000002").is_dir()


def test_a_snapshot_after_the_first_update_carries_that_updates_kl(tmp_path):
    snaps = Snapshots(tmp_path / "snapshots", 1, resumed_at=0)
    snaps.maybe_save(1, SimpleNamespace(peft=FakePeft()))
    history = [{"objective/kl": 0.25, "objective/scores": 1.5}]
    (entry,) = snaps.copy_into(tmp_path / "artifact", history)["snapshots"]
    assert entry == {"update": 1, "path": "snapshots/update-000001", "kl": 0.25, "score": 1.5}
