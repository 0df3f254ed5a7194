"""Rollout sampling with a static KV cache and fixed-shape decode steps, for CUDA graphs.

The eager sampler (:func:`pipeline.rl.rollout.sample`) launches every kernel of every layer from
Python at each token. On a GPU at decode shapes the launches, not the arithmetic, set the pace:
an 8B policy with 16 rows spent 78-98 ms a step where reading the weights takes ~4 ms
(shared/notes/gpu.md). Here every decode step has the same shapes and reads and writes the same
tensors, so one step can be captured once as a CUDA graph and replayed (the technique of vLLM's
and gpt-fast's decoders):

- **static cache**: keys and values live in one preallocated (rows, heads, L, head_dim) tensor a
  layer; a step writes column ``P + t``; the attention mask (B, 1, 1, L) hides the prompt's left
  padding and every column not yet written, so nothing depends on how far decoding has got;
- **buckets**: one graph per batch size in ``1, 2, 4, ...``; a bucket's cache is the first rows
  of the same tensors. When rows stop, the rows still going move to the front and decoding goes
  on in the smallest bucket that holds them, so finished rows stop costing work;
- **no host sync per token**: stops are read every ``check_every`` steps; a finished row that
  decodes on until then records pad tokens and zero log-probs;
- **the same draws as the eager loop**: the sampler's uniforms are one (n, T) float64 block drawn
  before decoding (:func:`uniforms`), and both loops take ``u[row, t]`` for row ``row`` at step
  ``t`` (:func:`pipeline.rl.rollout.draw`); log-probs are fp32 from the same logits.

The LoRA products (or the folded weights) are plain kernels inside the captured step. On CPU
there is nothing to capture: :class:`StaticSampler` runs the same steps on the same buffers
eagerly, which is how the tests check that it samples what the eager loop samples.

Shapes: ``n`` prompts, ``P`` prompt tokens (left-padded), ``T`` new tokens, ``L >= P + T`` cache
columns, ``b`` rows of a bucket, ``V`` vocabulary.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Optional

import torch
from transformers import StaticCache

from pipeline.core.errors import ConfigError
from pipeline.data.chat import ChatFormat
from pipeline.generation.decoding import encode_prompts
from pipeline.generation.stops import stop_mask
from pipeline.rl.rollout import draw, position_ids_from_mask, sample


def uniforms(n: int, steps: int, device: torch.device) -> torch.Tensor:
    """The sampler's random numbers for a chunk: (n, steps) float64 in [0, 1), row r's at step t
    is ``u[r, t]``. One draw per chunk, so a loop that keeps finished rows (this one) and one
    that drops them (the eager one) consume the generator alike and sample alike."""
    return torch.rand(n, steps, device=device, dtype=torch.float64)


def buckets(rows: int) -> list[int]:
    """Batch sizes that get a graph: powers of two below ``rows``, then ``rows``. 12 -> [1, 2, 4, 8, 12]."""
    out = [1]
    while out[-1] * 2 < rows:
        out.append(out[-1] * 2)
    return out + ([rows] if out[-1] != rows else [])


def unsupported(lm) -> Optional[str]:
    """Why ``lm`` cannot decode on a static cache here, or None. Sliding-window layers keep a
    rolling cache whose columns are not the tokens' positions, and this sampler's mask assumes
    they are."""
    cache = StaticCache(config=lm.config, max_cache_len=8)
    if any(layer.is_sliding for layer in cache.layers):
        return "sliding-window attention layers"
    return None


class StaticSampler:
    """Sample from causal LM ``lm`` at fixed shapes: up to ``rows`` prompts of up to
    ``prompt_tokens`` tokens, and up to ``max_new_tokens`` new tokens each.

    ``graphs``: capture each bucket's step as a CUDA graph (CUDA only); without, the steps run
    eagerly on the same buffers. Build it where it will sample (inside the autocast context, if
    any): the cache takes the dtype the layers compute in there. A sampler belongs to one model and
    one adapter setting: weights updated in place (an optimizer step, a refold) are read by the
    next replay; anything that swaps a module or re-routes adapters needs a new sampler.
    """

    def __init__(self, lm, fmt: ChatFormat, rows: int, prompt_tokens: int, max_new_tokens: int,
                 graphs: bool, check_every: int = 8):
        why = unsupported(lm)
        if why:
            raise ValueError(f"static sampler: {why}; use the eager sampler (ppo.sampler=eager)")
        if graphs and lm.device.type != "cuda":
            raise ValueError(f"static sampler: CUDA graphs need a CUDA device, the model is on {lm.device}")
        dev = lm.device
        self.lm, self.fmt, self.graphs, self.check_every = lm, fmt, graphs, check_every
        self.rows, self.P_max, self.T_max = rows, prompt_tokens, max_new_tokens
        self.L = prompt_tokens + max_new_tokens
        self.device, self.dtype = dev, compute_dtype(lm)
        self.stops, self.pad = torch.tensor(fmt.stop_ids, device=dev), fmt.pad_id
        self.buckets = buckets(rows)
        # the whole cache, once: a bucket's cache layers are views of its first b rows
        self.full = StaticCache(config=lm.config, max_cache_len=self.L)
        self._allocate_cache()
        self.caches = {b: self._bucket_cache(b) for b in self.buckets}
        # every tensor a step reads or writes, allocated once (a graph holds their addresses); a
        # bucket uses the first b rows; outputs have a spare row, ``rows``, for rows of no prompt
        self.token = torch.full((rows,), fmt.pad_id, dtype=torch.long, device=dev)
        self.position = torch.zeros(rows, dtype=torch.long, device=dev)
        self.valid = torch.ones(rows, self.L, dtype=torch.bool, device=dev)  # not left padding
        self.done = torch.ones(rows, dtype=torch.bool, device=dev)
        self.slot = torch.zeros(rows, dtype=torch.long, device=dev)  # the prompt a cache row samples for
        self.column = torch.zeros((), dtype=torch.long, device=dev)  # the cache column this step writes
        self.step_t = torch.zeros((), dtype=torch.long, device=dev)  # the response index it draws
        self.temperature = torch.ones((), dtype=torch.float32, device=dev)
        self.columns = torch.arange(self.L, device=dev)
        self.u = torch.zeros(rows + 1, max_new_tokens, dtype=torch.float64, device=dev)
        self.resp = torch.full((rows + 1, max_new_tokens), fmt.pad_id, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros(rows + 1, max_new_tokens, device=dev)
        self.entropy = torch.zeros(rows + 1, max_new_tokens, device=dev)
        self._graphs: dict[int, Callable[[], None]] = {}

    # --- buffers ------------------------------------------------------------------------

    def _allocate_cache(self) -> None:
        cfg = self.lm.config.get_text_config()
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        probe = torch.empty(self.rows, heads, 1, head_dim, dtype=self.dtype, device=self.device)
        for layer in self.full.layers:
            layer.lazy_initialization(probe, probe)

    def _bucket_cache(self, b: int) -> StaticCache:
        """A StaticCache of ``b`` rows whose layers are views of the full cache's first ``b`` rows,
        sharing its write counters: every bucket writes the same column at a given step."""
        cache = StaticCache(config=self.lm.config, max_cache_len=self.L)
        for mine, full in zip(cache.layers, self.full.layers):
            for name in ("dtype", "device", "num_heads", "k_head_dim", "v_head_dim"):
                setattr(mine, name, getattr(full, name))
            mine.batch_size, mine.keys, mine.values = b, full.keys[:b], full.values[:b]
            mine.cumulative_length = full.cumulative_length
            mine.is_initialized = True
        return cache

    # --- one decode step --------------------------------------------------------------

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """(b, q, L) bool -> (b, 1, q, L) additive mask in the compute dtype, the finite minimum where
        not allowed (every query row allows at least its own column, see :meth:`_prefill`)."""
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)[:, None]

    def _record(self, logits: torch.Tensor, b: int) -> None:
        """Draw from (b, V) ``logits`` with each row's uniform at ``step_t``; write the token, its
        log-prob and entropy at (slot, step_t) (pad and zeros for finished rows); feed the token."""
        slot, done = self.slot[:b], self.done[:b]
        u = self.u.index_select(1, self.step_t.view(1))[slot]  # (b, 1)
        token, logp, ent = draw(logits, self.temperature, u)
        token = torch.where(done, self.pad, token)
        at = (slot, self.step_t.expand(b))
        self.resp.index_put_(at, token)
        self.logprobs.index_put_(at, torch.where(done, 0.0, logp))
        self.entropy.index_put_(at, torch.where(done, 0.0, ent))
        self.done[:b] = done | torch.isin(token, self.stops)
        self.token[:b] = token
        self.step_t.add_(1)

    def _step(self, b: int) -> None:
        """One token for the first ``b`` cache rows. Fixed shapes, no host sync: capturable."""
        allowed = self.valid[:b] & (self.columns <= self.column)  # (b, L): the prompt and what is written
        logits = self.lm(input_ids=self.token[:b, None], position_ids=self.position[:b, None],
                         attention_mask=self._mask(allowed[:, None]), past_key_values=self.caches[b],
                         use_cache=True, logits_to_keep=1).logits[:, -1]  # (b, V)
        self._record(logits, b)
        self.position[:b] += 1
        self.column.add_(1)

    def step_fn(self, b: int) -> Callable[[], None]:
        """What runs bucket ``b``'s step: its graph's replay, or the step itself."""
        return self._graphs.get(b) or (lambda: self._step(b))

    @contextmanager
    def _capturing(self):
        """Capture forbids autocast's weight-cast cache (a cast cached during capture is freed and
        its memory reused); without it each cast is one more captured kernel."""
        if torch.is_autocast_enabled("cuda"):
            with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
                yield
        else:
            yield

    def capture(self) -> None:
        """Record one graph per bucket, largest first (its pool's blocks then serve the smaller
        ones). Warm-up steps run first on a side stream, as torch.cuda.graphs asks; they write
        nothing a call keeps, as each call resets every buffer."""
        if not self.graphs or self._graphs or self.T_max < 2:
            return
        try:
            self._capture()
        except Exception as e:
            self._graphs.clear()
            raise RuntimeError(f"ppo.sampler=graphs: capturing the decode step failed ({type(e).__name__}: "
                               f"{e}); ppo.sampler=static runs the same steps without graphs, "
                               "ppo.sampler=eager the plain loop") from e

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        fake = torch.ones(self.rows, 1, dtype=torch.long, device=self.device)  # a one-token prompt each
        with self._capturing():
            for b in reversed(self.buckets):
                self._prepare(fake)
                self._written(1)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._step(b)
                torch.cuda.current_stream().wait_stream(stream)
                self._prepare(fake)
                self._written(1)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(b)
                self._graphs[b] = graph.replay

    # --- a chunk of prompts ------------------------------------------------------------

    def _prepare(self, q_mask: torch.Tensor, u: Optional[torch.Tensor] = None) -> None:
        """Reset every buffer for ``n`` prompts with (n, P) ``q_mask``: fresh outputs, the prompts'
        padding, row i for prompt i and the rest done, and every write counter at column P."""
        n, P = q_mask.shape
        self.resp.fill_(self.fmt.pad_id)
        self.logprobs.zero_()
        self.entropy.zero_()
        if u is not None:
            self.u[:n, :u.shape[1]] = u
        self.valid.fill_(True)
        self.valid[:n, :P] = q_mask.bool()
        self.done.fill_(True)
        self.done[:n] = False
        self.slot.fill_(self.rows)
        self.slot[:n] = torch.arange(n, device=self.device)
        self.position.zero_()
        self.token.fill_(self.fmt.pad_id)
        self.column.fill_(P)
        self.step_t.zero_()
        self._written(0)  # the prefill writes columns 0..P-1

    def _written(self, columns: int) -> None:
        """Set HF's own write counter (one a layer, shared by the buckets) to ``columns``."""
        for layer in self.full.layers:
            layer.cumulative_length.fill_(columns)

    def _prefill(self, q_ids: torch.Tensor, q_mask: torch.Tensor, b: int) -> None:
        """The prompts through the model at once, into cache columns 0..P-1; then draw token 0."""
        n, P = q_ids.shape
        ids = torch.full((b, P), self.fmt.pad_id, dtype=torch.long, device=self.device)
        ids[:n] = q_ids
        positions = torch.zeros(b, P, dtype=torch.long, device=self.device)
        positions[:n] = position_ids_from_mask(q_mask)
        query = torch.arange(P, device=self.device)[:, None]
        causal = self.columns[None, :] <= query  # (P, L)
        # a left pad attends to itself: in fp16 a row with nothing to attend can round to all -inf (the
        # finite minimum plus a score below -16), NaN after softmax, and the NaN keys reach every row
        allowed = (self.valid[:b, None, :] & causal[None]) | (self.columns[None, :] == query)[None]  # (b, P, L)
        logits = self.lm(input_ids=ids, position_ids=positions, attention_mask=self._mask(allowed),
                         past_key_values=self.caches[b], use_cache=True, logits_to_keep=1).logits[:, -1]
        self._record(logits, b)
        self.position[:b] = positions[:, -1] + 1

    def _compact(self, b: int) -> int:
        """Move the rows still going to the front; return the bucket that holds them (0: none left).
        The one host sync of every ``check_every`` steps."""
        going = (~self.done[:b]).nonzero().squeeze(-1)
        m = int(going.numel())
        if m == 0:
            return 0
        nb = next(x for x in self.buckets if x >= m)
        if nb == b:
            return b
        for layer in self.full.layers:
            layer.keys[:m] = layer.keys[going]
            layer.values[:m] = layer.values[going]
        for buf in (self.token, self.position, self.valid, self.slot):
            buf[:m] = buf[going]
        self.done[:m] = False
        self.done[m:nb] = True
        self.slot[m:nb] = self.rows  # the spare row
        return nb

    @torch.no_grad()
    def decode(self, q_ids: torch.Tensor, q_mask: torch.Tensor, temperature: float, max_new_tokens: int,
               u: Optional[torch.Tensor] = None):
        """:func:`pipeline.rl.rollout.sample` on fixed shapes, from left-padded (n, P) ``q_ids`` and
        ``q_mask``. ``u`` (n, T): the uniforms (default: :func:`uniforms`). Returns ``response_ids``
        (n, T), ``response_mask`` (n, T) float, ``logprobs`` and ``entropy`` (n, T)."""
        (n, P), T = q_ids.shape, max_new_tokens
        if not self.fits(n, P, T):
            raise ValueError(f"static sampler built for {self.rows} prompts of <= {self.P_max} tokens and "
                             f"<= {self.T_max} new tokens; asked for {n} of {P} and {T}")
        self.capture()
        self._prepare(q_mask, uniforms(n, T, self.device) if u is None else u.to(self.device, torch.float64))
        self.temperature.fill_(temperature)
        b = next(x for x in self.buckets if x >= n)
        self._prefill(q_ids, q_mask, b)
        t = 1
        while t < T:
            b = self._compact(b)
            if not b:
                break
            step = self.step_fn(b)
            for _ in range(min(self.check_every, T - t)):
                step()
                t += 1
        resp = self.resp[:n, :T].clone()
        mask = stop_mask(resp, self.stops).float()
        return resp, mask, self.logprobs[:n, :T] * mask, self.entropy[:n, :T] * mask

    def fits(self, n: int, prompt_tokens: int, max_new_tokens: int) -> bool:
        return n <= self.rows and prompt_tokens <= self.P_max and max_new_tokens <= self.T_max


