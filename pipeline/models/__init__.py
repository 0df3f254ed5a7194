"""Models: loading causal LMs and tokenizers with LoRA adapters, a stage's policy, and the reward
model on the SFT backbone. May import ``core``, ``data`` and
``generation``."""
