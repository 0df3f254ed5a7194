"""The RL stage (PPO, RLOO, GRPO, REINFORCE++): pure estimators, losses, KL and log-prob math, then
rollout, the shared-base actor-critic, the trainer, checkpoints, health and rewards. May import
``core``, ``data``, ``models`` and ``generation``; never ``world`` (the gold reward lives there)."""
