"""Public sets by name (conf/data/hh_rlhf, ultrafeedback, tldr, alpaca): a source's split and row range,
local folders laid out like the hub's splits, the public layouts each stage reads, and the experiments
(conf/experiment/) as the overrides each stage gets."""

import json
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.bad_rows import DataReport
from pipeline.data.layouts import load_validated, preference_rows, prompt_row, sft_row
from pipeline.data.sources import parse_source, read_rows
from tests.conftest import compose_config

pytestmark = pytest.mark.unit

HUB = Path(__file__).resolve().parents[2] / "fixtures" / "hub"
# Each preset pointed at its local copy (tests/fixtures/hub/<name>/<split>.jsonl), one override per set.
LOCAL = {
    "hh_rlhf": [f"data.hub.hh_rlhf={HUB}/hh_rlhf"],
    "ultrafeedback": [f"data.hub.ultrafeedback={HUB}/ultrafeedback"],
    "tldr": [f"data.hub.tldr={HUB}/tldr", f"data.hub.tldr_preference={HUB}/tldr_preference"],
    "alpaca": [f"data.hub.alpaca={HUB}/alpaca", f"data.hub.hh_rlhf={HUB}/hh_rlhf"],
}
USER = {"role": "user", "content": "What is 2 plus 3?"}
ANSWER = {"role": "assistant", "content": "2 plus 3 is 5."}


# --- sources: <where>[:<split>][[start:stop]] -----------------------------------------------------


@pytest.mark.parametrize("source, where, split, rows", [
    ("data/world/sft_train.jsonl", "data/world/sft_train.jsonl", None, slice(None)),
    ("Anthropic/hh-rlhf:test", "Anthropic/hh-rlhf", "test", slice(None)),
    ("HuggingFaceH4/ultrafeedback_binarized:train_prefs[:2000]", "HuggingFaceH4/ultrafeedback_binarized",
     "train_prefs", slice(None, 2000)),
    ("a/b:train[:None]", "a/b", "train", slice(None)),  # data.max_rows=null interpolated
    ("tatsu-lab/alpaca:train[-200:]", "tatsu-lab/alpaca", "train", slice(-200, None)),
    ("data/x.jsonl[:5]", "data/x.jsonl", None, slice(None, 5)),
    ("./my:dir/f.jsonl", "./my:dir/f.jsonl", None, slice(None)),  # a ':' before a '/' is part of the path
])
def test_a_source_names_where_its_split_and_its_rows(source, where, split, rows):
    s = parse_source(source)
    assert (s.where, s.split, s.rows) == (where, split, rows)


def test_a_folder_is_read_by_split_and_a_row_range_keeps_each_rows_line_number():
    rows, name, label = read_rows(f"{HUB}/hh_rlhf:test[2:4]", "train")
    every = [json.loads(line) for line in (HUB / "hh_rlhf" / "test.jsonl").read_text().splitlines()]
    assert rows == every[2:4] and name == f"{HUB}/hh_rlhf/test.jsonl"
    assert [label(0), label(1)] == ["line 3", "line 4"]
    assert len(read_rows(f"{HUB}/hh_rlhf[:None]", "train")[0]) == 15  # no split: data.hub_split
    assert len(read_rows(f"{HUB}/hh_rlhf:train[-2:]", "x")[0]) == 2


def test_a_wrong_split_or_a_split_of_a_file_says_what_there_is():
    with pytest.raises(PipelineError, match=r"has no split 'validation'.*its splits: test, train"):
        read_rows(f"{HUB}/hh_rlhf:validation", "train")
    with pytest.raises(PipelineError, match="a file has no splits"):
        read_rows(f"{HUB}/hh_rlhf/train.jsonl:train", "train")
    with pytest.raises(PipelineError, match=r"hub/hh_rlhf_copy is not there; give a .*file, a folder"):
        read_rows(f"{HUB}/hh_rlhf_copy:train", "train")  # a path, not an owner/name hub id
    with pytest.raises(PipelineError, match=r"is not a \.json/\.jsonl/\.parquet file"):
        read_rows(f"{HUB}/README.md", "train")


