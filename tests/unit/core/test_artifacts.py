import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline.core.artifacts import find_parent, is_up_to_date, load_artifact, staged_artifact
from pipeline.core.errors import ArtifactError

pytestmark = pytest.mark.unit


def write_artifact(run_dir, stage, payload, config=None, parent=None):
    with staged_artifact(run_dir, stage, config or {"k": 1}, parent) as art:
        (art.dir / "weights.bin").write_text(payload)
        (art.dir / "sub").mkdir()
        (art.dir / "sub" / "tok.json").write_text("{}")
        art.metrics = {"loss": 0.5}
    return load_artifact(run_dir / stage, stage)


def test_manifest_describes_the_artifact(tmp_path):
    base = write_artifact(tmp_path, "base", "v1")
    child = write_artifact(tmp_path, "sft", "s", parent=base)
    m = child.manifest
    assert m["stage"] == "sft" and m["metrics"] == {"loss": 0.5}
    assert set(m["files"]) == {"weights.bin", "sub/tok.json"}
    assert m["parent"] == {"stage": "base", "path": str(tmp_path / "base"), "checksum": base.checksum}
    assert {"torch", "transformers", "trl", "peft"} <= set(m["packages"])
    for key in ("config", "git_commit", "started_at", "finished_at"):
        assert m[key]


