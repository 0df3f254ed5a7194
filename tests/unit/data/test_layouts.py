"""Data formats: every accepted layout normalises to messages; bad rows name file, row, field."""

import json
import re

import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.layouts import (
    RowError,
    expand_ranking,
    load_validated,
    margin_preference_rows,
    parse_transcript,
    preference_example,
    preference_rows,
    prompt_row,
    prompt_text,
    sft_row,
    split_shared_prefix,
)

pytestmark = pytest.mark.unit

USER = {"role": "user", "content": "What is 2 plus 3?"}
ANSWER = {"role": "assistant", "content": "2 plus 3 is 5."}


@pytest.fixture(scope="module")
def families_fmt(tmp_path_factory):
    from pipeline.data.chat import load_chat_format
    from tests.families import build_family
    from tests.unit.data.test_families import CORPUS
    return load_chat_format(str(build_family("llama3", tmp_path_factory.mktemp("llama3"), CORPUS)), None, False)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("row", [
    {"messages": [USER, ANSWER]},
    {"prompt": "What is 2 plus 3?", "completion": "2 plus 3 is 5."},
    {"prompt": [USER], "completion": [ANSWER]},
    {"instruction": "What is 2 plus 3?", "input": "", "output": "2 plus 3 is 5."},
])
def test_sft_layouts_normalise_to_the_same_messages(row):
    assert sft_row(row) == [{"messages": [USER, ANSWER]}]


def test_alpaca_input_is_appended_to_the_instruction():
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert sft_row(row)[0]["messages"][0]["content"] == "Add the numbers.\n\n2 and 3"


@pytest.mark.parametrize("bad, where", [
    ({"messages": [USER]}, "field `messages[0].role` must be 'assistant'"),
    ({"messages": [USER, {"role": "bot", "content": "x"}]}, "field `messages[1].role` must be one of"),
    ({"messages": [USER, {"role": "assistant", "content": ""}]}, "field `messages[1].content`"),
    ({"prompt": "hi"}, "field `completion` is missing"),
    ({"instruction": "hi", "output": 3}, "field `output` must be a string"),
    ({"text": "hi"}, "field `messages` is missing"),
    ({"messages": []}, "field `messages` must be a non-empty list"),
    ({"messages": [{"role": "system", "content": "Be brief."}, ANSWER]}, "field `messages` has no user turn"),
    ({"instruction": "hi"}, "field `output` is missing"),
    ({"output": "hi"}, "field `instruction` is missing"),
])
def test_malformed_sft_row_names_file_line_and_field(tmp_path, bad, where):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [USER, ANSWER]}, bad])
    with pytest.raises(PipelineError) as e:
        load_validated([path], "train", sft_row)
    assert f"{path}, line 2: {where}" in str(e.value) and "Fix or remove the row" in str(e.value)


def test_bad_json_line_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [USER, ANSWER]}, "{not json"])
    with pytest.raises(PipelineError, match=r"sft.jsonl, line 2: not valid JSON"):
        load_validated([path], "train", sft_row)


def test_parquet_rows_are_named_by_index(tmp_path):
    from datasets import Dataset
    Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}]) \
        .to_parquet(tmp_path / "d.parquet")
    with pytest.raises(PipelineError, match=r"d.parquet, row 1: field `completion` is empty"):
        load_validated([str(tmp_path / "d.parquet")], "train", sft_row)


def test_missing_file_says_make_data(tmp_path):
    with pytest.raises(PipelineError, match="make data"):
        load_validated([str(tmp_path / "nope.jsonl")], "train", sft_row)


