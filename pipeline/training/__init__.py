"""What the TRL-trainer stages (SFT, RM, DPO) share: trainer arguments, the NaN guard, resume
checkpoints, and reward-model training. May import ``core``, ``data``, ``generation`` and ``models``."""