SAMPLERS = ("auto", "eager", "static", "graphs")


def sampler_kind(choice: str, lm) -> str:
    """``ppo.sampler``: eager (pipeline.rl.rollout.sample), static (this module's fixed-shape steps,
    run eagerly) or graphs (the same steps as CUDA graphs). auto: graphs on a CUDA device for a
    model the static cache supports, else eager: on a CPU there is no launch overhead to save, and
    fixed shapes cost where rows stop early (`make ppo` on the world, 8 updates: 0.130 s of sampling an
    update static, 0.102 s eager; 16 rows that never stop on the tiny Llama 3 stand-in: 24.8 ms and
    25.8 ms), and the eager loop keeps the random stream every recorded CPU figure was sampled with.
    Refuses a choice the model or device cannot run, naming why."""
    why = unsupported(lm)
    if choice == "auto":
        return "graphs" if lm.device.type == "cuda" and why is None else "eager"
    if choice in ("static", "graphs") and why:
        raise ConfigError(f"ppo.sampler={choice}: this model has {why}; use ppo.sampler=eager (or auto)")
    if choice == "graphs" and lm.device.type != "cuda":
        raise ConfigError(f"ppo.sampler=graphs needs a CUDA device (the policy is on {lm.device}); "
                          "use ppo.sampler=static to run the same steps without graphs, or auto")
    return choice


