"""The small core every package may import: errors, artifacts, run identity, runtime helpers,
W&B tracking and config range checks. It imports nothing of ours but itself."""
