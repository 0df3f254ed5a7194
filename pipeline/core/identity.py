"""What identifies a run's results: the hash a resume must match, and fresh run ids."""

from __future__ import annotations

import hashlib
import json
import uuid

# Settings that change what is logged or kept, never what is trained.
NOT_RESULTS = ("logger", "resume", "hydra", "log_every", "table_every", "checkpoint_every", "summary_window",
               "health")
NOT_RESULTS_TRAIN = ("logging_steps", "save_steps")  # under `train.`


def config_hash(config: dict) -> str:
    """What must match for a resume: the resolved config without the settings that only decide
    logging, checkpoint cadence and health warnings."""
    relevant = {k: v for k, v in config.items() if k not in NOT_RESULTS}
    if isinstance(relevant.get("train"), dict):
        relevant["train"] = {k: v for k, v in relevant["train"].items() if k not in NOT_RESULTS_TRAIN}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]
