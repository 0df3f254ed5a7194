"""One RL loop for language models, several advantage estimators (Ouyang et al. 2022; Ziegler et al.
2019; Ahmadian et al. 2024; Shao et al. 2024; Hu 2025), on accelerate.

One *update* is: roll out a batch of responses (k per prompt for the group estimators), score
them, turn scores and the per-token KL into advantages with the configured estimator, then run
``ppo_epochs`` passes over shuffled minibatches with exactly one optimizer step per minibatch.
Every estimator feeds the same clipped surrogate; only the advantage changes:

    gae           PPO: value adapter + head, GAE(gamma, lambda), whitened advantages
    rloo          A_i = R_i - mean of the other k - 1 samples' rewards
    grpo          A_i = (s_i - mean_g s) / std - beta (KL_i - mean_g KL), std the batch's or the group's
                  (Dr.GRPO: no std, constant normaliser; estimators.sequence_advantages)
    reinforce_pp  per-token return-to-go, normalised over the batch
    dpo           online DPO: A_i = sum of beta sigmoid(-h_ij) over the group's samples j it beat,
                  minus the same over those that beat it (estimators.online_dpo_advantages)

The KL to the SFT reference goes into the reward (k1/k3 of the rollout policy, Ziegler et al.),
into the loss (k3 of the current policy, with gradient, as in the GRPO paper), or nowhere (online
DPO, whose pairwise logit holds the reference): ``algorithm.kl_in``.
Each estimator may start from its own beta (``algorithm.kl_coef``; null: ``ppo.kl.init_coef``).

A minibatch is split into micro-batches (``ppo.micro_batch_size``) whose gradients accumulate,
so peak memory follows the micro-batch. Data parallel: each process rolls out its own prompts;
every token mean (loss, whitening, statistics) is over all processes' valid tokens, gradients
are summed in buckets, and before anything can raise, every process agrees whether the losses
were finite, so one bad process never leaves the others waiting in an all-reduce.

Shapes: ``B`` rollouts, ``P`` prompt tokens (left-padded), ``T`` response tokens.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from pipeline.data.chat import ChatFormat
from pipeline.generation.decoding import decode_responses
from pipeline.generation.stops import ends_with_stop
from pipeline.rl.batching import count_optimizer_steps, minibatch_indices
from pipeline.rl.estimators import (
    equal_reward_groups,
    gae,
    online_dpo_advantages,
    group_centred,
    returns_to_go,
    sequence_advantages,
    shape_rewards,
)
from pipeline.rl.health import pearson
from pipeline.rl.kl import kl_per_token, make_kl_controller
from pipeline.rl.losses import loss_weights, policy_loss, value_loss
from pipeline.rl.masked import masked_mean, masked_whiten
from pipeline.rl.rewards import sharpening
from pipeline.rl.rollout import Rollout, by_length, concat, pack
from pipeline.rl.shared_model import SharedBaseActorCritic
from pipeline.rl.static_sampler import RolloutSampler, sampler_kind

RewardFn = Callable[[list, list[str], torch.Tensor], torch.Tensor]
BUCKET_BYTES = 25 << 20  # gradient all-reduce bucket, as DDP's default
FOLD_SHARE = 0.1  # ppo.fold_adapters=auto: an adapter's share of a layer's FLOPs above which folding pays


def folds(mode: str, lora_share: float, base_dtype: torch.dtype) -> bool:
    """Whether ``ppo.fold_adapters=mode`` runs the roles through folded weight copies. ``auto`` folds
    only an fp32 base: a 16-bit copy of ``W + s B A`` rounds the adapter's small delta to W's grid
    (8 bits of mantissa in bf16), and the policy gradient through it moved ~3x further from fp32's
    than the unfolded bf16 LoRA products' did (tests/stage/test_bf16_fold.py). ``always`` folds anyway."""
    return mode == "always" or (mode == "auto" and lora_share >= FOLD_SHARE and base_dtype == torch.float32)


