"""Public sets by name and the experiments that fit a card, end to end on tiny family stand-ins.

Every experiment (conf/experiment/) runs through `make pipeline`'s own entry point, sft -> rm -> dpo ->
ppo -> eval, its data preset pointed at the local copies in tests/fixtures/hub/ (the hub's field
names, nesting and split names) by one override per set, and shrunk to a step or two. The tldr and
alpaca presets run every stage the same way. HH-RLHF's bad rows, as the release has them, are
skipped and counted in each stage's metrics."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.core.artifacts import load_artifact
from stages import pipeline
from tests.conftest import compose_config
from tests.families import build_family
from tests.unit.data.test_presets import LOCAL

pytestmark = pytest.mark.stage

ALL = ["sft", "rm", "dpo", "ppo", "eval"]
# The experiments' sizes are for a GPU; these shrink them to a step on a one-layer model (the command
# line comes after the experiment, so it wins).
TINY = ["logger=none", "train.max_steps=1", "train.eval_steps=0", "train.save_steps=1", "train.logging_steps=1",
        "train.per_device_train_batch_size=4", "train.per_device_eval_batch_size=8",
        "train.gradient_accumulation_steps=1", "train.max_length=512", "samples.num_prompts=2",
        "samples.batch_size=2", "samples.decoding.max_new_tokens=4", "score_batch_size=8",
        "reward.min_accuracy=0", "ppo.rollout_batch_size=8", "ppo.generation_batch_size=8", "ppo.minibatch_size=8",
        "ppo.micro_batch_size=4", "ppo.max_new_tokens=6", "ppo.warmup_steps=0", "max_prompts=2", "batch_size=8",
        "decodings.greedy.max_new_tokens=4", "decodings.sample.max_new_tokens=4"]
SKIPPED_HH = {"data/skipped_empty_turn": 2, "data/skipped_identical_pair": 1, "data/merged_turns": 1}


@pytest.fixture(scope="module")
def stand_ins(world_root, tmp_path_factory):
    corpus = [json.loads(line)["text"] for line in
              (world_root / "data/world/pretrain.jsonl").read_text().splitlines()[:300]]
    root = tmp_path_factory.mktemp("stand_ins")
    return {f: str(build_family(f, root / f, corpus)) for f in ("qwen2.5", "llama3")}


@pytest.fixture
def hub_run(world_root, tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    os.symlink(world_root / "data" / "world", root / "data" / "world")  # data.pretrain stays the world's
    monkeypatch.setenv("RLHF_ROOT", str(root))
    return root


def data_metrics(run, stage):
    metrics = load_artifact(run / stage, stage).metrics
    return {k: metrics[k] for k in SKIPPED_HH}


def test_qwen_on_hh_rlhf_then_its_grpo_variant_in_the_same_run(stand_ins, hub_run):
    model = [f"model.path={stand_ins['qwen2.5']}"]
    out = pipeline.launch(["+experiment=qwen_hh"] + model + LOCAL["hh_rlhf"] + TINY + ["ppo.total_updates=2"])
    assert out == {stage: "ran" for stage in ALL}
    run = hub_run / "artifacts" / "qwen_hh"
    for stage in ("rm", "dpo"):  # the pairs: an empty answer in each split, chosen == rejected, a merged turn
        assert data_metrics(run, stage) == SKIPPED_HH
    assert data_metrics(run, "sft")["data/skipped_empty_turn"] == 1  # test's empty chosen answer
    assert load_artifact(run / "ppo", "ppo").metrics["updates"] == 2
    sft = load_artifact(run / "sft", "sft").manifest["config"]
    assert sft["model"]["name"] == "qwen2.5-0.5b-instruct" and sft["data"]["name"] == "hh_rlhf"
    assert sft["train"]["learning_rate"] == 1.0e-4  # the experiment's, under the command line's

    # GRPO: the same run, so sft, rm and dpo are up to date; eval then compares ppo and grpo
    out = pipeline.launch(["+experiment=qwen_hh_grpo"] + model + LOCAL["hh_rlhf"] + TINY + ["ppo.total_updates=1"])
    assert out == {"sft": "skipped", "rm": "skipped", "dpo": "skipped", "ppo": "ran", "eval": "ran"}
    grpo = load_artifact(run / "grpo", "grpo")
    assert grpo.manifest["config"]["algorithm"]["samples_per_prompt"] == 4 and grpo.metrics["updates"] == 1
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["stages"]) == {"base", "sft", "dpo", "ppo", "grpo"} and report["judge"] == "rm"


@pytest.mark.parametrize("experiment", ["llama3_uf_24gb", "llama3_uf_24gb_4bit"])
def test_llama3_on_ultrafeedback_runs_one_step(experiment, stand_ins, hub_run):
    composed = pipeline.compose_all(ALL, [f"+experiment={experiment}"])
    four_bit = experiment.endswith("4bit")
    assert composed["ppo"].model.load_in_4bit is four_bit and composed["sft"].train.gradient_checkpointing
    assert composed["ppo"].ppo.gradient_checkpointing and composed["ppo"].model.dtype == "bfloat16"
    cpu = ["model.load_in_4bit=false"] if four_bit else []  # 4-bit needs CUDA: the rest of the recipe runs
    out = pipeline.launch([f"+experiment={experiment}", f"model.path={stand_ins['llama3']}", "ppo.total_updates=1"]
                          + LOCAL["ultrafeedback"] + TINY + cpu)
    assert out == {stage: "ran" for stage in ALL}
    run = hub_run / "artifacts" / composed["sft"].run_name
    assert load_artifact(run / "rm", "rm").metrics["data/skipped_empty_turn"] == 1  # an empty rejected answer
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["stages"]) == {"base", "sft", "dpo", "ppo"} and report["num_prompts"] == 2


@pytest.mark.parametrize("preset", ["tldr", "alpaca"])
def test_the_tldr_and_alpaca_presets_run_every_stage(preset, stand_ins, hub_run):
    setup = [f"data={preset}", "model=qwen2", f"model.path={stand_ins['qwen2.5']}", f"run_name={preset}",
             f"stages=[{','.join(ALL)}]", "ppo.total_updates=2"]
    assert pipeline.launch(setup + LOCAL[preset] + TINY) == {stage: "ran" for stage in ALL}
    run = hub_run / "artifacts" / preset
    sft = load_artifact(run / "sft", "sft").manifest["config"]["data"]
    assert sft["sft"]["train"][0].endswith(f"{preset}:train[:1000]")
    assert load_artifact(run / "ppo", "ppo").metrics["updates"] == 2
    assert json.loads((run / "eval" / "report.json").read_text())["judge"] == "rm"
    if preset == "alpaca":  # Alpaca has no pairs: the RM, DPO and RL read HH-RLHF, as shipped
        assert data_metrics(run, "rm") == SKIPPED_HH
    assert compose_config("sft", [f"data={preset}"]).data.name == preset
