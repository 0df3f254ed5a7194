"""RL checkpoints: everything a killed run needs to resume exactly.

``<run>/.work/<algorithm>/checkpoints/update-<n>/`` holds the trainable weights (policy and
value adapters, value head) as safetensors, the optimizer / scheduler / KL-controller state and
counters, each process's RNG states, and the metric history so far. A checkpoint is written
into a temporary folder and renamed into place, so the newest complete one is always readable;
older ones are deleted once a newer one exists. The W&B run id sits beside them, so a resumed
run continues the same W&B run.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.errors import PipelineError
from pipeline.core.identity import new_run_id

STATE = "state.json"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, update: int, model, trainer, history: list[dict], cfg_hash: str,
                    accelerator) -> Path:
    final = root / f"update-{update:06d}"
    tmp = root / f".tmp-update-{update:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(model.trainable_state(), tmp / "trainable.safetensors")
        torch.save(trainer.state_dict(), tmp / "trainer.pt")
        (tmp / "history.json").write_text(json.dumps(history))
        (tmp / STATE).write_text(json.dumps({"update": update, "config_hash": cfg_hash,
                                             "num_processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # left by an earlier run started with resume=false
        tmp.rename(final)
        for old in root.glob("update-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(root: Path) -> Optional[Path]:
    done = sorted(p for p in root.glob("update-*") if (p / STATE).is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, trainer, cfg_hash: str, accelerator) -> list[dict]:
    """Restore weights, optimizer, scheduler, KL controller, counters and RNG; return the history."""
    meta = json.loads((path / STATE).read_text())
    if meta["config_hash"] != cfg_hash:
        raise ValueError(
            f"the RL checkpoint {path} was written with a different config or parents (a rebuilt SFT or RM "
            "counts), so it cannot be resumed. Run with resume=false to start over (the checkpoint is then "
            "replaced), or restore the original overrides and parents.")
    if meta["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {meta['num_processes']} processes, this run has "
                         f"{accelerator.num_processes}; resume with the same number or set resume=false.")
    model.load_trainable_state(load_file(path / "trainable.safetensors", device=str(model.device)))
    # Our own optimizer state: weights_only keeps torch.load from executing anything.
    trainer.load_state_dict(torch.load(path / "trainer.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-rank{accelerator.process_index}.pt", weights_only=True))
    return json.loads((path / "history.json").read_text())


RUN_ID = "wandb_run_id"


class Checkpoints:
    """The checkpoints of one RL stage run under ``root``: resume, save, start over, remove."""

    def __init__(self, root: Path, cfg_hash: str, accelerator):
        self.root, self.hash, self.acc = root, cfg_hash, accelerator

    def resume(self, model, trainer) -> tuple[list[dict], str]:
        """Restore the newest checkpoint; returns the history so far and the W&B run id.
        Without a checkpoint this is a fresh start."""
        last = latest_checkpoint(self.root)
        if last is None:
            return self.start_over()
        try:
            history = load_checkpoint(last, model, trainer, self.hash, self.acc)
        except ValueError as e:
            raise PipelineError(str(e)) from e
        run_id = self.root / RUN_ID
        return history, run_id.read_text().strip() if run_id.is_file() else new_run_id()

    def start_over(self) -> tuple[list[dict], str]:
        """Drop old checkpoints (they would mislead a later resume); a new W&B run id."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(self.root, ignore_errors=True)
        self.acc.wait_for_everyone()
        return [], new_run_id()

    def save(self, update: int, model, trainer, history: list[dict], run_id: str) -> Path:
        path = save_checkpoint(self.root, update, model, trainer, history, self.hash, self.acc)
        if self.acc.is_main_process:
            (self.root / RUN_ID).write_text(run_id)
        return path

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.parent.is_dir() and not any(self.root.parent.iterdir()):
            self.root.parent.rmdir()  # .work/<algorithm>/ held only the checkpoints
