"""A separate virtualenv with TRL 1.12.0 for the PPO baseline (bench/trl_baseline.py).

TRL 1.12.0 is the last release with `trl.experimental.ppo.PPOTrainer`; the project pins a newer
TRL that has none, so the baseline cannot run in the project's .venv. This env holds TRL 1.12.0
and, for everything the comparison depends on, the exact versions in constraints.txt, so the two
sides differ only in the PPO implementation.

    .venv/bin/python bench/trl_env.py      # create bench/.venv-trl112 (no-op when up to date)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

TRL_REQUIREMENT = "trl==1.12.0"
# Taken at the project's pinned version. trl 1.12's own Requires-Dist (accelerate, datasets,
# jinja2, packaging, transformers) needs nothing beyond these and their dependencies; peft is
# optional there (`peft_config`), and the baseline uses it.
PINNED = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers")
VENV = Path("bench") / ".venv-trl112"


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _read_constraints(root: Path) -> list[str]:
    lines = (root / "constraints.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def requirements(root: Path) -> list[str]:
    """trl==1.12.0 plus the project's exact pins of PINNED, in PINNED's order."""
    pins = {_canonical(line.split("==")[0]): line for line in _read_constraints(root) if "==" in line}
    missing = [name for name in PINNED if name not in pins]
    if missing:
        raise SystemExit(f"constraints.txt pins none of {missing}")
    return [TRL_REQUIREMENT] + [pins[name] for name in PINNED]


def ensure_trl_env(root: Path) -> Path:
    """Create root/bench/.venv-trl112 once; return its python.

    The stamp file holds the requirement list it was built from: when it matches, nothing runs;
    when constraints.txt moved a pin, the env is rebuilt from scratch.
    """
    venv = root / VENV
    python = venv / "bin" / "python"
    stamp = venv / ".installed-stamp"
    reqs = requirements(root)
    wanted = "\n".join(reqs) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        print(f"[trl-env] up to date: {venv}", flush=True)
        return python

    start = time.perf_counter()
    print(f"[trl-env] creating {venv} for: {' '.join(reqs)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    # The project's constraints pin the project's own (newer) trl, which would contradict
    # trl==1.12.0; every other line still applies so transitive deps (numpy, huggingface_hub,
    # pandas, ...) match the project too.
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(line for line in _read_constraints(root)
                                     if _canonical(line.split("==")[0]) != "trl") + "\n")
    print("[trl-env] installing (torch resolves to the local CPU wheel via pip's find-links)", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-c", str(constraints), *reqs], check=True)
    subprocess.run([str(python), "-c", "import trl.experimental.ppo, torch, transformers, peft; "
                    "print('[trl-env] ok: trl', trl.__version__, 'torch', torch.__version__, "
                    "'transformers', transformers.__version__, 'peft', peft.__version__)"], check=True)
    stamp.write_text(wanted)  # last, so an interrupted build is redone next time
    print(f"[trl-env] built in {time.perf_counter() - start:.0f}s", flush=True)
    return python


if __name__ == "__main__":
    ensure_trl_env(Path(__file__).resolve().parent.parent)