def test_failed_write_leaves_previous_artifact_intact(tmp_path):
    write_artifact(tmp_path, "base", "v1")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_artifact(tmp_path, "base", {"k": 2}) as art:
            (art.dir / "weights.bin").write_text("half-writ")
            raise RuntimeError("boom")
    art = load_artifact(tmp_path / "base", "base")
    assert (art.path / "weights.bin").read_text() == "v1"
    assert art.manifest["config"] == {"k": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no staging folder left


def test_killed_write_leaves_previous_artifact_intact(tmp_path):
    write_artifact(tmp_path, "base", "v1")
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pipeline.core.artifacts import staged_artifact
        with staged_artifact(Path({str(tmp_path)!r}), "base", {{"k": 2}}) as art:
            (art.dir / "weights.bin").write_text("partial")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (load_artifact(tmp_path / "base", "base").path / "weights.bin").read_text() == "v1"
    # The next successful run sweeps the dead process's staging folder and replaces v1.
    write_artifact(tmp_path, "base", "v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert (tmp_path / "base" / "weights.bin").read_text() == "v2"


def test_swap_cut_between_renames_is_restored(tmp_path):
    write_artifact(tmp_path, "base", "v1")
    os.rename(tmp_path / "base", tmp_path / "base.previous")  # as a kill mid-swap leaves it
    assert (find_parent(tmp_path, "base").path / "weights.bin").read_text() == "v1"


def test_checksum_mismatch_is_caught(tmp_path):
    write_artifact(tmp_path, "base", "v1")
    (tmp_path / "base" / "weights.bin").write_text("tampered")
    with pytest.raises(ArtifactError, match=r"checksum mismatch: weights.bin.*make base"):
        load_artifact(tmp_path / "base", "base")


def test_missing_file_is_caught(tmp_path):
    write_artifact(tmp_path, "base", "v1")
    (tmp_path / "base" / "sub" / "tok.json").unlink()
    with pytest.raises(ArtifactError, match=r"missing: sub/tok.json"):
        load_artifact(tmp_path / "base", "base")


def test_artifact_replaced_while_being_read_is_an_artifact_error(tmp_path, monkeypatch):
    """A rerun swaps a new artifact into place (old one renamed aside, then removed) while
    another process may be verifying the old one: the reader gets the pipeline's error, which
    says what happened, not a bare FileNotFoundError from the middle of the walk."""
    import pipeline.core.artifacts as artifacts

    write_artifact(tmp_path, "base", "v1")
    real = artifacts.sha256_file

    def swap_mid_read(path, *a, **k):
        digest = real(path, *a, **k)
        if (tmp_path / "base").exists():
            os.rename(tmp_path / "base", tmp_path / "base.previous")  # as commit() does
        return digest

    monkeypatch.setattr(artifacts, "sha256_file", swap_mid_read)
    with pytest.raises(ArtifactError, match=r"changed while it was being read.*another run"):
        load_artifact(tmp_path / "base", "base")


def test_artifact_removed_mid_walk_is_an_artifact_error(tmp_path, monkeypatch):
    """The walk itself can meet the vanished folder (scandir of a subfolder that went with the
    rename): the same error, not a FileNotFoundError (seen in CI from the fault-injection watcher)."""
    import pipeline.core.artifacts as artifacts

    write_artifact(tmp_path, "base", "v1")

    def walk_into_vanished(root):
        os.rename(tmp_path / "base", tmp_path / "base.previous")
        raise FileNotFoundError(2, "No such file or directory", str(root / "sub"))

    monkeypatch.setattr(artifacts, "checksum_tree", walk_into_vanished)
    with pytest.raises(ArtifactError, match=r"changed while it was being read"):
        load_artifact(tmp_path / "base", "base")


@pytest.mark.parametrize("stage, target", [("base", "make base"), ("sft", "make sft"), ("rm", "make rm")])
def test_missing_parent_names_the_make_target(tmp_path, stage, target):
    with pytest.raises(ArtifactError, match=f"Run `{target}` first"):
        find_parent(tmp_path, stage)


def test_folder_without_manifest_is_not_an_artifact(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "adapter.safetensors").write_text("x")
    with pytest.raises(ArtifactError, match="has no manifest.json.*make sft"):
        find_parent(tmp_path, "sft")


def test_wrong_stage_is_refused(tmp_path):
    write_artifact(tmp_path, "base", "v1")
    with pytest.raises(ArtifactError, match="holds a `base` artifact, not `sft`"):
        find_parent(tmp_path, "sft", override=str(tmp_path / "base"))


def test_up_to_date_tracks_config_and_parent(tmp_path):
    base = write_artifact(tmp_path, "base", "v1")
    write_artifact(tmp_path, "sft", "s", config={"lr": 1}, parent=base)
    assert is_up_to_date(tmp_path, "sft", {"lr": 1}, base)
    assert not is_up_to_date(tmp_path, "sft", {"lr": 2}, base)
    assert is_up_to_date(tmp_path, "sft", {"lr": 1, "logger": {"name": "none"}}, base)  # logging only
    new_base = write_artifact(tmp_path, "base", "v2")
    assert not is_up_to_date(tmp_path, "sft", {"lr": 1}, new_base)


def test_an_adapter_on_a_rebuilt_parent_is_refused(tmp_path):
    from pipeline.core.artifacts import recorded_parent, require_built_on
    from pipeline.models.policies import base_source_for

    base = write_artifact(tmp_path, "base", "v1")
    sft = write_artifact(tmp_path, "sft", "s", parent=base)
    assert recorded_parent(sft).checksum == base.checksum
    assert base_source_for(sft) == str(tmp_path / "base" / "model")
    other = write_artifact(tmp_path / "other", "sft", "t", parent=base)
    rm = write_artifact(tmp_path, "rm", "r", parent=sft)
    require_built_on(rm, sft)
    with pytest.raises(ArtifactError, match=r"`rm` artifact .* was not built on the `sft` artifact .*make rm"):
        require_built_on(rm, other)  # an RM scores only for the SFT model it was trained on

    write_artifact(tmp_path, "base", "v2", config={"k": 2})  # `make base` again: new weights
    with pytest.raises(ArtifactError, match=r"Re-run `make sft` to rebuild it on this base"):
        base_source_for(sft)


def test_up_to_date_tells_a_root_from_a_child(tmp_path):
    base = write_artifact(tmp_path, "base", "v1")
    assert is_up_to_date(tmp_path, "base", {"k": 1}, None)
    assert not is_up_to_date(tmp_path, "base", {"k": 1}, base)  # built as a root, asked with a parent
    write_artifact(tmp_path, "sft", "s", parent=base)
    assert not is_up_to_date(tmp_path, "sft", {"k": 1}, None)  # built on a parent, asked as a root
    assert not is_up_to_date(tmp_path, "rm", {"k": 1}, None)  # nothing there


def test_the_checksum_names_the_content_not_the_order_of_the_manifest(tmp_path):
    from pipeline.core.artifacts import Artifact

    art = write_artifact(tmp_path, "base", "v1")
    files = art.manifest["files"]
    shuffled = {**art.manifest, "files": dict(reversed(list(files.items())))}
    assert list(shuffled["files"]) != list(files)
    assert Artifact("base", art.path, shuffled).checksum == art.checksum
    changed = {**art.manifest, "files": {**files, "weights.bin": "0" * 64}}
    assert Artifact("base", art.path, changed).checksum != art.checksum


def test_stages_write_into_a_run_folder_that_does_not_exist_yet(tmp_path):
    run = tmp_path / "runs" / "new"
    base = write_artifact(run, "base", "v1")
    write_artifact(run, "sft", "s", parent=base)  # the folder exists now
    assert sorted(p.name for p in run.iterdir()) == ["base", "sft"]


def test_a_live_runs_staging_folder_is_left_alone_and_a_dead_ones_removed(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        for proc in (live, dead):
            (tmp_path / f".base.staging-{proc.pid}").mkdir()
        write_artifact(tmp_path, "base", "v1")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", f".base.staging-{live.pid}"])
        assert live.poll() is None  # probed for life, never signalled
    finally:
        live.kill()
        live.wait()


def test_a_process_of_another_user_counts_as_alive(monkeypatch):
    from pipeline.core import artifacts

    def refuse(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(artifacts.os, "kill", refuse)  # what kill(pid, 0) says of another user's process
    assert artifacts._alive(12345)


def test_the_manifest_names_the_commit_and_marks_local_edits(tmp_path, monkeypatch):
    from pipeline.core.artifacts import git_commit

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never the checkout around /tmp

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == "unknown"  # not a checkout
    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("commit", "-qm", "one")
    sha = git("rev-parse", "HEAD")
    assert git_commit(tmp_path) == sha
    (tmp_path / "notes.txt").write_text("untracked files are not edits")
    assert git_commit(tmp_path) == sha
    (tmp_path / "f.py").write_text("a = 2\n")
    assert git_commit(tmp_path) == sha + "-dirty"
