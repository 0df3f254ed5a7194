"""Resuming a killed stage: what must match, and the checkpoints of the TRL-based stages.

Every training stage checkpoints into ``<run>/.work/<stage>/`` and, rerun with the same config,
continues from its last complete checkpoint in the same W&B run. ``resume=false`` starts over;
a finished stage removes its checkpoints (its artifact supersedes them).

SFT, RM and DPO use the HF Trainer's own checkpoints (weights, optimizer, scheduler, RNG, the
step, and the data order: the trainer skips the batches it had done). A checkpoint counts only
once :class:`MarkComplete` has written its marker after the trainer finished saving it, so a
kill in the middle of a save falls back to the checkpoint before (two are kept).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from transformers import TrainerCallback

from pipeline.core.errors import PipelineError
from pipeline.core.identity import config_hash, new_run_id

COMPLETE = "complete.json"
RUN = "run.json"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


class MarkComplete(TrainerCallback):
    """Marks a checkpoint folder complete once the trainer has finished writing it, and logs at
    every checkpoint step. The trainer logs the mean loss since its previous log, and a resumed
    trainer starts counting at its checkpoint: unless a log falls on every checkpoint, the
    resumed run's first log would average fewer steps than the uninterrupted run's."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # set by the default flow callback, which runs first
            control.should_log = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            _write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE,
                        {"step": state.global_step})


class TrainerCheckpoints:
    """The checkpoints of one HF-trainer stage in ``work_dir``, for one resolved config and the
    parent artifacts it builds on."""

    def __init__(self, work_dir: Path, config: dict, stage: str, parents: Iterable = ()):
        self.dir, self.hash, self.stage = Path(work_dir), config_hash(config, parents), stage

    def latest(self) -> Optional[Path]:
        done = [p for p in self.dir.glob("checkpoint-*") if (p / COMPLETE).is_file()]
        return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None

    def start(self, resume: bool) -> tuple[Optional[Path], str]:
        """``(checkpoint to resume from or None, W&B run id)``. With ``resume`` and a complete
        checkpoint of this config, continue it; a checkpoint of another config is refused."""
        run = self.dir / RUN
        last = self.latest() if resume else None
        if last is not None and run.is_file():
            meta = json.loads(run.read_text())
            if meta["config_hash"] != self.hash:
                raise PipelineError(
                    f"the {self.stage} checkpoint {last} was written with a different config or parents (a "
                    "rebuilt parent stage counts), so it cannot be resumed. Run with resume=false to start over "
                    "(the checkpoint is then replaced), or restore the original overrides and parents.")
            return last, meta["run_id"]
        shutil.rmtree(self.dir, ignore_errors=True)  # old checkpoints would mislead a later resume
        self.dir.mkdir(parents=True)
        run_id = new_run_id()
        _write_json(run, {"config_hash": self.hash, "run_id": run_id})
        return None, run_id

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