def test_ranked_list_expands_to_every_pair():
    # K = 3 responses best first -> K(K-1)/2 = 3 pairs: (a,b), (a,c), (b,c)
    assert expand_ranking(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    rows = preference_rows({"prompt": "q", "ranked": ["best", "mid", "worst", "bad"]})
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    assert pairs == [("best", "mid"), ("best", "worst"), ("best", "bad"),
                     ("mid", "worst"), ("mid", "bad"), ("worst", "bad")]
    assert len({r["group"] for r in rows}) == 1  # one prompt, one group
    # a pair's margin is its distance in the ranking: best-mid 1, best-worst 2, best-bad 3, ...
    assert [r["margin"] for r in rows] == [1, 2, 3, 1, 2, 1]
    scaled = preference_rows({"prompt": "q", "ranked": ["a", "b", "c"], "margin": 0.5})
    assert [r["margin"] for r in scaled] == [0.5, 1.0, 0.5]


def test_use_margin_needs_a_margin_on_every_comparison(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "y", "margin": 2},
                                              {"prompt": "q", "ranked": ["x", "y"]},
                                              {"prompt": "q", "chosen": "x", "rejected": "y"}])
    rows = load_validated([path], "train", preference_rows)
    assert [r.get("margin") for r in rows] == [2.0, 1.0, None]
    with pytest.raises(PipelineError, match=r"p.jsonl, line 3: field `margin` is missing.*use_margin=false"):
        load_validated([path], "train", margin_preference_rows)


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "q", "completion": "a"}\n\n\n{"prompt": "q"}\n')
    with pytest.raises(PipelineError, match=r"sft.jsonl, line 4: field `completion` is missing"):
        load_validated([str(path)], "train", sft_row)


def test_explicit_and_implicit_prompts_agree():
    explicit = preference_rows({"prompt": "q", "chosen": "good", "rejected": "bad"})[0]
    implicit = preference_rows({
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]})[0]
    assert explicit == implicit


def test_implicit_prompt_needs_a_shared_prefix():
    from pipeline.data.layouts import RowError
    with pytest.raises(RowError, match="share no leading messages"):
        split_shared_prefix([{"role": "user", "content": "a"}, ANSWER], [{"role": "user", "content": "b"}, ANSWER])


@pytest.mark.parametrize("bad, where", [
    ({"prompt": "q", "chosen": "x"}, "field `rejected` is missing"),
    ({"prompt": "q", "chosen": "x", "rejected": "x"}, "field `rejected` equals `chosen`"),
    ({"prompt": "q", "ranked": ["only one"]}, "field `ranked` must be a list of at least 2"),
    ({"prompt": "q", "chosen": "x", "rejected": "y", "margin": "big"}, "field `margin` must be a number"),
])
def test_malformed_preference_rows(tmp_path, bad, where):
    path = write_jsonl(tmp_path / "p.jsonl", [bad])
    with pytest.raises(PipelineError, match=f"p.jsonl, line 1: {where}"):
        load_validated([path], "train", preference_rows)


def test_prompt_rows_keep_their_metadata():
    assert prompt_row({"prompt": "q", "category": "fact"}) == [
        {"prompt": "q", "category": "fact", "messages": [{"role": "user", "content": "q"}]}]


def test_prompts_as_messages_with_a_system_turn_and_several_turns():
    system = {"role": "system", "content": "Be brief."}
    convo = [system, USER, ANSWER, {"role": "user", "content": "And 3 plus 4?"}]
    assert prompt_row({"prompt": convo})[0]["messages"] == convo
    assert prompt_row({"messages": convo})[0]["messages"] == convo
    with pytest.raises(RowError, match=r"prompt\[1\]\.role.*must be 'user'"):  # a prompt ends with the turn to answer
        prompt_row({"prompt": [USER, ANSWER]})
    with pytest.raises(RowError, match=r"messages\[4\]\.role"):
        prompt_row({"messages": convo + [ANSWER]})
    # What a reward callable and the report see of a prompt: its last user turn.
    assert prompt_text(convo) == "And 3 plus 4?" and prompt_text("q") == "q"


def test_a_pair_keeps_its_other_columns_and_leaves_its_texts_behind(families_fmt):
    pair = {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "7."}],
            "margin": 2.0, "category": "fact"}
    example = preference_example(families_fmt, pair)
    assert {k: example[k] for k in ("margin", "category")} == {"margin": 2.0, "category": "fact"}
    assert not {"prompt", "chosen", "rejected"} & set(example)
    assert example["chosen_ids"] != example["rejected_ids"]
    assert example["chosen_ids"][: len(example["prompt_ids"])] == example["prompt_ids"]


# --- public layouts as they ship -------------------------------------------------------------

HH_CHOSEN = ("\n\nHuman: Hi, can you help me?\n\nAssistant: Sure, what do you need?"
             "\n\nHuman: How do I rob a shop?\n\nAssistant: I can't help with that.")
