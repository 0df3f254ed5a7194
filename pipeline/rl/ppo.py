"""PPO for language models (Ouyang et al. 2022; Ziegler et al. 2019), on accelerate.

One PPO *update* is: roll out a batch of responses, score them, turn scores and
per-token KL into rewards, estimate advantages with GAE, then run ``ppo_epochs`` passes
over shuffled minibatches with exactly one optimizer step per minibatch.

Shapes: ``B`` rollouts, ``P`` prompt tokens (left-padded), ``T`` response tokens
(right-padded after the first EOS), ``L = P + T``.

Data parallel: each process rolls out its own share of prompts; gradients are averaged
across processes before every optimizer step, and every statistic that feeds the loss or
the logs (whitening, KL, scores) is computed over all processes' valid tokens. The loss
itself is a mean over all processes' valid tokens too, not a mean of per-process means.

Mixed precision goes through accelerate: forward passes run under ``accelerator.autocast()``,
the optimizer is prepared (fp16 loss scaling, unscaled before clipping), and the trainable
heads keep fp32 weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from pipeline.generation import DecodingConfig, encode_prompts, generate_ids
from pipeline.rl import core
from pipeline.rl.shared_model import SharedBaseActorCritic
from pipeline.runtime import ConfigError


@dataclass
class Rollout:
    query_ids: torch.Tensor  # (B, P) left-padded prompts
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T) pad after the first EOS
    response_mask: torch.Tensor  # (B, T) float, 1 through the first EOS
    logprobs: torch.Tensor  # (B, T) old policy, logits / T
    ref_logprobs: torch.Tensor  # (B, T) SFT reference, logits / T
    values: torch.Tensor  # (B, T) V of the prefix before each response token
    scores: torch.Tensor  # (B,) total sequence-level score
    rm_scores: torch.Tensor  # (B,) raw RM score
    rewards: torch.Tensor = None  # (B, T)
    kl: torch.Tensor = None  # (B, T)
    advantages: torch.Tensor = None  # (B, T)
    returns: torch.Tensor = None  # (B, T)
    entropy: torch.Tensor = None  # (B, T)

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def full_inputs(r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and response side by side: ids and attention mask, (B, L)."""
    return (torch.cat([r.query_ids, r.response_ids], 1),
            torch.cat([r.query_mask, r.response_mask.to(r.query_mask.dtype)], 1))


def response_slice(x: torch.Tensor, prompt_len: int, resp_len: int) -> torch.Tensor:
    """Positions P-1 .. P+T-2: the outputs that predict response tokens 0..T-1.

    For logits this is next-token prediction; for values it makes V_t the value of the
    prefix *before* response token t, which is what GAE's delta_t = r_t + V_{t+1} - V_t needs.
    """
    return x[:, prompt_len - 1: prompt_len - 1 + resp_len]