class RolloutSampler:
    """The RL trainer's sampler: the eager loop, or one :class:`StaticSampler` kept across updates
    (its graphs are captured once) and rebuilt larger when a chunk does not fit it (prompt widths
    rounded up to a multiple of ``ROUND`` tokens, so that happens rarely)."""

    ROUND = 64

    def __init__(self, kind: str, fmt: ChatFormat):
        self.kind, self.fmt, self.static = kind, fmt, None

    def __call__(self, lm, prompts: list[list[dict]], temperature: float, max_new_tokens: int):
        """Same returns as :func:`pipeline.rl.rollout.sample`."""
        if self.kind == "eager":
            return sample(lm, self.fmt, prompts, temperature, max_new_tokens)
        q_ids, q_mask = (t.to(lm.device) for t in encode_prompts(self.fmt, prompts))
        (n, P) = q_ids.shape
        if self.static is None or self.static.lm is not lm or not self.static.fits(n, P, max_new_tokens):
            rows = max(n, self.static.rows if self.static else 0)
            width = -(-max(P, self.static.P_max if self.static else 0) // self.ROUND) * self.ROUND
            self.static = None  # its cache and graph pool go before the new ones are allocated
            self.static = StaticSampler(lm, self.fmt, rows, width, max_new_tokens, self.kind == "graphs")
        return (q_ids, q_mask) + self.static.decode(q_ids, q_mask, temperature, max_new_tokens)


def compute_dtype(lm) -> torch.dtype:
    """The dtype the layers' keys and values come out in: autocast's where it is on, else the weights'."""
    dev = lm.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return next(p for p in lm.parameters() if p.is_floating_point()).dtype
