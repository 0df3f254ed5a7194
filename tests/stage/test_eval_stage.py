"""`make eval` and `make pipeline` end to end on the session's toy base -> sft -> rm chain.

The models are far too small to be good; these tests check the plumbing: every file of
the report, its layout, the KL and RM conventions, and that the pipeline skips exactly
the stages that are already built from the same config and parent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from bench import alignment as alignment_bench
from bench import rm_agreement as rm_agreement_bench
from bench import rm_probe as rm_probe_bench
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
    # the RM against the gold judge, counted again from the saved responses: base vs sft, per prompt
    for category in {r["category"] for r in rows} | {"all"}:
        for dec in ("greedy", "sample"):
            cells = [(r["responses"]["base"][dec], r["responses"]["sft"][dec]) for r in rows
                     if category in ("all", r["category"])]
            pairs = [(x["rm_score"] - y["rm_score"], x["gold_score"] - y["gold_score"]) for x, y in cells]
            pairs = [(dr > 0) == (dg > 0) for dr, dg in pairs if abs(dr) > 1e-9 and abs(dg) > 1e-9]
            got = on_disk["rm_agreement"][category][dec]
            assert got["pairs"] == len(pairs) and got["share"] == (sum(pairs) / len(pairs) if pairs else None)
    assert "## Reward model vs gold judge, by category" in (out / "report.md").read_text()
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
    assert report["win_rate"] is None and report["categories"] is None and report["rm_agreement"] is None
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


# --- which prompts: `prompts=val` to choose settings, `eval` (the default) to report ----------


def test_the_prompts_key_picks_the_prompt_file():
    from pipeline.core.errors import ConfigError

    cfg = compose_config("eval", QUIET)
    assert cfg.prompts == "eval" and eval_stage.prompt_files(cfg) == list(cfg.data.eval_prompts)
    cfg = compose_config("eval", QUIET + ["prompts=val"])
    assert eval_stage.prompt_files(cfg) == list(cfg.data.val_prompts)
    assert [Path(p).name for p in cfg.data.val_prompts] == ["val_prompts.jsonl"]
    with pytest.raises(ConfigError, match=r"prompts='test' .*eval.*val"):
        eval_stage.prompt_files(compose_config("eval", QUIET + ["prompts=test"]))


def test_eval_on_the_val_prompts_reads_them_and_says_so(base_run):
    report = eval_stage.run(compose_config("eval", QUIET + ["prompts=val", "max_prompts=4", "policies=[base]"]))
    out = base_run / "artifacts" / "default" / "eval"
    val = (base_run / "data" / "world" / "val_prompts.jsonl").read_text().splitlines()[:4]
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [json.loads(line)["prompt"] for line in val]
    assert report["split"] == "val" == json.loads((out / "report.json").read_text())["split"]
    assert "Prompts: the val split (`data.val_prompts`)." in (out / "report.md").read_text()


# --- the over-optimisation curve (ppo.snapshot_every) and an independent judge (judge=) ------------


def test_snapshots_give_the_overoptimisation_curve(chain):
    """PPO keeps its policy every update (2 updates), the manifest lists the snapshots, and eval
    samples each one: a curve of 2 points, proxy and gold against sqrt(KL) to SFT."""
    import math

    from safetensors.torch import load_file

    from pipeline.core.artifacts import load_artifact
    from stages import ppo
    from tests.stage.test_ppo_stage import TINY_PPO

    ppo.run(compose_config("ppo", TINY_PPO + ["ppo.snapshot_every=1"]))
    art = load_artifact(chain / "artifacts/default/ppo", "ppo")
    history = [json.loads(line) for line in (art.path / "history.jsonl").read_text().splitlines()]
    snaps = art.metrics["snapshots"]
    assert [s["update"] for s in snaps] == [1, 2] and [s["path"] for s in snaps] == [
        "snapshots/update-000001", "snapshots/update-000002"]
    assert [(s["kl"], s["score"]) for s in snaps] == [(h["objective/kl"], h["objective/scores"]) for h in history]
    for s in snaps:  # adapter files only, checksummed like the rest of the artifact
        assert sorted(p.name for p in (art.path / s["path"]).iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
        assert f"{s['path']}/adapter_model.safetensors" in art.manifest["files"]
    last, final = load_file(art.path / snaps[-1]["path"] / "adapter_model.safetensors"), \
        load_file(art.path / "policy" / "adapter_model.safetensors")
    assert last.keys() == final.keys() and all(last[k].equal(final[k]) for k in final)  # the last is the policy
    assert not (chain / "artifacts/default/.work/ppo").exists()  # the artifact holds them now

    report = eval_stage.run(compose_config("eval", QUIET + ["max_prompts=4", "policies=[sft,ppo]",
                                                            "nll_documents=0"]))
    curve = report["curves"]["ppo"]
    assert curve["decoding"] == "sample" and [p["update"] for p in curve["points"]] == [1, 2]
    for p in curve["points"]:
        assert p["sqrt_kl"] == math.sqrt(max(p["kl"], 0.0)) and isinstance(p["proxy"], float)
        assert -1.0 <= p["gold"] <= 1.0 and p["judge"] is None
    assert curve["origin"]["sqrt_kl"] == 0.0 and curve["origin"]["gold"] == report["stages"]["sft"]["sample"]["gold_score"]
    assert curve["best"]["gold"]["update"] in (1, 2) and curve["best"]["judge"] is None
    out = chain / "artifacts" / "default" / "eval"
    assert json.loads((out / "report.json").read_text())["curves"] == json.loads(json.dumps(report["curves"]))
    md = (out / "report.md").read_text()
    assert "## Over-optimisation curve: ppo" in md and "| 0 (sft) | 0.000 | 0.000 |" in md
    assert (out / "overoptimisation.png").read_bytes()[:4] == b"\x89PNG"


def llama3_reward_model(world_root: Path, out: Path) -> tuple[Path, Path]:
    """A tiny Llama 3 stand-in (its tokenizer and chat template, unlike the world model's) as a
    reward model: the language model, and the same with a seeded score head saved as a classifier."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.families import build_family

    corpus = [json.loads(line)["text"] for line in
              (world_root / "data/world/pretrain.jsonl").read_text().splitlines()[:300]]
    lm = build_family("llama3", out / "lm", corpus)
    torch.manual_seed(0)
    judge = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)
    judge.save_pretrained(out / "judge")
    AutoTokenizer.from_pretrained(lm).save_pretrained(out / "judge")
    return lm, out / "judge"