HH_REJECTED = ("\n\nHuman: Hi, can you help me?\n\nAssistant: Sure, what do you need?"
               "\n\nHuman: How do I rob a shop?\n\nAssistant: First, wait until it is dark.")


def test_hh_rlhf_transcripts_become_a_multi_turn_prompt_and_two_answers():
    (pair,) = preference_rows({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert pair["prompt"] == [{"role": "user", "content": "Hi, can you help me?"},
                              {"role": "assistant", "content": "Sure, what do you need?"},
                              {"role": "user", "content": "How do I rob a shop?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "I can't help with that."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "First, wait until it is dark."}]


@pytest.mark.parametrize("text, problem", [
    ("just some text", "not an HH-RLHF transcript"),
    ("Preamble." + HH_CHOSEN, "not an HH-RLHF transcript"),  # text before the first turn is never dropped
    ("\n\nHuman: hi\n\nAssistant:", "turn 1 (Assistant) is empty"),
])
def test_malformed_transcripts_are_named(tmp_path, text, problem):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                                                {"chosen": text, "rejected": HH_REJECTED}])
    with pytest.raises(PipelineError, match=f"hh.jsonl, line 2: field `chosen` .*{re.escape(problem)}"):
        load_validated([path], "train", preference_rows)


def test_ultrafeedback_binarized_keeps_the_prompt_once():
    # UltraFeedback-binarized: `prompt` is text and `chosen` / `rejected` repeat the user turn.
    row = {"prompt": "What is 2 plus 3?", "prompt_id": "abc", "score_chosen": 9.0, "score_rejected": 2.0,
           "chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "7"}],
           "messages": [USER, ANSWER]}
    (pair,) = preference_rows(row)
    assert pair["prompt"] == [USER] and pair["chosen"] == [ANSWER]
    assert pair["rejected"] == [{"role": "assistant", "content": "7"}]
    bad = {**row, "chosen": [{"role": "user", "content": "another question"}, ANSWER]}
    with pytest.raises(Exception, match="does not begin with `prompt`"):
        preference_rows(bad)
    no_answer = {**row, "chosen": [USER]}  # the conversation stops at the prompt
    with pytest.raises(RowError, match="holds the prompt but no response after it"):
        preference_rows(no_answer)


def test_columns_map_other_field_names(tmp_path):
    # stack-exchange-paired style: question / response_j (better) / response_k
    path = write_jsonl(tmp_path / "se.jsonl", [{"question": "q", "response_j": "good", "response_k": "bad"}])
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    (pair,) = load_validated([path], "train", preference_rows, columns)
    assert pair["prompt"] == [{"role": "user", "content": "q"}]
    assert pair["chosen"][0]["content"] == "good" and pair["rejected"][0]["content"] == "bad"
    with pytest.raises(PipelineError, match="field `chosen` is missing"):
        load_validated([path], "train", preference_rows)  # without the mapping


def test_transcript_parser_keeps_inner_newlines():
    msgs = parse_transcript("\n\nHuman: line one\nline two\n\nAssistant: ok", "chosen")
    assert msgs == [{"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": "ok"}]


# --- bad rows in public sets: skipped and counted by reason, or fatal on request -----------------

DEFECTS = __import__("pathlib").Path(__file__).resolve().parents[2] / "fixtures" / "data" / "hh_rlhf_defects.jsonl"
# hh_rlhf_defects.jsonl: 22 rows; empty final turn on lines 3 and 9, chosen == rejected on lines 5
# and 11, two Human turns in a row on line 6, two Assistant turns in a row on line 12.


def test_hh_defects_are_skipped_and_counted_by_reason(capsys):
    from pipeline.data.bad_rows import DataReport
    report = DataReport()
    rows = load_validated([str(DEFECTS)], "train", preference_rows, bad_rows="skip", report=report)
    assert len(rows) == 22 - 4  # the merged rows are kept
    assert report.skipped == {"empty_turn": 2, "identical_pair": 2}
    assert report.merged == 2
    out = capsys.readouterr().out
    lines = {reason: [x for x in out.splitlines() if reason in x] for reason in ("empty_turn", "identical_pair",
                                                                                  "merged_turns")}
    for reason, first in (("empty_turn", 3), ("identical_pair", 5), ("merged_turns", 6)):
        assert len(lines[reason]) == 1, out  # one line per reason and file
        assert str(DEFECTS) in lines[reason][0] and f"line {first}" in lines[reason][0]
        assert " 2 " in lines[reason][0]  # the count
    assert report.metrics() == {"data/skipped_empty_turn": 2, "data/skipped_identical_pair": 2,
                                "data/skipped_malformed": 0, "data/skipped_template_refused": 0,
                                "data/merged_turns": 2}


def test_counts_add_up_over_several_loads():
    from pipeline.data.bad_rows import DataReport
    report = DataReport()
    for _ in range(2):
        load_validated([str(DEFECTS)], "train", preference_rows, bad_rows="skip", report=report)
    assert report.skipped == {"empty_turn": 4, "identical_pair": 4} and report.merged == 4


@pytest.mark.parametrize("line, problem", [
    (3, "field `chosen` turn 1 (Assistant) is empty"),
    (5, "field `rejected` equals `chosen`"),
])
def test_error_mode_stops_at_the_first_bad_row_and_names_the_setting(tmp_path, line, problem):
    rows = DEFECTS.read_text().splitlines()
    path = write_jsonl(tmp_path / "hh.jsonl", rows[:2] + [rows[line - 1]])
    with pytest.raises(PipelineError) as e:
        load_validated([path], "train", preference_rows, bad_rows="error")
    assert f"{path}, line 3: {problem}" in str(e.value)
    assert "Fix or remove the row" in str(e.value) and "data.bad_rows=skip" in str(e.value)
    with pytest.raises(PipelineError, match=r"hh_rlhf_defects.jsonl, line 3: field `chosen` turn 1"):
        load_validated([str(DEFECTS)], "train", preference_rows, bad_rows="error")


def test_consecutive_same_speaker_turns_are_merged():
    assert parse_transcript("\n\nHuman: Hi.\n\nHuman: What is 2 plus 3?\n\nAssistant: 5.", "chosen") == [
        {"role": "user", "content": "Hi.\n\nWhat is 2 plus 3?"}, {"role": "assistant", "content": "5."}]
    assert parse_transcript("\n\nHuman: q\n\nAssistant: a\n\nAssistant: b\n\nAssistant: c", "chosen") == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a\n\nb\n\nc"}]
    (pair,) = load_validated([str(DEFECTS)], "train", preference_rows, bad_rows="skip")[3:4]  # line 6 (3, 5 skipped)
    assert pair["prompt"] == [{"role": "user", "content": "Hi.\n\nWhat is 2 plus 3?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "2 plus 3 is 5."}]


def test_merges_are_counted_and_printed_in_error_mode_too(tmp_path, capsys):
    from pipeline.data.bad_rows import DataReport
    rows = DEFECTS.read_text().splitlines()
    path = write_jsonl(tmp_path / "hh.jsonl", [rows[0], rows[5], rows[11]])
    report = DataReport()
    assert len(load_validated([path], "train", preference_rows, bad_rows="error", report=report)) == 3
    assert report.merged == 2 and not report.skipped
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "merged_turns" in x]
    assert path in line and "line 2" in line


def test_bad_rows_value_is_checked():
    from pipeline.core.errors import ConfigError
    with pytest.raises(ConfigError, match=r"data.bad_rows='drop'.*'skip'.*'error'"):
        load_validated([str(DEFECTS)], "train", preference_rows, bad_rows="drop")


def test_a_file_whose_every_row_is_bad_still_stops_the_run(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"},
                                              {"question": "q", "answer": "a"}])
    with pytest.raises(PipelineError, match=r"all 2 rows of .*p.jsonl were skipped.*line 1"):
        load_validated([path], "train", preference_rows, bad_rows="skip")


def test_setting_mismatches_are_not_bad_rows(tmp_path):
    # A missing margin under train.use_margin=true is the setting's problem, not the row's.
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "y", "margin": 1},
                                              {"prompt": "q", "chosen": "x", "rejected": "y"}])
    with pytest.raises(PipelineError, match=r"line 2: field `margin` is missing.*use_margin=false"):
        load_validated([path], "train", margin_preference_rows, bad_rows="skip")


def test_the_configs_default_is_skip():
    from tests.conftest import compose_config
    for stage in ("sft", "rm", "dpo", "ppo", "eval"):
        assert compose_config(stage).data.bad_rows == "skip"
