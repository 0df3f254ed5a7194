"""Fault injection: SIGKILL each training stage at a random moment after its first checkpoint,
rerun it, and check that (1) the run completes, (2) no half-written artifact was ever visible,
and (3) its final metrics equal an uninterrupted run's within numerics."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.core.artifacts import load_artifact
from pipeline.core.errors import ArtifactError
from tests.stage.conftest import TINY_RM, TINY_SFT, copy_root
from tests.stage.test_ppo_stage import TINY_PPO

pytestmark = [pytest.mark.slow, pytest.mark.stage]

RUNS = {  # the stage's tiny command, where its first checkpoint lands, the metrics to compare
    "sft": (TINY_SFT + ["train.max_steps=24", "train.save_steps=6", "train.logging_steps=4", "train.eval_steps=0",
                        "logger=none"],
            "sft/checkpoint-6/complete.json", ("train_loss", "train_loss_mean", "eval_loss")),
    "rm": (TINY_RM + ["train.max_steps=24", "train.save_steps=6", "train.logging_steps=4", "logger=none"],
           "rm/checkpoint-6/complete.json", ("train_loss", "train_loss_mean", "eval_accuracy", "eval_margin_mean")),
    "ppo": (TINY_PPO + ["ppo.total_updates=6", "checkpoint_every=2"],
            "ppo/checkpoints/update-000002/state.json",
            ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "objective/kl_coef", "ppo/lr")),
}


class ArtifactWatch(threading.Thread):
    """Polls ``<run>/<stage>`` while a process runs: whenever it exists it must load whole
    (manifest present, every file's checksum right). Records what it saw."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.stop, self.problems, self.seen = path, threading.Event(), [], 0

    def run(self):
        while not self.stop.is_set():
            folder = self._folder()
            if folder is not None:
                try:
                    load_artifact(self.path, self.path.name)
                    self.seen += 1
                except ArtifactError as e:
                    # A rerun replaces a finished artifact by renaming a new folder into place;
                    # if that happened mid-read, the read mixed two whole artifacts. A failure
                    # is the artifact's only if the same folder is still there.
                    if self._folder() == folder:
                        self.problems.append(str(e))
                except Exception as e:  # anything else is a reader's crash: report it, not silence
                    self.problems.append(f"load_artifact raised {e!r}")
                    return
            time.sleep(0.01)

    def _folder(self):
        """The identity (inode) of the folder now at the path, or None."""
        try:
            return self.path.stat().st_ino
        except FileNotFoundError:
            return None


def run_stage(stage: str, root: Path, extra=()) -> subprocess.CompletedProcess:
    args, _, _ = RUNS[stage]
    env = {**os.environ, "RLHF_ROOT": str(root)}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args, *extra], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_sigkill_at_a_random_moment_then_rerun_completes_and_matches(stage, chain, tmp_path):
    args, first_checkpoint, keys = RUNS[stage]
    work = chain / "artifacts/default/.work"
    fresh = copy_root(chain, tmp_path / "fresh")
    target = chain / "artifacts/default" / stage

    # --- killed run: SIGKILL at a random moment once the first checkpoint is on disk ---
    rng = random.Random(f"fault-{stage}")
    watch = ArtifactWatch(target)
    watch.start()
    proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}", *args],
                            env={**os.environ, "RLHF_ROOT": str(chain)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (work / first_checkpoint).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert (work / first_checkpoint).exists(), "the run never wrote its first checkpoint"
    time.sleep(rng.uniform(0.0, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # What the kill left: a checkpoint to resume from, unless it came after the artifact was
    # committed (a finished stage removes its checkpoints).
    checkpoints = work / Path(first_checkpoint).parts[0]
    resumable = any(p.name in ("complete.json", "state.json") for p in checkpoints.rglob("*"))

    # --- rerun: resumes from the last checkpoint (unless the kill came after the end) ---
    rerun_extra = ["log_every=3", "checkpoint_every=4"] if stage == "ppo" else ["train.logging_steps=4"]
    out = run_stage(stage, chain, rerun_extra)
    loads = watch.seen  # the watcher must load the finished artifact too, or its silence proves nothing
    deadline = time.time() + 30
    while watch.seen == loads and time.time() < deadline:
        time.sleep(0.05)
    watch.stop.set()
    watch.join()
    assert not watch.problems, watch.problems[:2]
    assert watch.seen > loads, "the watcher never loaded the finished artifact: it was not looking"
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("resuming from" in out.stdout + out.stderr) == resumable
    assert not (work / Path(first_checkpoint).parts[0]).exists()  # a finished stage removes its checkpoints

    # --- the same run, never interrupted ---
    full = run_stage(stage, fresh)
    assert full.returncode == 0
    if resumable and stage != "ppo":  # the resumed trainer really skipped the steps it had done
        assert out.stdout.count("'loss':") < full.stdout.count("'loss':")
    got = load_artifact(target, stage).metrics
    want = load_artifact(fresh / "artifacts/default" / stage, stage).metrics
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    if stage == "ppo":
        got_h = [json.loads(x) for x in (target / "history.jsonl").read_text().splitlines()]
        want_h = [json.loads(x) for x in (fresh / "artifacts/default/ppo/history.jsonl").read_text().splitlines()]
        assert len(got_h) == len(want_h) == 6
        for g, w in zip(got_h, want_h):
            assert g["objective/scores"] == pytest.approx(w["objective/scores"], rel=1e-3, abs=1e-5)