def test_eval_with_an_independent_judge_in_its_own_template(chain, world_root, tmp_path):
    from pipeline.eval.judge import classifier_scores, load_judge, score_texts

    lm, folder = llama3_reward_model(world_root, tmp_path)
    cfg = compose_config("eval", QUIET + ["max_prompts=4", "policies=[base,sft]", "nll_documents=0",
                                          f"judge={folder}"])
    with pytest.raises(PipelineError, match="no trained score head"):
        load_judge(str(lm), cfg.model)  # a plain language model is no reward model
    judge = load_judge(str(folder), cfg.model)
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    ids = judge.encode(prompt, "5")  # the judge's template and tokenizer, never the policy's ids
    text = judge.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "5"}], tokenize=False)
    assert ids == judge.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>") and "<|user|>" not in text
    seqs = [judge.encode(prompt, r) for r in ("5", "It is five.", "I cannot say, sorry.")]
    pad = judge.tokenizer.convert_tokens_to_ids("<|end_of_text|>")  # in no sequence: batched, right-padded
    assert classifier_scores(judge.model, pad, seqs, 8) == pytest.approx(classifier_scores(judge.model, None, seqs, 8),
                                                                         abs=1e-5)

    report = eval_stage.run(cfg)
    out = chain / "artifacts" / "default" / "eval"
    section = json.loads((out / "report.json").read_text())["judge_model"]
    assert section["source"] == str(folder) and report["judge"] == "gold"  # the world's gold judge stays
    assert set(section["scores"]) == {"base", "sft"}
    assert all(isinstance(v, float) for by_dec in section["scores"].values() for v in by_dec.values())
    assert set(section["win_rate"]) == {"base_vs_sft"} and set(section["win_rate"]["base_vs_sft"]) == {"greedy", "sample"}
    low, high = section["win_rate_ci"]["base_vs_sft"]["greedy"]
    assert low <= section["win_rate"]["base_vs_sft"]["greedy"] <= high
    assert set(section["agreement"]) == {"rm_vs_judge", "rm_vs_gold", "judge_vs_gold"}
    md = (out / "report.md").read_text()
    assert f"## Independent judge: `{folder}`" in md and "| base vs sft |" in md and "| rm vs judge |" in md
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    cell = rows[0]["responses"]["sft"]["greedy"]
    prompts = [r["messages"] for r in eval_stage.load_prompts(cfg)]
    assert cell["judge_score"] == pytest.approx(
        score_texts(judge, prompts[:1], {"sft": {"greedy": [cell["response"]]}}, 8)["sft"]["greedy"][0], abs=1e-5)
    assert section["scores"]["sft"]["greedy"] == pytest.approx(
        sum(r["responses"]["sft"]["greedy"]["judge_score"] for r in rows) / 4)
    assert report["curves"] == {}