class RLTrainer:
    """The RL loop over a SharedBaseActorCritic: rollout, advantages, update. Stateless apart from
    the optimizer, scheduler, KL controller, counters and the minibatch shuffle."""

    def __init__(self, model: SharedBaseActorCritic, fmt: ChatFormat, cfg, algorithm, accelerator,
                 reward_fn: RewardFn, ptx: Optional["PtxBatches"] = None, sharpen=None):
        self.model, self.fmt, self.cfg, self.alg, self.acc = model, fmt, cfg, algorithm, accelerator
        self.reward_fn, self.ptx = reward_fn, ptx
        self.sharpen = sharpen if sharpen is not None and sharpen.coef else None  # reward.sharpen; None: off
        self.critic = algorithm.advantage == "gae"
        self.stops = torch.tensor(fmt.stop_ids)
        beta = cfg.kl.init_coef if algorithm.kl_coef is None else algorithm.kl_coef  # per estimator: see grpo.yaml
        self.kl_ctl = make_kl_controller(cfg.kl.controller, beta, cfg.kl.target, cfg.kl.horizon)
        # Prepared by accelerate: under fp16 it owns the loss scaler and skips inf steps. Fused: one
        # kernel over every LoRA tensor instead of ~10 small ops per tensor (~110 tensors on the
        # tiny model: a step 2.5x faster on CPU).
        self.optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(
            model.trainable, lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
            fused=model.device.type in ("cpu", "cuda") or None))
        self.steps_per_update = count_optimizer_steps(cfg.rollout_batch_size, cfg.minibatch_size, cfg.ppo_epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.update = 0  # finished updates
        self.episodes = 0  # responses generated, all processes
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        model.gradient_checkpointing(cfg.gradient_checkpointing)
        if folds(cfg.fold_adapters, model.lora_share(), model.peft.get_base_model().dtype):
            model.fold_adapters()
        self.sampler = RolloutSampler(sampler_kind(cfg.sampler, model.peft), fmt)

    def _lr_lambda(self, step: int) -> float:
        """Linear warm-up, then the configured decay over every optimizer step of the run."""
        total = self.cfg.total_updates * self.steps_per_update
        warm = self.cfg.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if self.cfg.lr_schedule == "constant":
            return 1.0
        if self.cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1 + math.cos(math.pi * progress))  # cosine (the config check allows no other)

    # --- distributed helpers ------------------------------------------------------------

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over processes (the identity with one process)."""
        return self.acc.reduce(x, reduction="sum") if self.acc.num_processes > 1 else x

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` concatenated along dim 0, in rank order (``x`` with one process)."""
        return self.acc.gather(x) if self.acc.num_processes > 1 else x

    def _mean(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean over all processes' (valid) elements."""
        return masked_mean(x, torch.ones_like(x) if mask is None else mask, all_reduce=self._sum)

    # --- rollout ----------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, prompts: list, conversations: list[list[dict]]) -> tuple[Rollout, list[str]]:
        """Sample and score responses (``prompts`` as given, ``conversations`` as messages), then
        compute the KL and the advantages; all without grad."""
        self.model.eval()  # dropout off everywhere: the ratio must be exactly 1 at the start
        n = self.cfg.generation_batch_size
        self.sample_seconds = 0.0
        chunks = [self._rollout_chunk(prompts[i:i + n], conversations[i:i + n])
                  for i in range(0, len(prompts), n)]
        r = concat([c[0] for c in chunks], self.fmt.pad_id)
        texts = [t for c in chunks for t in c[1]]
        r.kl = kl_per_token(r.logprobs, r.ref_logprobs, self.cfg.kl.estimator) * r.response_mask
        self._advantages(r)
        return r, texts

    def _rollout_chunk(self, prompts: list, conversations: list[list[dict]]) -> tuple[Rollout, list[str]]:
        with self.acc.autocast():
            t0 = time.perf_counter()
            with self.model.sampling() as policy:
                q_ids, q_mask, resp, mask, logprobs, entropy = self.sampler(
                    policy, conversations, self.cfg.temperature, self.cfg.max_new_tokens)
            self.sample_seconds += time.perf_counter() - t0
            ref = torch.zeros_like(logprobs)
            values = torch.zeros_like(logprobs) if self.critic else None
            rm_scores = torch.zeros(len(prompts), device=logprobs.device)
            for idx in by_length(q_mask, mask, self.cfg.micro_batch_size):  # scoring passes, short rows together
                ri, rmask = resp[idx], mask[idx]
                p = pack(q_ids[idx], q_mask[idx], ri, rmask, self.fmt.pad_id, self.model.packs_rows,
                         self.model.attention_cost)
                if self.cfg.old_logprobs == "recompute":  # the exact path: a full pass, as in training
                    logprobs[idx] = self.model.logprobs(p, ri, self.cfg.temperature) * rmask
                ref[idx] = self.model.logprobs(p, ri, self.cfg.temperature, adapter="ref") * rmask
                if self.critic:
                    values[idx] = self.model.response_values(p) * rmask
                rm_scores[idx] = self.model.response_scores(p).float()
        texts = decode(self.fmt, resp, mask)
        scores = self.reward_fn(prompts, texts, rm_scores)
        if self.sharpen:
            scores = scores + sharpening(ref, mask, self.sharpen.coef, self.sharpen.per_token)
        if self.cfg.missing_eos_penalty is not None:
            ended = ends_with_stop(resp, mask, self.stops.to(resp.device))
            scores = torch.where(ended, scores, scores - self.cfg.missing_eos_penalty)
        return Rollout(q_ids, q_mask, resp, mask, logprobs, ref, entropy, scores, rm_scores, values), texts

    def _advantages(self, r: Rollout) -> None:
        """Fill ``r.advantages`` (and ``r.returns`` with a critic) for the configured estimator."""
        beta, mask, k = self.kl_ctl.value, r.response_mask, self.alg.samples_per_prompt
        in_reward = self.alg.kl_in == "reward"
        if self.alg.advantage in ("gae", "reinforce_pp"):
            scores = group_centred(r.scores, k) if self.alg.advantage == "reinforce_pp" and \
                self.alg.group_baseline else r.scores
            rewards, _, _ = shape_rewards(scores, r.logprobs, r.ref_logprobs, mask,
                                               beta if in_reward else 0.0, self.cfg.kl.estimator)
            if self.critic:
                adv, r.returns = gae(rewards, r.values, mask, self.cfg.gamma, self.cfg.lam)
            else:
                adv = returns_to_go(rewards, mask)
            r.advantages = masked_whiten(adv, mask, all_reduce=self._sum)
            return
        if self.alg.advantage == "dpo":
            rho = ((r.logprobs - r.ref_logprobs) * mask).sum(1)
            r.advantages = online_dpo_advantages(r.scores, rho, beta, k)[:, None] * mask
            return
        seq_kl = r.kl.sum(1) if in_reward else torch.zeros_like(r.scores)
        adv = sequence_advantages(self.alg.advantage, r.scores, seq_kl, beta, k, self.alg.scale_by_std,
                                  all_reduce=self._sum)
        r.advantages = adv[:, None] * mask

    # --- update -------------------------------------------------------------------------

    def train_step(self, r: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled minibatches; one optimizer step per minibatch."""
        self.model.train(self.cfg.gradient_checkpointing)  # eval unless checkpointing needs train mode
        stats: dict[str, list[torch.Tensor]] = {}
        steps, first = 0, None
        for _ in range(self.cfg.ppo_epochs):
            epoch_kl = []
            for idx in minibatch_indices(r.response_ids.shape[0], self.cfg.minibatch_size, self.shuffle):
                s = self._minibatch_step(r.select(idx), ptx_step=steps)
                first = first if first is not None else s
                steps += 1
                for key, v in s.items():
                    stats.setdefault(key, []).append(v)
                epoch_kl.append(s["approxkl"])
            # Target-KL early stop: the policy moved too far from the rollout policy.
            if self.cfg.target_kl is not None and torch.stack(epoch_kl).mean() > self.cfg.target_kl:
                break
        self.model.eval()
        out = {key: torch.stack(v).mean().item() for key, v in stats.items()}
        out["optimizer_steps"] = steps
        out["logprob_gap_first"] = first["logprob_gap"].item()  # before any step: ~0
        out["ratio_first"] = first["ratio"].item()  # before any step: 1
        return out

    def _minibatch_step(self, mb: Rollout, ptx_step: int) -> dict[str, torch.Tensor]:
        """One optimizer step on a minibatch, accumulated over its micro-batches. Returns the
        minibatch's statistics over all processes."""
        # Micro-batches of similar lengths, each trimmed of its own padding: the same loss (a sum over
        # micro-batches with shared normalisers), far fewer padded positions.
        micro = [mb.select(idx) for idx in by_length(mb.query_mask, mb.response_mask, self.cfg.micro_batch_size)]
        # Normalisers over the whole minibatch on every process, so that splitting it never
        # changes the loss: sum(w * l) / sum(units).
        weights = [loss_weights(m.response_mask, self.alg.loss_agg, self.cfg.max_new_tokens) for m in micro]
        units = self._sum(torch.stack([u for _, u in weights]).sum())
        tokens = self._sum(mb.response_mask.sum())
        self.optimizer.zero_grad(set_to_none=True)
        finite, sums = True, {}
        for m, (w, _) in zip(micro, weights):
            for loss, parts in self._micro_losses(m.trimmed(), w, units, tokens):
                # One backward per term (policy, then value): the gradient of the sum, with one
                # role's activations alive at a time.
                finite = finite and bool(torch.isfinite(loss))
                if finite:
                    self.acc.backward(loss)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
        if self.ptx is not None and finite:
            loss = self._ptx_loss(ptx_step)
            finite = bool(torch.isfinite(loss))
            if finite:  # each process holds 1/N of the global ptx batch and gradients are summed
                self.acc.backward(self.alg.ptx_coef * loss / self.acc.num_processes)
            sums["ptx_loss"] = loss.detach() / self.acc.num_processes
        self._agree_finite(finite)
        self._sum_gradients()
        self.acc.clip_grad_norm_(self.model.trainable, self.cfg.max_grad_norm)  # unscales fp16 first
        self.optimizer.step()
        self.model.refold()  # the trained adapters' folded copies (ppo.fold_adapters)
        self.scheduler.step()
        return dict(zip(sums, self._sum(torch.stack(list(sums.values())))))

    def _micro_losses(self, m: Rollout, w: torch.Tensor, units: torch.Tensor, tokens: torch.Tensor):
        """The micro-batch's share of the minibatch loss, policy term then value term, each with its
        share of the statistics: summed over micro-batches and processes, each is the minibatch's."""
        p = pack(m.query_ids, m.query_mask, m.response_ids, m.response_mask, self.fmt.pad_id,
                 self.model.packs_rows, self.model.attention_cost)
        w, share = w[:, : m.response_ids.shape[1]], m.response_mask.sum() / tokens
        with self.acc.autocast():
            coef = self.alg.entropy_coef
            logp, entropy = self.model.logprobs(p, m.response_ids, self.cfg.temperature, with_entropy=True) \
                if coef else (self.model.logprobs(p, m.response_ids, self.cfg.temperature), None)
            pg, stats = policy_loss(logp, m.logprobs, m.advantages, m.response_mask, self.cfg.clip_range)
            loss = (w * pg).sum() / units
            parts = {key: v * share for key, v in stats.items()}  # masked means -> shares of the mean
            parts["pg_loss"] = loss.detach()
            if coef:  # PPO's entropy term, aggregated as the policy loss: - coef * H(pi(. | s_t))
                entropy_loss = (w * entropy).sum() / units
                loss = loss - coef * entropy_loss
                parts["entropy_loss"] = entropy_loss.detach()
            if self.alg.kl_in == "loss":  # GRPO: k3(pi || pi_ref) with gradient, per token
                kl = kl_per_token(logp, m.ref_logprobs, "k3") * m.response_mask
                kl_loss = (w * kl).sum() / units
                loss = loss + self.kl_ctl.value * kl_loss
                parts["kl_loss"] = kl_loss.detach()
        yield loss, parts
        if self.critic:
            with self.acc.autocast():
                values = self.model.response_values(p)
                vf, vstats = value_loss(values, m.values, m.returns, m.response_mask, self.cfg.clip_range_value)
                vf_loss = vf.sum() / tokens
            yield self.cfg.vf_coef * vf_loss, {"vf_loss": vf_loss.detach(), "vf_clipfrac": vstats["clipfrac"] * share}

    def _ptx_loss(self, step: int) -> torch.Tensor:
        """PPO-ptx (InstructGPT eq. 2): mean negative log-likelihood of a pretraining batch."""
        x = self.ptx.batch(self.update, step, self.acc.process_index, self.acc.num_processes).to(self.model.device)
        with self.acc.autocast():
            return -self.model.sequence_logprobs(x).mean()

    def _agree_finite(self, finite: bool) -> None:
        """Every process learns whether any process saw a non-finite loss, and all stop together."""
        bad = self._sum(torch.tensor([0.0 if finite else 1.0], device=self.model.device))
        if bad.item() > 0:
            raise FloatingPointError(
                f"the RL loss became non-finite at update {self.update + 1} (on {int(bad.item())} of "
                f"{self.acc.num_processes} processes); nothing was saved past the last checkpoint. Lower "
                "ppo.learning_rate or ppo.kl.init_coef, or raise ppo.minibatch_size.")

    def _sum_gradients(self) -> None:
        """Sum gradients over processes in ~25 MB buckets (the loss is already divided by the
        global counts). A missing gradient is sent as zeros so every process sends the same buckets."""
        if self.acc.num_processes == 1:
            return
        grads = []
        for p in self.model.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bucket, size = [], 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= BUCKET_BYTES):
                flat = torch._utils._flatten_dense_tensors(bucket)
                dist.all_reduce(flat)
                for old, new in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                    old.copy_(new)
                bucket, size = [], 0

    def check_replicas_in_sync(self) -> None:
        """Data-parallel copies must hold identical weights; a drift means a broken gradient sync."""
        if self.acc.num_processes == 1:
            return
        with torch.no_grad():
            mine = torch.stack([sum(p.float().sum() for p in self.model.trainable),
                                sum(p.float().square().sum() for p in self.model.trainable)])
        every = self.acc.gather(mine.reshape(1, 2))
        if not torch.allclose(every, every[:1].expand_as(every), rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"data-parallel replicas diverged: weight fingerprints {every.tolist()}")

    # --- one full update ------------------------------------------------------------------

    def step(self, prompts: list, conversations: list[list[dict]]) -> tuple[dict[str, float], Rollout, list[str]]:
        t0 = time.perf_counter()
        r, texts = self.rollout(prompts, conversations)
        t1 = time.perf_counter()
        train = self.train_step(r)
        t2 = time.perf_counter()
        metrics = self._rollout_metrics(r)
        metrics.update({
            "policy/approxkl_avg": train["approxkl"], "policy/clipfrac_avg": train["clipfrac"],
            "policy/ratio": train["ratio"], "loss/policy_avg": train["pg_loss"],
            "ppo/optimizer_steps": train["optimizer_steps"], "ppo/lr": self.scheduler.get_last_lr()[0],
            "objective/kl_coef": self.kl_ctl.value, "time/rollout": t1 - t0, "time/update": t2 - t1,
            "time/sample": self.sample_seconds,
            "health/logprob_gap": train["logprob_gap_first"],
        })
        if self.critic:
            metrics.update({"loss/value_avg": train["vf_loss"], "val/clipfrac_avg": train["vf_clipfrac"]})
        if "kl_loss" in train:
            metrics["loss/kl_avg"] = train["kl_loss"]
        if "ptx_loss" in train:
            metrics["loss/ptx_avg"] = train["ptx_loss"]
        if "entropy_loss" in train:
            metrics["loss/entropy_avg"] = train["entropy_loss"]
        # Ziegler et al.: adapt the KL coefficient to the sequence-level KL just observed.
        self.kl_ctl.update(metrics["objective/kl"], self.cfg.rollout_batch_size * self.acc.num_processes)
        self.update += 1
        self.episodes += self.cfg.rollout_batch_size * self.acc.num_processes
        metrics.update({"ppo/update": self.update, "ppo/episodes": self.episodes})
        return metrics, r, texts

    def _rollout_metrics(self, r: Rollout) -> dict[str, float]:
        seq_kl = r.kl.sum(1)  # sequence-level KL; persistently negative k1 means a bug
        ended = ends_with_stop(r.response_ids, r.response_mask, self.stops.to(r.response_ids.device)).float()
        lengths = r.response_mask.sum(1)
        in_reward = self.alg.kl_in == "reward"
        non_score = -self.kl_ctl.value * seq_kl if in_reward else torch.zeros_like(seq_kl)
        out = {
            "objective/kl": self._mean(seq_kl).item(),
            "objective/entropy": self._mean(r.entropy.sum(1)).item(),
            "objective/non_score_reward": self._mean(non_score).item(),
            "objective/rlhf_reward": self._mean(r.scores + non_score).item(),
            "objective/scores": self._mean(r.scores).item(),
            "objective/rm_scores": self._mean(r.rm_scores).item(),
            "objective/ref_logprob": self._mean((r.ref_logprobs * r.response_mask).sum(1)).item(),
            "rollout/response_length": self._mean(lengths).item(),
            "rollout/prompt_length": self._mean(r.query_mask.sum(1).float()).item(),
            "rollout/eos_rate": self._mean(ended).item(),
            "health/truncation_rate": 1.0 - self._mean(ended).item(),
            # Over every process's rollout, so that all processes see one value and a health abort
            # stops them together (a rank that raised alone would leave the others waiting).
            "health/length_reward_corr": pearson(self._gather(lengths), self._gather(r.scores)),
            "health/kl_token_max": self._gather(r.kl.masked_fill(~r.response_mask.bool(), -math.inf).amax()[None])
            .max().item(),
        }
        if self.alg.samples_per_prompt > 1:
            out["health/equal_reward_groups"] = equal_reward_groups(r.scores, self.alg.samples_per_prompt).item()
        if self.critic:
            out["val/mean"] = self._mean(r.values, r.response_mask).item()
        return out

    # --- checkpoint state ----------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "kl_controller": self.kl_ctl.state_dict(), "update": self.update,
                "episodes": self.episodes, "shuffle_rng": self.shuffle.get_state(),
                "grad_scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.update, self.episodes = state["update"], state["episodes"]
        self.shuffle.set_state(state["shuffle_rng"])
        if state["grad_scaler"] is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["grad_scaler"])


def decode(fmt: ChatFormat, response_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return decode_responses(fmt, response_ids.cpu(), mask.cpu())


class PtxBatches:
    """Pretraining batches for PPO-ptx: random windows of a packed token stream. Every process draws
    the same global batch of ``batch_size x N`` windows from a generator seeded by (seed, update,
    step) and takes its own slice, so N processes see N different batches, their union is what one
    process with N times the batch would see, and a resumed run sees the same batches."""

    def __init__(self, stream: torch.Tensor, block_size: int, batch_size: int, seed: int):
        if len(stream) <= block_size + 1:
            raise ValueError(f"the ptx corpus has {len(stream)} tokens, fewer than ppo.ptx_block_size + 2")
        self.stream, self.block, self.batch_size, self.seed = stream, block_size, batch_size, seed

    def batch(self, update: int, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """(batch_size, block_size) token ids: process ``rank``'s slice of the global batch."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + update * 1_009 + step)
        starts = torch.randint(0, len(self.stream) - self.block, (self.batch_size * world,), generator=gen)
        mine = starts[rank * self.batch_size: (rank + 1) * self.batch_size]
        return torch.stack([self.stream[s: s + self.block] for s in mine])
