"""Policy snapshots every ``ppo.snapshot_every`` updates: the points of the over-optimisation curve.

Gao et al. (2023, "Scaling Laws for Reward Model Overoptimization") plot the proxy and the gold
reward of a policy against ``sqrt(KL)`` to its initial policy as RL goes on; ``make eval``
samples every snapshot to draw that curve (pipeline/eval/curve.py). A snapshot is the policy
adapter alone (``adapter_config.json`` and ``adapter_model.safetensors``, a few MB even for
real models), not a checkpoint: nothing here can resume a run.

While the run goes, snapshots are written to ``<run>/.work/<algorithm>/snapshots/update-<n>/``
(each into a temporary folder renamed into place), beside the checkpoints; a resumed run keeps
those up to the update it resumes from and drops any taken after it (they are taken again, the
same, since a resumed run repeats the uninterrupted one). The final artifact receives a copy,
``<artifact>/snapshots/update-<n>/``, listed in its manifest under ``metrics.snapshots`` with
the KL to the reference and the training score of that update (``objective/kl``,
``objective/scores`` of the history); the work folder goes once the artifact is committed.
A snapshot is taken before the checkpoint of the same update, so a kill between the two loses
nothing a resume does not take again.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from pipeline.core.errors import ConfigError

FOLDER = "snapshots"


def snapshot_name(update: int) -> str:
    return f"update-{update:06d}"


def snapshot_update(folder: Path) -> int:
    """``update-000010`` -> 10."""
    return int(folder.name.split("-", 1)[1])


def save_policy_adapter(model, folder: Path) -> None:
    """The policy adapter of a :class:`SharedBaseActorCritic` as a loadable LoRA adapter folder."""
    tmp = folder.parent / f".tmp-{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.peft.save_pretrained(tmp, selected_adapters=["policy"], save_embedding_layers=False)
    shutil.rmtree(folder, ignore_errors=True)
    (tmp / "policy").rename(folder)  # peft writes a named adapter into <dir>/<name>/
    shutil.rmtree(tmp, ignore_errors=True)  # its README.md model card


class Snapshots:
    """The snapshots of one RL stage run, kept in ``root`` (its ``.work`` folder) until the end.

    ``every``: ``ppo.snapshot_every`` (0 or None: off). ``resumed_at``: the update the run starts
    from (0 for a fresh start), so snapshots taken after it by a killed run are dropped. Only the
    main process (``main``) writes.
    """

    def __init__(self, root: Path, every: Optional[int], resumed_at: int, main: bool = True):
        if every is not None and (isinstance(every, bool) or every < 0):
            raise ConfigError(f"ppo.snapshot_every={every} must be a number of updates >= 0 (0 or null: off)")
        self.root, self.every, self.main = Path(root), every or 0, main
        if self.main:
            for folder in self.folders():
                if snapshot_update(folder) > resumed_at:
                    shutil.rmtree(folder)
            for tmp in self.root.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def folders(self) -> list[Path]:
        return sorted(self.root.glob("update-*")) if self.root.is_dir() else []

    def maybe_save(self, update: int, model) -> Optional[Path]:
        """Snapshot the policy after ``update`` updates when ``update`` is a multiple of ``every``."""
        if not (self.every and self.main and update % self.every == 0):
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self.root / snapshot_name(update)
        save_policy_adapter(model, folder)
        return folder

    def copy_into(self, artifact_dir: Path, history: list[dict]) -> dict:
        """Copy every snapshot into ``<artifact_dir>/snapshots/``; returns ``{"snapshots": [...]}`` for
        the manifest's metrics (``{}`` when snapshots are off), one entry per snapshot: ``update``,
        ``path`` (relative to the artifact), and from the history of that update ``kl``
        (``objective/kl``, the trainer's KL to the reference) and ``score`` (``objective/scores``)."""
        if not self.every:
            return {}
        entries = []
        for folder in self.folders():
            update = snapshot_update(folder)
            shutil.copytree(folder, artifact_dir / FOLDER / folder.name)
            row = history[update - 1] if 0 < update <= len(history) else {}
            entries.append({"update": update, "path": f"{FOLDER}/{folder.name}",
                            "kl": row.get("objective/kl"), "score": row.get("objective/scores")})
        return {"snapshots": entries}

    def remove(self) -> None:
        """Drop the work folder (the artifact holds the copies), and ``.work/<stage>/`` if now empty."""
        if not self.main:
            return
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.parent.is_dir() and not any(self.root.parent.iterdir()):
            self.root.parent.rmdir()