def test_a_hub_id_is_loaded_with_its_own_split_and_only_the_rows_asked_for(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"i": i} for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, name, label = read_rows("owner/set:train_prefs[:3]", "train")
    assert calls == [("owner/set", "train_prefs")] and rows == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert name == "hub dataset owner/set:train_prefs" and label(2) == "row 2"
    rows, _, label = read_rows("owner/set[-2:]", "test")  # no split: data.hub_split
    assert calls[-1] == ("owner/set", "test") and rows == [{"i": 8}, {"i": 9}] and label(0) == "row 8"


# --- the public layouts each stage reads --------------------------------------------------------


def test_sft_reads_a_preference_rows_chosen_conversation():
    hh = {"chosen": "\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.",
          "rejected": "\n\nHuman: What is 2 plus 3?\n\nAssistant: 7."}
    assert sft_row(hh) == [{"messages": [USER, ANSWER]}]
    tldr = {"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "7."}
    assert sft_row(tldr) == [{"messages": [USER, ANSWER]}]
    uf = {"prompt": "What is 2 plus 3?", "chosen": [USER, ANSWER], "rejected": [USER, {**ANSWER, "content": "7."}],
          "messages": [USER, ANSWER]}
    assert sft_row(uf) == [{"messages": [USER, ANSWER]}]  # `messages` first: UltraFeedback's train_sft


def test_a_prompt_is_the_hh_conversation_up_to_its_last_human_turn_whatever_followed():
    long = ("\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: What is 2 plus 3?\n\nAssistant: 5.")
    (row,) = prompt_row({"chosen": long, "rejected": long[:-2] + "7."})
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}, USER]
    assert row["messages"] == turns and row["prompt"] == turns
    # as shipped: an empty final answer does not make the prompt bad
    assert prompt_row({"chosen": "\n\nHuman: What is 2 plus 3?\n\nAssistant:"})[0]["messages"] == [USER]
    assert prompt_row({"chosen": [USER, ANSWER]})[0]["messages"] == [USER]  # TRL's implicit-prompt pairs


# --- presets: every stage's sources, read from the local copies ---------------------------------

STAGE_READS = {  # what each stage loads, with the normaliser it uses
    "sft": [("sft.train", sft_row), ("sft.eval", sft_row), ("eval_prompts", prompt_row)],
    "rm": [("prefs.train", preference_rows), ("prefs.eval", preference_rows)],
    "dpo": [("prefs.train", preference_rows), ("prefs.eval", preference_rows)],
    "ppo": [("ppo_prompts", prompt_row)],
    "eval": [("eval_prompts", prompt_row), ("val_prompts", prompt_row)],
}
# (rows kept, data/skipped_* and merged counts) per source key, from the fixtures as written
EXPECTED = {
    "hh_rlhf": {"sft.train": 15, "sft.eval": 7, "prefs.train": 13, "prefs.eval": 7, "ppo_prompts": 15,
                "eval_prompts": 8, "val_prompts": 8},
    "ultrafeedback": {"sft.train": 8, "sft.eval": 3, "prefs.train": 8, "prefs.eval": 4, "ppo_prompts": 8,
                      "eval_prompts": 4, "val_prompts": 4},
    "tldr": {"sft.train": 8, "sft.eval": 2, "prefs.train": 8, "prefs.eval": 4, "ppo_prompts": 8,
             "eval_prompts": 2, "val_prompts": 2},
    "alpaca": {"sft.train": 10, "sft.eval": 10, "prefs.train": 13, "prefs.eval": 7, "ppo_prompts": 15,
               "eval_prompts": 8, "val_prompts": 8},
}


@pytest.mark.parametrize("preset", sorted(LOCAL))
def test_each_preset_reads_every_stages_data_from_a_local_copy_in_the_hubs_layout(preset):
    for stage, reads in STAGE_READS.items():
        data = compose_config(stage, [f"data={preset}"] + LOCAL[preset]).data
        assert data.name == preset
        for key, normalise in reads:
            sources = data
            for part in key.split("."):
                sources = sources[part]
            rows = load_validated(sources, data.hub_split, normalise, data.columns, data.bad_rows)
            assert len(rows) == EXPECTED[preset][key], (stage, key)