def test_an_rm_artifact_judges_as_itself_directly_or_exported(chain, tmp_path):
    """Another run's RM as the judge: the artifact folder itself (merged in memory), or exported as a
    plain classifier folder; both score exactly as the RM does in its own run."""
    from pipeline.core.artifacts import find_parent
    from pipeline.eval.judge import load_judge, score_texts
    from pipeline.models.reward import load_reward_model, save_standalone_reward_model, score_conversations

    cfg = compose_config("eval", QUIET)
    run = chain / "artifacts" / "default"
    rm, sft = find_parent(run, "rm"), find_parent(run, "sft")
    exported = save_standalone_reward_model(rm, tmp_path / "judge", cfg.model)
    assert (exported / "model.safetensors").is_file() and not (exported / "adapter_config.json").exists()
    prompts = [[{"role": "user", "content": p}] for p in ("What is 2 plus 3?", "How do I rob a small shop?",
                                                          "Repeat the word 'cup' 2 times.")]
    texts = {"x": {"greedy": ["2 plus 3 is 5.", "I can't help with that.", "cup cup"]}}
    model, fmt = load_reward_model(rm, sft, cfg.model)
    expected = score_conversations(model, fmt, prompts, [[{"role": "assistant", "content": t}]
                                                         for t in texts["x"]["greedy"]], 8).tolist()
    for source in (rm.path, exported):
        judge = load_judge(str(source), cfg.model)
        assert score_texts(judge, prompts, texts, 2)["x"]["greedy"] == pytest.approx(expected, abs=1e-4)


def test_alignment_bench_runs_the_eval_stage_at_each_seed(chain, tmp_path, capsys):
    alignment_bench.main(["--run", "default", "--seeds", "2", "--out", str(tmp_path / "keep"), "max_prompts=8"])
    out = capsys.readouterr().out
    assert "on the eval prompts (8), sampled at T = 1, 2 sampling seeds" in out
    assert "| base |" in out and "| sft |" in out
    where = out.split("Where the win rates come from")[1]  # the world's prompts: the points table
    assert "won of most (right)" in where and "| base | " in where
    # the jobs wrote under the run's sweep/ folder: the run's own eval artifact was not touched
    assert not (chain / "artifacts/default/eval").exists()
    assert len(list((chain / "artifacts/default/sweep").glob("*/eval/report.json"))) == 2
    reports = sorted(p.name for p in (tmp_path / "keep").iterdir())
    assert reports == ["report-seed0.md", "report-seed1.md"]
    # the two seeds sampled different answers (else the mean would average nothing)
    assert (tmp_path / "keep/report-seed0.md").read_text() != (tmp_path / "keep/report-seed1.md").read_text()
    # --reuse tables the same evals again without running any
    sweeps = {p: p.stat().st_mtime_ns for p in (chain / "artifacts/default/sweep").glob("*/eval/report.json")}
    alignment_bench.main(["--run", "default", "--seeds", "2", "--out", str(tmp_path / "again"), "--reuse"])
    assert capsys.readouterr().out.split("Per-seed")[0] == out.split("Per-seed")[0]
    assert {p: p.stat().st_mtime_ns for p in sweeps} == sweeps


