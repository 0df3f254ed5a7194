"""What identifies a run's results: the hash a resume must match, and fresh run ids."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, Iterable

# Settings that change what is logged or kept, or where and how fast the run goes, never what is
# trained (``gpu_memory`` only refuses or sizes ``auto``, recorded as the word). ``parents`` names parents by
# path: they count by their content (checksums) instead.
NOT_RESULTS = ("logger", "resume", "hydra", "log_every", "table_every", "checkpoint_every", "summary_window",
               "health", "num_threads", "paths", "parents", "gpu_memory")
NOT_RESULTS_TRAIN = ("logging_steps", "save_steps", "num_threads")  # under `train.`
NOT_RESULTS_PPO = ("snapshot_every",)  # under `ppo.`: which updates are also kept, not what trains
ROOT = "<root>"


def _under_root(value: Any, root: str) -> Any:
    """``value`` with every string under ``root`` rewritten to start at ``<root>``, so a run moved
    to another machine or folder keeps its identity (data paths are resolved under the root)."""
    if isinstance(value, dict):
        return {k: _under_root(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_under_root(v, root) for v in value]
    if isinstance(value, str) and root not in ("", ".") and (value == root or value.startswith(root + "/")):
        return ROOT + value[len(root):]
    return value


def config_hash(config: dict, parents: Iterable[Any] = ()) -> str:
    """What must match for a resume: the resolved config without the settings that only decide
    logging, checkpoint cadence, health warnings, threads and paths, plus the identity of every
    parent artifact the run builds on (``.stage`` and ``.checksum``, a hash of its files): a rebuilt
    SFT or RM is a different parent even at the same path."""
    relevant = {k: v for k, v in config.items() if k not in NOT_RESULTS}
    if isinstance(relevant.get("train"), dict):
        relevant["train"] = {k: v for k, v in relevant["train"].items() if k not in NOT_RESULTS_TRAIN}
    if isinstance(relevant.get("ppo"), dict):
        relevant["ppo"] = {k: v for k, v in relevant["ppo"].items() if k not in NOT_RESULTS_PPO}
    root = str((config.get("paths") or {}).get("root_dir", "")).rstrip("/")
    identity = {"config": _under_root(relevant, root),
                "parents": sorted((p.stage, p.checksum) for p in parents if p is not None)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]
