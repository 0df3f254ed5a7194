"""PPO checkpoints: everything a killed run needs to resume exactly.

``<run>/.work/ppo/checkpoints/update-<n>/`` holds the trainable weights (policy and value
adapters, value head) as safetensors, the optimizer / scheduler / KL-controller state and
counters, each process's RNG states, and the metric history so far. A checkpoint is
written into a temporary folder and renamed into place, so the newest complete one is
always readable; older ones are deleted once a newer one exists.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"


def config_hash(config: dict) -> str:
    """What must match for a resume: the resolved config without logging/resume switches."""
    relevant = {k: v for k, v in config.items() if k not in ("logger", "resume", "hydra")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


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
            f"the PPO checkpoint {path} was written with a different config, so it cannot be resumed. "
            "Run with resume=false to start over (the checkpoint is then replaced), "
            "or restore the original overrides.")
    if meta["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {meta['num_processes']} processes, this run has "
                         f"{accelerator.num_processes}; resume with the same number or set resume=false.")
    model.load_trainable_state(load_file(path / "trainable.safetensors", device=str(model.device)))
    # Our own optimizer state: weights_only keeps torch.load from executing anything.
    trainer.load_state_dict(torch.load(path / "trainer.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-rank{accelerator.process_index}.pt", weights_only=True))
    return json.loads((path / "history.json").read_text())
