"""pipeline.core.identity: what a resume must match, on hand-made configs and parents."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.identity import config_hash
from pipeline.training.resume import COMPLETE, TrainerCheckpoints

pytestmark = pytest.mark.unit


def config(root="/home/a/rlhf", threads=2, lr=1e-4):
    return {"seed": 0, "paths": {"root_dir": root, "run_dir": f"{root}/artifacts/default"},
            "data": {"sft": {"train": [f"{root}/data/world/sft_train.jsonl"]}},
            "parents": {"sft": None}, "train": {"learning_rate": lr, "num_threads": threads, "logging_steps": 5}}


SFT_A = SimpleNamespace(stage="sft", checksum="a" * 16)
SFT_B = SimpleNamespace(stage="sft", checksum="b" * 16)


def test_a_rebuilt_parent_changes_the_hash():
    assert config_hash(config(), [SFT_A]) != config_hash(config(), [SFT_B])
    assert config_hash(config(), [SFT_A]) == config_hash(config(), [SFT_A])


def test_threads_and_the_machine_the_run_sits_on_do_not_change_the_hash():
    base = config_hash(config(), [SFT_A])
    assert config_hash(config(threads=16), [SFT_A]) == base
    assert config_hash(config(root="/mnt/other/place"), [SFT_A]) == base  # moved: data and paths under root
    assert config_hash(config(lr=3e-4), [SFT_A]) != base
    other_data = config()
    other_data["data"]["sft"]["train"] = ["/home/a/rlhf/data/world/other.jsonl"]
    assert config_hash(other_data, [SFT_A]) != base


def test_every_setting_that_trains_counts_and_only_the_listed_cadences_do_not():
    base = config_hash(config(), [SFT_A])
    algo = lambda name: {**config(), "algorithm": {"name": name}}  # noqa: E731
    # short strings are settings, not paths: they must not be folded into `<root>`
    assert config_hash(algo("grpo"), [SFT_A]) != config_hash(algo("rloo"), [SFT_A])
    ppo = lambda **kw: {**config(), "ppo": {"total_updates": 80, "snapshot_every": 0, **kw}}  # noqa: E731
    assert config_hash(ppo(total_updates=40), [SFT_A]) != config_hash(ppo(), [SFT_A])
    assert config_hash(ppo(snapshot_every=10), [SFT_A]) == config_hash(ppo(), [SFT_A])
    logging = config()
    logging["train"]["logging_steps"] = 50
    assert config_hash(logging, [SFT_A]) == base


def test_the_order_keys_were_written_in_does_not_change_the_hash():
    c = config()
    reordered = {k: c[k] for k in reversed(list(c))}
    reordered["train"] = {k: c["train"][k] for k in reversed(list(c["train"]))}
    assert config_hash(reordered, [SFT_A]) == config_hash(c, [SFT_A])


def test_a_checkpoint_on_another_parent_is_refused(tmp_path):
    work = tmp_path / ".work" / "rm"
    last, _ = TrainerCheckpoints(work, config(), "rm", [SFT_A]).start(resume=True)
    assert last is None
    (work / "checkpoint-10").mkdir()
    (work / "checkpoint-10" / COMPLETE).write_text("{}")
    last, _ = TrainerCheckpoints(work, config(threads=8), "rm", [SFT_A]).start(resume=True)
    assert last == work / "checkpoint-10"  # same config and parent: resumes
    with pytest.raises(PipelineError, match="different config or parents"):
        TrainerCheckpoints(work, config(), "rm", [SFT_B]).start(resume=True)


def test_a_checkpoint_counts_only_with_its_run_record_and_marker(tmp_path):
    work = tmp_path / ".work" / "sft"
    _, first_id = TrainerCheckpoints(work, config(), "sft", [SFT_A]).start(resume=True)
    (work / "checkpoint-5").mkdir()  # killed mid-save: no completion marker
    last, run_id = TrainerCheckpoints(work, config(), "sft", [SFT_A]).start(resume=True)
    assert last is None and run_id != first_id and not (work / "checkpoint-5").exists()  # started over
    (work / "checkpoint-5").mkdir()
    (work / "checkpoint-5" / COMPLETE).write_text("{}")
    (work / "run.json").unlink()  # a checkpoint whose config nobody recorded cannot be trusted
    last, _ = TrainerCheckpoints(work, config(), "sft", [SFT_A]).start(resume=True)
    assert last is None and not (work / "checkpoint-5").exists()


def test_mark_complete_writes_the_marker_from_the_main_process_only(tmp_path):
    from transformers import TrainerState, TrainingArguments

    from pipeline.training.resume import MarkComplete

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    for main, step in ((True, 7), (False, 9)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        MarkComplete().on_save(args, TrainerState(global_step=step, is_world_process_zero=main), None)
    assert (tmp_path / "checkpoint-7" / COMPLETE).read_text() == '{"step": 7}'
    assert not (tmp_path / "checkpoint-9" / COMPLETE).exists()
    TrainerCheckpoints(tmp_path / "never-made", config(), "sft").remove()  # a run too short to checkpoint