def check_config(cfg) -> None:
    """Refuse PPO settings that cannot work, before any model loads. ``cfg`` is the stage config."""
    ppo = cfg.ppo
    positive = {"ppo.total_updates": ppo.total_updates, "ppo.rollout_batch_size": ppo.rollout_batch_size,
                "ppo.generation_batch_size": ppo.generation_batch_size, "ppo.minibatch_size": ppo.minibatch_size,
                "ppo.ppo_epochs": ppo.ppo_epochs, "ppo.max_new_tokens": ppo.max_new_tokens,
                "ppo.temperature": ppo.temperature, "log_every": cfg.log_every, "table_every": cfg.table_every,
                "checkpoint_every": cfg.checkpoint_every, "summary_window": cfg.summary_window}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if ppo.rollout_batch_size % ppo.minibatch_size:
        raise ConfigError(f"ppo.minibatch_size={ppo.minibatch_size} must divide ppo.rollout_batch_size="
                          f"{ppo.rollout_batch_size}: a ragged minibatch would change the number of optimizer steps")
    choices = {"ppo.kl.estimator": (ppo.kl.estimator, core.KL_ESTIMATORS),
               "ppo.kl.controller": (ppo.kl.controller, ("fixed", "adaptive")),
               "ppo.lr_schedule": (ppo.lr_schedule, ("constant", "linear", "cosine")),
               "ppo.value_init": (ppo.value_init, ("rm", "fresh"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
    if ppo.kl.controller == "adaptive" and not (ppo.kl.target and ppo.kl.horizon):
        raise ConfigError("ppo.kl.controller=adaptive needs a positive ppo.kl.target and ppo.kl.horizon")


class PPOTrainer:
    """The PPO loop over a SharedBaseActorCritic. Stateless apart from counters and the KL controller."""

    def __init__(self, model: SharedBaseActorCritic, tokenizer, cfg, accelerator,
                 reward_fn: Callable[[list[str], list[str], torch.Tensor], torch.Tensor]):
        self.model, self.tok, self.cfg, self.acc = model, tokenizer, cfg, accelerator
        self.reward_fn = reward_fn
        self.rollout_decoding = DecodingConfig(
            name="ppo_rollout", do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
            num_beams=1, max_new_tokens=cfg.max_new_tokens)
        self.kl_ctl = core.make_kl_controller(cfg.kl.controller, cfg.kl.init_coef, cfg.kl.target, cfg.kl.horizon)
        # Prepared by accelerate: under fp16 it owns the loss scaler and skips inf steps.
        self.optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(
            model.trainable, lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=cfg.weight_decay))
        self.steps_per_update = core.count_optimizer_steps(cfg.rollout_batch_size, cfg.minibatch_size, cfg.ppo_epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.update = 0  # finished PPO updates
        self.episodes = 0  # responses generated, all processes
        self.shuffle = torch.Generator().manual_seed(cfg.seed)

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
        if self.cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"ppo.lr_schedule must be constant, linear or cosine, got {self.cfg.lr_schedule!r}")

    # --- distributed helpers ------------------------------------------------------------

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over processes (the identity with one process)."""
        return self.acc.reduce(x, reduction="sum") if self.acc.num_processes > 1 else x

    def _mean(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean over all processes' (valid) elements."""
        return core.masked_mean(x, torch.ones_like(x) if mask is None else mask, all_reduce=self._sum)

    # --- rollout ----------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> tuple[Rollout, list[str]]:
        """Sample responses and compute everything the update needs, all without grad."""
        self.model.eval()  # dropout off everywhere: ratio must be exactly 1 at the start
        chunks = [self._rollout_chunk(prompts[i:i + self.cfg.generation_batch_size])
                  for i in range(0, len(prompts), self.cfg.generation_batch_size)]
        r = _concat([c[0] for c in chunks], self.tok.pad_token_id)
        texts = [t for c in chunks for t in c[1]]
        r.kl = core.kl_per_token(r.logprobs, r.ref_logprobs, self.cfg.kl.estimator) * r.response_mask
        r.rewards, _, _ = core.shape_rewards(r.scores, r.logprobs, r.ref_logprobs, r.response_mask,
                                             self.kl_ctl.value, self.cfg.kl.estimator)
        adv, r.returns = core.gae(r.rewards, r.values, r.response_mask, self.cfg.gamma, self.cfg.lam)
        r.advantages = core.masked_whiten(adv, r.response_mask, all_reduce=self._sum)
        return r, texts

    def _rollout_chunk(self, prompts: list[str]) -> tuple[Rollout, list[str]]:
        with self.acc.autocast():
            return self._rollout_chunk_inner(prompts)

    def _rollout_chunk_inner(self, prompts: list[str]) -> tuple[Rollout, list[str]]:
        device, T = self.model.device, self.cfg.temperature
        q_ids, q_mask = (t.to(device) for t in encode_prompts(self.tok, prompts))
        resp, resp_mask = generate_ids(self.model, q_ids, q_mask, self.rollout_decoding, self.tok, None)
        resp_mask = resp_mask.to(torch.float32)
        # Everything after the first EOS becomes padding, masked explicitly.
        resp = torch.where(resp_mask.bool(), resp, torch.full_like(resp, self.tok.pad_token_id))
        P, Tn = q_ids.shape[1], resp.shape[1]
        ids = torch.cat([q_ids, resp], 1)
        mask = torch.cat([q_mask, resp_mask.to(q_mask.dtype)], 1)
        logits = response_slice(self.model.policy_logits(ids, mask), P, Tn).float() / T
        ref_logits = response_slice(self.model.policy_logits(ids, mask, adapter="ref"), P, Tn).float() / T
        values = response_slice(self.model.values(ids, mask), P, Tn).float()
        last = P + core.last_token_index(resp_mask)
        rm_scores = self.model.scores(ids, mask, last).float()
        texts = self.tok.batch_decode(resp, skip_special_tokens=True)
        scores = self.reward_fn(prompts, texts, rm_scores)
        if self.cfg.missing_eos_penalty is not None:
            ended = core.has_eos(resp, resp_mask, self.tok.eos_token_id)
            scores = torch.where(ended, scores, scores - self.cfg.missing_eos_penalty)
        r = Rollout(q_ids, q_mask, resp, resp_mask,
                    core.logprobs_from_logits(logits, resp), core.logprobs_from_logits(ref_logits, resp),
                    values * resp_mask, scores, rm_scores)
        r.entropy = core.entropy_from_logits(logits) * resp_mask
        return r, [t.strip() for t in texts]

    # --- update -------------------------------------------------------------------------

    def train_step(self, r: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled minibatches; one optimizer step per minibatch."""
        self.model.eval()
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in
                                                 ("pg_loss", "vf_loss", "approxkl", "clipfrac", "ratio", "vf_clipfrac")}
        steps = 0
        for _ in range(self.cfg.ppo_epochs):
            epoch_kl = []
            for idx in core.minibatch_indices(r.response_ids.shape[0], self.cfg.minibatch_size, self.shuffle):
                s = self._minibatch_step(r.select(idx))
                steps += 1
                for k, v in s.items():
                    stats[k].append(v)
                epoch_kl.append(s["approxkl"])
            # Target-KL early stop: the policy moved too far from the rollout policy.
            if self.cfg.target_kl is not None and self._mean(torch.stack(epoch_kl)) > self.cfg.target_kl:
                break
        out = {k: self._mean(torch.stack(v)).item() for k, v in stats.items() if v}
        out["optimizer_steps"] = steps
        return out

    def _minibatch_step(self, mb: Rollout) -> dict[str, torch.Tensor]:
        ids, mask = full_inputs(mb)
        P, Tn = mb.query_ids.shape[1], mb.response_ids.shape[1]
        with self.acc.autocast():
            logits = response_slice(self.model.policy_logits(ids, mask), P, Tn).float() / self.cfg.temperature
            values = response_slice(self.model.values(ids, mask), P, Tn).float()
        logp = core.logprobs_from_logits(logits, mb.response_ids)
        pg_loss, pg = core.policy_loss(logp, mb.logprobs, mb.advantages, mb.response_mask, self.cfg.clip_range)
        vf_loss, vf = core.value_loss(values, mb.values, mb.returns, mb.response_mask, self.cfg.clip_range_value)
        # Token means over *all* processes: scale this process's mean by its share of the
        # valid tokens, so that averaging gradients across processes gives the global mean.
        n_local = mb.response_mask.sum()
        share = n_local * self.acc.num_processes / self._sum(n_local.clone()).clamp(min=1)
        loss = (pg_loss + self.cfg.vf_coef * vf_loss) * share
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"PPO loss became {loss.item()} at update {self.update + 1}; nothing was saved past the "
                "last checkpoint. Lower ppo.learning_rate or ppo.kl.init_coef, or raise ppo.minibatch_size.")
        self.optimizer.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        self._average_gradients()
        self.acc.clip_grad_norm_(self.model.trainable, self.cfg.max_grad_norm)  # unscales fp16 first
        self.optimizer.step()
        self.scheduler.step()
        return {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), "approxkl": pg["approxkl"],
                "clipfrac": pg["clipfrac"], "ratio": pg["ratio"], "vf_clipfrac": vf["clipfrac"]}

    def _average_gradients(self) -> None:
        if self.acc.num_processes == 1:
            return
        for p in self.model.trainable:
            if p.grad is not None:
                p.grad = self.acc.reduce(p.grad, reduction="mean")

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

    def step(self, prompts: list[str]) -> tuple[dict[str, float], Rollout, list[str]]:
        t0 = time.time()
        r, texts = self.rollout(prompts)
        t1 = time.time()
        train = self.train_step(r)
        t2 = time.time()
        metrics = self._rollout_metrics(r)
        metrics.update({
            "policy/approxkl_avg": train["approxkl"], "policy/clipfrac_avg": train["clipfrac"],
            "policy/ratio": train["ratio"], "loss/policy_avg": train["pg_loss"],
            "loss/value_avg": train["vf_loss"], "val/clipfrac_avg": train["vf_clipfrac"],
            "ppo/optimizer_steps": train["optimizer_steps"], "ppo/lr": self.scheduler.get_last_lr()[0],
            "objective/kl_coef": self.kl_ctl.value, "time/rollout": t1 - t0, "time/update": t2 - t1,
        })
        # Ziegler et al.: adapt the KL coefficient to the sequence-level KL just observed.
        self.kl_ctl.update(metrics["objective/kl"], self.cfg.rollout_batch_size * self.acc.num_processes)
        self.update += 1
        self.episodes += self.cfg.rollout_batch_size * self.acc.num_processes
        metrics.update({"ppo/update": self.update, "ppo/episodes": self.episodes})
        return metrics, r, texts

    def _rollout_metrics(self, r: Rollout) -> dict[str, float]:
        seq_kl = r.kl.sum(1)  # sequence-level KL; persistently negative k1 means a bug
        non_score = (r.rewards.sum(1) - r.scores)
        ended = core.has_eos(r.response_ids, r.response_mask, self.tok.eos_token_id).float()
        return {
            "objective/kl": self._mean(seq_kl).item(),
            "objective/entropy": self._mean(r.entropy.sum(1)).item(),
            "objective/non_score_reward": self._mean(non_score).item(),
            "objective/rlhf_reward": self._mean(r.scores + non_score).item(),
            "objective/scores": self._mean(r.scores).item(),
            "objective/rm_scores": self._mean(r.rm_scores).item(),
            "val/mean": self._mean(r.values, r.response_mask).item(),
            "rollout/response_length": self._mean(r.response_mask.sum(1)).item(),
            "rollout/eos_rate": self._mean(ended).item(),
        }

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


def _concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollout chunks whose prompt / response widths differ (left / right pad)."""
    P = max(p.query_ids.shape[1] for p in parts)
    T = max(p.response_ids.shape[1] for p in parts)

    def left(x, width, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def right(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    out = {
        "query_ids": torch.cat([left(p.query_ids, P, pad_id) for p in parts]),
        "query_mask": torch.cat([left(p.query_mask, P, 0) for p in parts]),
        "response_ids": torch.cat([right(p.response_ids, T, pad_id) for p in parts]),
    }
    for name in ("response_mask", "logprobs", "ref_logprobs", "values", "entropy"):
        out[name] = torch.cat([right(getattr(p, name), T, 0.0) for p in parts])
    for name in ("scores", "rm_scores"):
        out[name] = torch.cat([getattr(p, name) for p in parts])
    entropy = out.pop("entropy")
    r = Rollout(**out)
    r.entropy = entropy
    return r
