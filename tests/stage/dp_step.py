"""One RL optimizer step on a fixed rollout, in 1 process (all 8 rows) or 2 (4 rows each).

Run by test_two_processes_on_half_the_rows_give_the_update_of_one_process under accelerate:
the 1-process run samples the rollout and saves it; the 2-process run loads the same rollout,
so both steps see identical data and advantages. Each saves its trainable weights.
With a third argument `nan`, process 1's advantages are NaN (its loss alone is non-finite); with
`health`, rank 0 alone has a KL spike and both ranks run the health check; with `corr`, scores
equal lengths over both ranks' rows while rank 1's own lengths are all equal (its own correlation
is 0), and both ranks run the health check; with
`ptx`, the step is PPO-ptx's, 4 pretraining windows in all (4 in one process, 2 in each of two);
with `grpo`, GRPO's (two groups of 4). Each process computes its rows' advantages itself, so PPO's
whitening and GRPO's batch std must be taken over both processes' rows.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.core.runtime import close_process_group  # noqa: E402
from pipeline.rl import health  # noqa: E402
from pipeline.rl.rollout import Rollout  # noqa: E402
from stages.ppo import ptx_batches  # noqa: E402
from tests.stage.test_ppo_stage import build, rollout  # noqa: E402

out = Path(sys.argv[1])
world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
rows = 8 // world
ptx, grpo = sys.argv[2:] == ["ptx"], sys.argv[2:] == ["grpo"]
extra = ["algorithm=ppo_ptx", f"ppo.ptx_batch_size={4 // world}", "ppo.ptx_block_size=32"] if ptx else []
extra += ["algorithm=grpo", "algorithm.scale_by_std=batch"] if grpo else []
cfg, model, fmt, trainer = build(["ppo.ppo_epochs=1", f"ppo.rollout_batch_size={rows}", f"ppo.minibatch_size={rows}",
                                  "ppo.micro_batch_size=2", *extra])
if ptx:
    trainer.ptx = ptx_batches(cfg, fmt)
if world == 1:
    r = rollout(trainer)
    torch.save(vars(r), out / "rollout.pt")
else:
    r = Rollout(**torch.load(out / "rollout.pt"))
rank = trainer.acc.process_index
mine = r.select(torch.arange(rank * rows, (rank + 1) * rows))
# The advantages of this process's rows, from this process (the saved rollout's are of all rows): GAE's
# whitening and GRPO's batch std must be taken over both processes' rows.
trainer._advantages(mine)
if sys.argv[2:] == ["nan"] and rank == 1:
    mine.advantages[:] = float("nan")
HEALTH = {"health": ("kl_token_max", 10.0), "corr": ("length_reward_corr", 0.9)}
if sys.argv[2:3] and sys.argv[2] in HEALTH:  # each rank must judge the pooled rollout and both stop
    if sys.argv[2] == "health" and rank == 0:  # a KL spike on rank 0 alone
        mine.kl[0, 0] = 50.0
    if sys.argv[2] == "corr":  # score = length in the pooled rollout; rank 1's own lengths are all 2
        n = torch.tensor([2, 3, 4, 5]) if rank == 0 else torch.full((rows,), 2)
        mine.response_mask = (torch.arange(mine.response_mask.shape[1])[None] < n[:, None]).to(mine.response_mask)
        mine.scores = n.to(mine.scores)
    name, limit = HEALTH[sys.argv[2]]
    try:
        health.check(trainer._rollout_metrics(mine), {name: limit}, [name], 1, print)
    except PipelineError as e:
        print(f"rank {rank} stopped: {e}", flush=True)
        raise SystemExit(3)
try:
    trainer.train_step(mine)
except FloatingPointError as e:
    print(f"rank {rank} stopped: {e}", flush=True)
    raise SystemExit(3)
trainer.check_replicas_in_sync()
if trainer.acc.is_main_process:
    torch.save(model.trainable_state(), out / f"weights-{world}.pt")
close_process_group()