def test_each_preset_names_its_hub_ids_splits_and_a_row_limit():
    data = compose_config("ppo", ["data=ultrafeedback"]).data
    assert data.prefs.train == ["HuggingFaceH4/ultrafeedback_binarized:train_prefs[:500]"]
    assert data.ppo_prompts == ["HuggingFaceH4/ultrafeedback_binarized:train_gen[:500]"]
    assert compose_config("sft", ["data=hh_rlhf", "data.max_rows=null"]).data.sft.train == ["Anthropic/hh-rlhf:train[:None]"]
    tldr = compose_config("rm", ["data=tldr"]).data
    assert tldr.prefs.eval == ["trl-lib/tldr-preference:validation[:1000]"] and tldr.sft.train == ["trl-lib/tldr:train[:1000]"]
    alpaca = compose_config("sft", ["data=alpaca"]).data
    assert alpaca.sft.train == ["tatsu-lab/alpaca:train[:1000]"] and alpaca.prefs.train == ["Anthropic/hh-rlhf:train[:1000]"]
    world = compose_config("sft").data
    assert world.hub == {} and world.max_rows is None and world.sft.train[0].endswith("sft_train.jsonl")


def test_hh_rlhf_as_it_ships_skips_and_counts_its_bad_rows_or_stops_at_the_first():
    data = compose_config("rm", ["data=hh_rlhf"] + LOCAL["hh_rlhf"]).data
    report = DataReport()
    load_validated(data.prefs.train, data.hub_split, preference_rows, data.columns, "skip", report)
    assert report.metrics() == {"data/skipped_empty_turn": 1, "data/skipped_identical_pair": 1,
                                "data/skipped_template_refused": 0, "data/skipped_malformed": 0,
                                "data/merged_turns": 1}
    with pytest.raises(PipelineError, match=r"hh_rlhf/train.jsonl, line 4: field `rejected` turn 1 \(Assistant\) is empty"):
        load_validated(data.prefs.train, data.hub_split, preference_rows, data.columns, "error")


# --- experiments: the overrides each stage gets -------------------------------------------------


def test_an_experiment_is_its_group_choices_and_settings_and_the_command_line_wins():
    from stages.pipeline import compose_all, expand_experiments, hydra_value

    overrides, settings, choices = expand_experiments(["logger=none", "+experiment=qwen_hh_grpo", "ppo.micro_batch_size=2"])
    assert overrides[:4] == ["logger=none", "data=hh_rlhf", "model=qwen2", "algorithm=grpo"]
    assert choices == {"data=hh_rlhf", "model=qwen2", "algorithm=grpo"}
    assert "ppo.micro_batch_size=8" in settings and "decodings.greedy.max_new_tokens=256" in settings
    assert "stages=['sft','rm','dpo','ppo','eval']" in settings
    assert [hydra_value(v) for v in (None, True, 1.0e-4, "it's ${x}", [1, "a"], {})] == [
        "null", "true", "0.0001", "'it\\'s ${x}'", "[1,'a']", "{}"]
    cfg = compose_all(["sft", "ppo"], ["+experiment=qwen_hh_grpo", "ppo.micro_batch_size=2"])
    assert cfg["ppo"].ppo.micro_batch_size == 2 and cfg["ppo"].algorithm.name == "grpo"  # the command line wins
    assert cfg["sft"].train.per_device_train_batch_size == 8 and cfg["sft"].data.name == "hh_rlhf"
    assert "ppo" not in cfg["sft"] and cfg["sft"].run_name == "qwen_hh"


def test_an_experiment_key_no_stage_has_is_refused(tmp_path, monkeypatch):
    import shutil

    from stages import pipeline

    conf = shutil.copytree(pipeline.CONF_DIR, tmp_path / "conf")
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nppo:\n  micro_batch_sise: 4\n")
    monkeypatch.setattr(pipeline, "CONF_DIR", conf)
    with pytest.raises(PipelineError, match=r"no stage config has the key of the experiment's \['ppo.micro_batch_sise=4'\]"):
        pipeline.compose_all(["sft"], ["+experiment=typo"])
    with pytest.raises(PipelineError, match=r"no .*experiment/nope.yaml; the experiments are \[.*'qwen_hh'"):
        pipeline.compose_all(["sft"], ["+experiment=nope"])
