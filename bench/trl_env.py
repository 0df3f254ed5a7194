"""Separate virtualenvs with a fixed TRL release for the baselines, one per release:

    trl 1.12.0 -> bench/.venv-trl112   PPO baseline (bench/trl_baseline.py): 1.12.0 is the last release
                                        with `trl.experimental.ppo.PPOTrainer`, which the project's TRL lacks
    trl 1.16.0 -> bench/.venv-trl116   GRPO baseline (bench/trl_grpo_baseline.py): `trl.GRPOTrainer`

A baseline never runs in the project's .venv (even where the project pins the same TRL): its env
holds only the TRL release and, for everything the comparison depends on, the exact versions in
constraints.txt, so the two sides differ only in the RL implementation.

    .venv/bin/python bench/trl_env.py              # create bench/.venv-trl112 (no-op when up to date)
    .venv/bin/python bench/trl_env.py 1.16.0       # create bench/.venv-trl116
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

# Release -> the import that proves the env holds what its baseline needs.
RELEASES = {
    "1.12.0": "import trl.experimental.ppo",
    "1.16.0": "from trl import GRPOConfig, GRPOTrainer",
}
DEFAULT = "1.12.0"
# Taken at the project's pinned version. trl's own Requires-Dist (1.12: accelerate, datasets, jinja2,
# packaging, transformers; 1.16 adds huggingface_hub, numpy, pandas, psutil, pyarrow, pyyaml, which the
# constraints file pins too) needs nothing beyond these and their dependencies; peft is optional there
# (`peft_config`), and both baselines use it.
PINNED = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers")
VENV = Path("bench") / ".venv-trl112"  # the PPO baseline's env (kept under its old name)


def venv_path(version: str = DEFAULT) -> Path:
    """bench/.venv-trl<major><minor>, relative to the project root: 1.16.0 -> bench/.venv-trl116."""
    major, minor = version.split(".")[:2]
    return Path("bench") / f".venv-trl{major}{minor}"


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _read_constraints(root: Path) -> list[str]:
    lines = (root / "constraints.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def requirements(root: Path, version: str = DEFAULT) -> list[str]:
    """trl==<version> plus the project's exact pins of PINNED, in PINNED's order."""
    if version not in RELEASES:
        raise SystemExit(f"no baseline env for trl {version}: one of {sorted(RELEASES)}")
    pins = {_canonical(line.split("==")[0]): line for line in _read_constraints(root) if "==" in line}
    missing = [name for name in PINNED if name not in pins]
    if missing:
        raise SystemExit(f"constraints.txt pins none of {missing}")
    return [f"trl=={version}"] + [pins[name] for name in PINNED]


def ensure_trl_env(root: Path, version: str = DEFAULT) -> Path:
    """Create root/bench/.venv-trl<version> once; return its python.

    The stamp file holds the requirement list it was built from: when it matches, nothing runs;
    when constraints.txt moved a pin, the env is rebuilt from scratch.
    """
    venv = root / venv_path(version)
    python = venv / "bin" / "python"
    stamp = venv / ".installed-stamp"
    reqs = requirements(root, version)
    wanted = "\n".join(reqs) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        print(f"[trl-env] up to date: {venv}", flush=True)
        return python

    start = time.perf_counter()
    print(f"[trl-env] creating {venv} for: {' '.join(reqs)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    # The project's constraints pin the project's own trl, which would contradict (or, for the same
    # release, merely repeat) trl==<version>; every other line still applies so transitive deps
    # (numpy, huggingface_hub, pandas, ...) match the project too.
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(line for line in _read_constraints(root)
                                     if _canonical(line.split("==")[0]) != "trl") + "\n")
    print("[trl-env] installing (torch resolves to the local CPU wheel via pip's find-links)", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-c", str(constraints), *reqs], check=True)
    subprocess.run([str(python), "-c", f"{RELEASES[version]}; import trl, torch, transformers, peft; "
                    "print('[trl-env] ok: trl', trl.__version__, 'torch', torch.__version__, "
                    "'transformers', transformers.__version__, 'peft', peft.__version__)"], check=True)
    stamp.write_text(wanted)  # last, so an interrupted build is redone next time
    print(f"[trl-env] built in {time.perf_counter() - start:.0f}s", flush=True)
    return python


if __name__ == "__main__":
    ensure_trl_env(Path(__file__).resolve().parent.parent, *(sys.argv[1:2] or [DEFAULT]))
