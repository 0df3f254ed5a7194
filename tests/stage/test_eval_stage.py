"""`make eval` and `make pipeline` end to end on the session's toy base -> sft -> rm chain.

The models are far too small to be good; these tests check the plumbing: every file of
the report, its layout, the KL and RM conventions, and that the pipeline skips exactly
the stages that are already built from the same config and parent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from stages import eval as eval_stage
from stages import pipeline
from tests.conftest import compose_config
from tests.stage.conftest import QUIET, TINY_BASE, TINY_SFT, copy_root

pytestmark = pytest.mark.stage


def test_eval_without_base_or_sft_says_what_to_run(root):
    with pytest.raises(PipelineError, match=r"make base.*make sft"):
        eval_stage.run(compose_config("eval", QUIET))


def test_eval_writes_the_report(chain):
    report = eval_stage.run(compose_config("eval", ["max_prompts=16"] + QUIET))
    out = chain / "artifacts" / "default" / "eval"

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["num_prompts"] == 16
    assert set(on_disk["stages"]) == {"base", "sft"} and "ppo" in on_disk["skipped"]
    for stage in ("base", "sft"):
        assert set(on_disk["stages"][stage]) == {"greedy", "sample"}
        for cell in on_disk["stages"][stage].values():
            assert -1.0 <= cell["gold_score"] <= 1.0 and 0.0 <= cell["eos_rate"] <= 1.0
            assert isinstance(cell["rm_score"], float)  # the chain has an RM
    assert on_disk["stages"]["sft"]["sample"]["kl_to_sft"] == 0.0
    assert isinstance(on_disk["stages"]["base"]["sample"]["kl_to_sft"], float)
    assert on_disk["stages"]["base"]["greedy"]["kl_to_sft"] is None
    wins = on_disk["win_rate"]
    assert set(wins) == {"sft_vs_base", "base_vs_sft"}
    assert wins["sft_vs_base"]["greedy"] + wins["base_vs_sft"]["greedy"] == pytest.approx(1.0)

    assert "| metric | base | sft |" in (out / "report.md").read_text()
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and set(rows[0]["responses"]["sft"]) == {"greedy", "sample"}
    for png in ("categories_greedy.png", "categories_sample.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parent"]["stage"] == "rm"  # the run's newest artifact pins the chain


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def test_eval_on_prompts_outside_the_world_compares_the_stages_with_the_rm(chain):
    """`make eval ARGS="data.eval_prompts=[<a file not from the world>]"`: text prompts and
    conversations with a system turn; no gold judge, the RM judges."""
    prompts = FIXTURES / "own_prompts.jsonl"
    report = eval_stage.run(compose_config("eval", QUIET + [f"data.eval_prompts=[{prompts}]"]))
    out = chain / "artifacts" / "default" / "eval"
    assert report["judge"] == "rm" and report["num_prompts"] == 4
    assert report["win_rate"] is None and report["categories"] is None
    wins = report["rm_win_rate"]["sft_vs_base"]
    assert set(wins) == {"greedy", "sample"} and all(0.0 <= v <= 1.0 for v in wins.values())
    for stage in ("base", "sft"):
        cell = report["stages"][stage]["sample"]
        assert cell["gold_score"] is None and isinstance(cell["rm_score"], float)
        assert cell["response_tokens"] > 0 and 0.0 <= cell["eos_rate"] <= 1.0 and cell["corpus_nll"] > 0
    md = (out / "report.md").read_text()
    assert "Judged by the run's reward model" in md and "## Win rates (reward model" in md
    assert (out / "rm_scores_sample.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert rows[1]["prompt"][0]["role"] == "system" and rows[1]["category"] is None


def test_eval_outside_the_world_without_an_rm_says_to_run_make_rm(base_run):
    prompts = FIXTURES / "own_prompts.jsonl"
    with pytest.raises(PipelineError, match="run `make rm` first"):
        eval_stage.run(compose_config("eval", QUIET + [f"data.eval_prompts=[{prompts}]"]))


@pytest.fixture
def base_run(world_root, tmp_path, monkeypatch):
    """The session's data and base, built in another root: copy_root re-points the recorded
    paths, so the base's config is again exactly what this root composes."""
    root = copy_root(world_root, tmp_path / "root")
    monkeypatch.setenv("RLHF_ROOT", str(root))
    return root


def check_pipeline_skips(stage: str, overrides: list[str], capsys) -> None:
    # The overrides the artifact was built with: the composed config equals the recorded one.
    user = overrides + QUIET + ["max_prompts=8"]
    cfg = compose_config("pipeline", [f"stages=[{stage},eval]"])
    assert pipeline.run(cfg, user) == {stage: "skipped", "eval": "ran"}
    assert f"skip {stage}: up to date" in capsys.readouterr().out
    # Nothing changed since: eval is up to date too, and the table is still printed.
    assert pipeline.run(cfg, user) == {stage: "skipped", "eval": "skipped"}
    assert "| metric | base |" in capsys.readouterr().out
    # Another setting for a stage reruns it, and eval after it.
    assert pipeline.run(cfg, user + ["seed=1"]) == {stage: "ran", "eval": "ran"}


def test_pipeline_skips_a_built_base(base_run, capsys):
    check_pipeline_skips("base", TINY_BASE, capsys)


def test_pipeline_skips_a_built_sft_with_its_base_parent(chain, capsys):
    # When sft reruns (seed=1), the chain's rm no longer fits it: eval says so and skips rm_score.
    check_pipeline_skips("sft", TINY_SFT, capsys)


def test_eval_skips_a_stage_built_on_an_older_parent_and_says_why(chain, capsys):
    """After `make sft` is rerun, a DPO/RL artifact built on the old SFT no longer fits: eval
    reports the rest and names the stale stage and its fix, instead of failing at the end."""
    import shutil

    from pipeline.core.artifacts import find_parent, staged_artifact
    run = chain / "artifacts" / "default"
    sft = find_parent(run, "sft")
    with staged_artifact(run, "dpo", {}, parent=sft) as art:  # a DPO policy built on this SFT ...
        shutil.copytree(sft.path / "adapter", art.dir / "policy")
    manifest = json.loads((run / "dpo" / "manifest.json").read_text())
    manifest["parent"]["checksum"] = "an older sft"  # ... which was rebuilt since
    (run / "dpo" / "manifest.json").write_text(json.dumps(manifest))
    report = eval_stage.run(compose_config("eval", QUIET + ["max_prompts=8"]))
    assert set(report["stages"]) == {"base", "sft"}
    assert "was not built on the `sft` artifact" in report["skipped"]["dpo"]
    assert "eval: skip dpo:" in capsys.readouterr().out


def test_the_report_depends_on_the_most_recently_built_stage(tmp_path):
    """Rebuilding any one stage (rloo after ppo, say) makes the report stale for `make pipeline`."""
    import time

    from pipeline.core.artifacts import staged_artifact
    from stages.eval import eval_parent

    def build(stage):
        with staged_artifact(tmp_path, stage, {"k": 1}) as art:
            (art.dir / "policy").mkdir()
        time.sleep(1.1)  # manifests record the finish time to the second

    for stage in ("sft", "rloo", "ppo"):
        build(stage)
    assert eval_parent(str(tmp_path)).stage == "ppo"
    build("rloo")
    assert eval_parent(str(tmp_path)).stage == "rloo"