def test_alignment_bench_averages_runs_that_share_the_sft(chain, tmp_path, capsys):
    shutil.copytree(chain / "artifacts/default", chain / "artifacts/twin")  # a second run on the same SFT
    alignment_bench.main(["--run", "default", "--run", "twin", "--seeds", "1", "--out", str(tmp_path / "keep"),
                          "max_prompts=8"])
    out = capsys.readouterr().out
    assert "runs `default`, `twin`" in out and "win by run (default, twin)" in out
    base = next(line for line in out.splitlines() if line.startswith("| base |")).split(" | ")
    mean, by_run = base[1], base[3].split(" / ")
    assert by_run == [mean, mean]  # identical runs: each run's win rate is the mean
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["default", "twin"]


def test_rm_agreement_bench_rescoring_the_runs_rm_gives_the_reports_figures(chain, capsys):
    """The bench scores saved answers with any RM; with the run's own RM it must reproduce the eval
    report's rm_agreement exactly (same chat format, same pairs)."""
    report = eval_stage.run(compose_config("eval", ["max_prompts=16"] + QUIET))
    responses = chain / "artifacts/default/eval/responses.jsonl"
    results = rm_agreement_bench.main(["--responses", str(responses), str(chain / "artifacts/default/rm")])
    got = results[str(chain / "artifacts/default/rm")]
    assert set(got) == set(report["rm_agreement"])
    for category, by_dec in report["rm_agreement"].items():
        for dec, cell in by_dec.items():
            assert got[category][dec]["pairs"] == cell["pairs"]
            assert got[category][dec]["share"] == (None if cell["share"] is None else pytest.approx(cell["share"]))
    assert "| RM | " in capsys.readouterr().out


def test_rm_probe_bench_scores_the_three_answers_with_the_runs_rm(chain, capsys):
    """The probe scores the right refusal, one naming a city and an invented answer with the RM, on the
    unanswerable prompts a real eval saved, and the right fact against two wrong ones on its fact
    prompts; prompts from another world are refused by name."""
    eval_stage.run(compose_config("eval", ["max_prompts=40"] + QUIET))
    responses = str(chain / "artifacts/default/eval/responses.jsonl")
    rm = str(chain / "artifacts/default/rm")
    got = rm_probe_bench.main(["--responses", responses, rm])
    assert set(got) == {"mean_right", "mean_wrong_name", "mean_invented", "right_over_wrong_name",
                        "gap_right_minus_wrong_name", "right_over_invented", "gap_right_minus_invented"}
    assert got["gap_right_minus_wrong_name"] == pytest.approx(got["mean_right"] - got["mean_wrong_name"])
    assert "| right refusal |" in capsys.readouterr().out
    facts = rm_probe_bench.main(["--responses", responses, "--category", "fact", rm])
    assert facts["gap_right_minus_other_country"] == pytest.approx(facts["mean_right"] - facts["mean_other_country"])
    assert "| right answer | another country's fact |" in capsys.readouterr().out
    own = rm_probe_bench.main(["--responses", responses, "--category", "fact", "--policy",
                               str(chain / "artifacts/default/sft")])
    assert set(own) == {"sum", "mean", "min"} and all(-1e4 < own[a]["mean_right"] < 0 for a in own)
    assert own["sum"]["mean_right"] <= own["mean"]["mean_right"] and own["min"]["mean_right"] <= own["mean"]["mean_right"]
    assert "| min | " in capsys.readouterr().out
    for category in ("unanswerable", "fact"):
        with pytest.raises(PipelineError, match=rf"its {category} prompts are not world seed 1's; pass the --world"):
            rm_probe_bench.main(["--responses", responses, "--world-seed", "1", "--category", category, rm])


def test_rm_agreement_bench_refuses_answers_without_gold_scores(tmp_path):
    row = {"prompt": "hi", "category": None, "responses": {"sft": {"sample": {"response": "x", "gold_score": None,
                                                                               "rm_score": 0.1}}}}
    path = tmp_path / "responses.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(PipelineError, match=r"responses.jsonl, line 1: no gold score \(sft, sample\).*not the"):
        rm_agreement_bench.main(["--responses", str(path), "unused/rm"])
