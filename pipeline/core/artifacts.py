"""The staged artifact store: ``artifacts/<run>/<stage>/`` with a self-describing manifest.

A stage never writes into its final folder. It writes into a hidden staging folder next
to it and, only once everything (manifest included) is on disk, swaps it into place
with renames. A failed or killed run therefore leaves the previous artifact untouched,
and a later stage can never read a half-written one: an artifact exists exactly when its
``manifest.json`` does, and every file in it is checked against the manifest's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from pipeline.core.errors import ArtifactError
from pipeline.core.identity import config_hash

MANIFEST = "manifest.json"

# The RL stage writes its artifact under the name of its algorithm (conf/algorithm/).
RL_STAGES = ("ppo", "ppo_ptx", "rloo", "grpo", "dr_grpo", "reinforce_pp", "online_dpo")

# Which command produces each stage's artifact: named in every "missing parent" error.
PRODUCER = {
    "base": "make base",
    "sft": "make sft",
    "rm": "make rm",
    "dpo": "make dpo",
    "eval": "make eval",
    **{s: "make ppo" if s == "ppo" else f"make ppo ARGS=algorithm={s}" for s in RL_STAGES},
}

TRACKED_PACKAGES = (
    "torch", "transformers", "trl", "peft", "datasets", "accelerate", "wandb",
    "hydra-core", "tokenizers", "safetensors",
)


@dataclass(frozen=True)
class Artifact:
    stage: str
    path: Path
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest["metrics"]

    @property
    def checksum(self) -> str:
        """The artifact's identity: a hash of its files' checksums. It names the content (the
        weights), not the folder, so a copied or moved run keeps its lineage."""
        files = json.dumps(self.manifest["files"], sort_keys=True)
        return hashlib.sha256(f"{self.stage}\n{files}".encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksum_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (manifest excluded), keyed by relative path."""
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(cwd: Optional[Path] = None) -> str:
    """HEAD of the checkout the code runs from, with ``-dirty`` when it has local edits."""
    repo = cwd or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stage_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage


def load_artifact(path: str | Path, stage: str, verify: bool = True) -> Artifact:
    """Open a finished artifact, refusing a missing or corrupt one with the fix in the message."""
    path = Path(path)
    make = PRODUCER.get(stage, f"the `{stage}` stage")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        why = "does not exist" if not path.exists() else f"has no {MANIFEST} (an unfinished or foreign folder)"
        raise ArtifactError(
            f"The `{stage}` artifact at {path} {why}. Run `{make}` first "
            f"(same run_name), or point this stage at another `{stage}` artifact in the config."
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{manifest_file} is not valid JSON ({e}). Re-run `{make}` to rebuild it.") from e
    if manifest.get("stage") != stage:
        raise ArtifactError(
            f"{path} holds a `{manifest.get('stage')}` artifact, not `{stage}`. "
            f"Point the config at a `{stage}` artifact or run `{make}`."
        )
    if verify:
        verify_checksums(path, manifest, make)
    return Artifact(stage=stage, path=path, manifest=manifest)


def verify_checksums(path: Path, manifest: dict[str, Any], make: str) -> None:
    expected = manifest["files"]
    folder = _identity(path)
    try:
        actual = checksum_tree(path)
    except FileNotFoundError:
        actual = None  # part of the tree vanished mid-walk: replaced, or being deleted
    if folder is None or _identity(path) != folder:
        # A rerun of the stage commits by renaming its new folder over this one (commit()), so
        # a read that overlaps it mixes two artifacts: neither is corrupt, the read is stale.
        raise ArtifactError(
            f"The artifact at {path} changed while it was being read: another run of `{make}` "
            "replaced or removed it. Read it again once that run has finished."
        )
    if actual is None:
        raise ArtifactError(f"Files of the artifact at {path} vanished while it was being read. "
                            f"Re-run `{make}` to rebuild it if it stays incomplete.")
    missing = sorted(set(expected) - set(actual))
    changed = sorted(f for f in expected if f in actual and actual[f] != expected[f])
    if missing or changed:
        detail = "; ".join(
            ([f"missing: {', '.join(missing)}"] if missing else [])
            + ([f"checksum mismatch: {', '.join(changed)}"] if changed else [])
        )
        raise ArtifactError(
            f"The artifact at {path} is corrupt ({detail}). Re-run `{make}` to rebuild it."
        )


def _identity(path: Path) -> Optional[tuple[int, int]]:
    """The folder now at ``path`` (device, inode), or None: tells a replaced folder from its name."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def build_manifest(
    *, stage: str, folder: Path, config: dict[str, Any], parent: Optional[Artifact],
    started: float, metrics: dict[str, Any],
) -> dict[str, Any]:
    return {
        "stage": stage,
        "config": config,
        "parent": None if parent is None else {
            "stage": parent.stage, "path": str(parent.path), "checksum": parent.checksum,
        },
        "packages": package_versions(),
        "git_commit": git_commit(),
        "started_at": _iso(started),
        "finished_at": _iso(time.time()),
        "metrics": metrics,
        "files": checksum_tree(folder),
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class StagedArtifact:
    """A staging folder plus what the manifest needs; filled by the stage, committed on success."""

    def __init__(self, stage: str, final: Path, config: dict[str, Any], parent: Optional[Artifact]):
        self.stage, self.final, self.config, self.parent = stage, final, config, parent
        self.started = time.time()
        self.metrics: dict[str, Any] = {}
        self.dir = final.parent / f".{final.name}.staging-{os.getpid()}"
        self.artifact: Optional[Artifact] = None  # the committed artifact, once the block has ended

    def commit(self) -> Artifact:
        """Write the manifest, then swap the staging folder into place.

        ``rename`` of a folder is atomic on POSIX. Replacing an existing artifact takes two
        renames (old aside, new in); a crash between them leaves ``<stage>.previous``,
        which ``open_or_restore`` puts back.
        """
        manifest = build_manifest(stage=self.stage, folder=self.dir, config=self.config,
                                  parent=self.parent, started=self.started, metrics=self.metrics)
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str))
        os.replace(tmp, self.dir / MANIFEST)
        previous = self.final.parent / f"{self.final.name}.previous"
        if previous.exists():
            shutil.rmtree(previous)
        if self.final.exists():
            os.rename(self.final, previous)
        os.rename(self.dir, self.final)
        shutil.rmtree(previous, ignore_errors=True)
        self.artifact = Artifact(stage=self.stage, path=self.final, manifest=manifest)
        return self.artifact


@contextlib.contextmanager
def staged_artifact(
    run_dir: str | Path, stage: str, config: dict[str, Any], parent: Optional[Artifact] = None,
    folder: Optional[str] = None,
) -> Iterator[StagedArtifact]:
    """Stage an artifact: the body writes into ``staged.dir`` and sets ``staged.metrics``.

    On normal exit the artifact is committed; on any exception the staging folder is
    deleted and whatever artifact was there before stays as it was. ``folder`` names the
    artifact's folder when it is not the stage's name.
    """
    final = stage_path(run_dir, folder or stage)
    final.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(final)
    remove_stale_staging(final)
    staged = StagedArtifact(stage, final, config, parent)
    staged.dir.mkdir()
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged.dir, ignore_errors=True)
        raise
    staged.commit()


def remove_stale_staging(final: Path) -> None:
    """Delete staging folders left by killed runs (their process is gone)."""
    for d in final.parent.glob(f".{final.name}.staging-*"):
        pid = int(d.name.rsplit("-", 1)[1])
        if pid == os.getpid() or not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def restore_interrupted_swap(final: Path) -> None:
    """Undo a swap that a kill cut between its two renames (old moved aside, new not in)."""
    previous = final.parent / f"{final.name}.previous"
    if previous.exists() and not final.exists():
        os.rename(previous, final)


def find_parent(run_dir: str | Path, stage: str, override: Optional[str] = None) -> Artifact:
    """The parent artifact: ``override`` when the config names one, else the same run's."""
    path = Path(override) if override else stage_path(run_dir, stage)
    restore_interrupted_swap(path)
    return load_artifact(path, stage)


def require_built_on(child: Artifact, parent: Artifact) -> None:
    """Refuse to use ``child`` on top of a ``parent`` it was not built on.

    An adapter is only meaningful on the exact weights it was trained on: after ``make base``
    is rerun, the old SFT adapter no longer fits, and an RM trained on one SFT model does not
    score for another. The manifest's parent checksum says which one it was.
    """
    recorded = child.manifest.get("parent")
    if recorded is not None and recorded["stage"] == parent.stage and recorded["checksum"] == parent.checksum:
        return
    raise ArtifactError(
        f"The `{child.stage}` artifact at {child.path} was not built on the `{parent.stage}` artifact at "
        f"{parent.path} (that one was rebuilt since, or belongs to another run). Re-run "
        f"`{PRODUCER[child.stage]}` to rebuild it on this {parent.stage}, or point "
        f"parents.{parent.stage} at the artifact it was built on.")


def recorded_parent(child: Artifact) -> Optional[Artifact]:
    """The artifact ``child`` was built on (None for a root), refused if it changed since."""
    recorded = child.manifest.get("parent")
    if recorded is None:
        return None
    parent = find_parent(Path(recorded["path"]).parent, recorded["stage"], override=recorded["path"])
    require_built_on(child, parent)
    return parent


def is_up_to_date(run_dir: str | Path, stage: str, config: dict[str, Any],
                  parent: Optional[Artifact]) -> bool:
    """True when the stage's artifact exists, is intact, and was built from this exact
    config and this exact parent — so ``make pipeline`` may skip it. Settings that change only
    logging, checkpoint cadence or health warnings don't count (as for a resume)."""
    try:
        art = load_artifact(stage_path(run_dir, stage), stage)
    except ArtifactError:
        return False
    recorded_parent = art.manifest.get("parent")
    same_parent = (parent is None and recorded_parent is None) or (
        parent is not None and recorded_parent is not None
        and recorded_parent["checksum"] == parent.checksum
    )
    same_config = config_hash(art.manifest["config"]) == config_hash(json.loads(json.dumps(config, default=str)))
    return same_parent and same_config
