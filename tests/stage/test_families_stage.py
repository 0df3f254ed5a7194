"""The real entry points on tiny local models carrying real families' tokenizer settings
(Qwen2.5 ChatML, Llama 3, Mistral [INST], Gemma, GPT-2 without a template; tests/families.py):
sft -> rm -> ppo -> eval -> export on each, stop tokens, adapters and exports loaded outside.
Sampling with a pruned KV cache also runs on the Gemma 2 layout (variant ``gemma2``: a
sliding-window layer and a global one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core.artifacts import load_artifact
from pipeline.data.chat import load_chat_format
from pipeline.generation.decoding import as_conversation
from pipeline.rl.rollout import sample
from stages import eval as eval_stage
from stages import export, ppo, rm, sft
from tests.conftest import compose_config
from tests.families import FAMILIES, VARIANTS, build_family, family_spec
from tests.stage.conftest import QUIET, TINY_RM, TINY_SFT
from tests.stage.test_ppo_stage import TINY_PPO, assert_shortcuts_agree
from tests.stage.test_ppo_stage import build as build_rl
from tests.stage.test_ppo_stage import rollout as rl_rollout
from tests.unit.data.test_chat import END_OF_TURN

pytestmark = pytest.mark.stage


@pytest.fixture(scope="module")
def family_models(world_root, tmp_path_factory):
    """Each family's (and variant's) tiny model, its tokenizer trained on the world's corpus."""
    corpus = [json.loads(line)["text"] for line in
              (world_root / "data/world/pretrain.jsonl").read_text().splitlines()[:300]]
    root = tmp_path_factory.mktemp("families")
    return {f: build_family(f, root / f, corpus) for f in FAMILIES + VARIANTS}


@pytest.fixture
def empty_run(world_root, tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    os.symlink(world_root / "data" / "world", root / "data" / "world")
    monkeypatch.setenv("RLHF_ROOT", str(root))
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_rm_ppo_eval_and_export_run_on_each_family(family, family_models, empty_run):
    model = [f"model.path={family_models[family]}", f"model.name=tiny-{family}"]
    sft.run(compose_config("sft", TINY_SFT + QUIET + model))
    rm.run(compose_config("rm", TINY_RM + QUIET + model))
    # a checkpoint every update: a family whose pad token was added has resized embeddings,
    # which must stay out of the saved trainable state (as out of the adapters)
    metrics = ppo.run(compose_config("ppo", TINY_PPO + model + ["checkpoint_every=1"]))
    assert metrics["updates"] == 2
    # the RL passes' shortcuts (sequences packed in rows, LM head by hand) hold for the family
    _, shared, fmt, trainer = build_rl(model)
    assert_shortcuts_agree(shared, fmt, rl_rollout(trainer))
    report = eval_stage.run(compose_config("eval", QUIET + model + ["max_prompts=8"]))
    assert set(report["stages"]) == {"base", "sft", "ppo"} and report["judge"] == "gold"
    out = Path(export.run(compose_config("export", QUIET + model)))

    run = empty_run / "artifacts" / "default"
    fmt = load_chat_format(str(family_models[family]), None, False)
    stops = list(fmt.stop_ids)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == stops
    assert load_artifact(run / "sft", "sft").manifest["parent"] is None  # a hub-style base: no base artifact
    # Outside the project, from another working directory: the export with transformers alone,
    # the PPO adapter with AutoPeftModelForCausalLM.
    script = f"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
model = AutoModelForCausalLM.from_pretrained({str(out)!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "What is 2 plus 3?"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
new = model.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:]
from peft import AutoPeftModelForCausalLM
AutoPeftModelForCausalLM.from_pretrained({str(run / "ppo" / "policy")!r})
print(json.dumps({{"eos": model.generation_config.eos_token_id, "new": new.tolist()}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["eos"] == stops and 1 <= len(result["new"]) <= 6


class StopAfter:
    """A forward hook standing in for a policy that has learned to stop: from the n-th generated
    token on, the family's end-of-turn token gets a large logit."""

    def __init__(self, token: int, n: int):
        self.token, self.n, self.calls = token, n, 0

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls >= self.n:
            output.logits[..., self.token] += 50.0
        return output


class StopFirstRow:
    """A forward hook (``with_kwargs=True``) that, from the n-th call on, gives the first row of each
    step's batch a large end-of-turn logit: the rows stop one a step, so the batch and its KV cache
    shrink row by row. Records the batch size of every call and, after it, each cache layer's
    (class name, batch size, keys kept)."""

    def __init__(self, token: int, n: int):
        self.token, self.n, self.rows, self.layers = token, n, [], []

    def __call__(self, module, args, kwargs, output):
        self.rows.append(output.logits.shape[0])
        self.layers.append([(type(layer).__name__, layer.keys.shape[0], layer.keys.shape[-2])
                            for layer in kwargs["past_key_values"].layers])
        if len(self.rows) >= self.n:
            output.logits[0, -1, self.token] += 50.0
        return output


SLIDING = {"gemma2"}  # the stand-ins whose cache has sliding-window layers


@pytest.mark.parametrize("family", FAMILIES + VARIANTS)
def test_rows_that_stop_leave_the_batch_and_the_rest_sample_on_correctly(family, family_models):
    """Rollouts drop a row (and its cache) at its stop token. Each step's batch holds exactly the
    rows still going, and every token the survivors drew after rows left has the log-prob that a
    plain forward of that whole sequence gives: the pruned cache still belongs to the right rows
    (sliding-window layers included, on the Gemma 2 layout: there the window is shorter than every
    prompt, so the sliding layer's cache holds only the window's keys while rows leave)."""
    from pipeline.models.loading import load_causal_lm
    fmt = load_chat_format(str(family_models[family]), None, False)
    model = load_causal_lm(str(family_models[family]), compose_config("sft", ["model.path=x"]).model, fmt).eval()
    hook = StopFirstRow(fmt.end_of_turn_id, 3)
    handle = model.register_forward_hook(hook, with_kwargs=True)
    prompts = [as_conversation(p) for p in ("What is 2 plus 3?", "Name the capital of Krosfia.",
                                            "Repeat the word 'cup' 2 times.", "Hi")]
    torch.manual_seed(0)
    q_ids, q_mask, resp, mask, logprobs, _ = sample(model, fmt, prompts, 1.0, 8)
    handle.remove()
    lengths = mask.sum(1).long()
    assert len(set(lengths.tolist())) > 1  # rows stopped at different steps
    assert hook.rows == [int((lengths > t).sum()) for t in range(len(hook.rows))]
    # every cache layer, of either kind, was pruned to the batch of each step
    assert all(b == rows for layers, rows in zip(hook.layers, hook.rows) for _, b, _ in layers)
    kinds = {name for layers in hook.layers for name, _, _ in layers}
    assert ("DynamicSlidingWindowLayer" in kinds) == (family in SLIDING), kinds
    if family in SLIDING:
        window = model.config.sliding_window
        assert window < int(q_mask.sum(1).min())  # shorter than every prompt
        pruned = [layers for layers, rows in zip(hook.layers, hook.rows) if rows < len(prompts)]
        assert pruned  # sampling went on after rows left
        for layers in pruned:  # the sliding layer kept only the window; the global one all
            kept = {name: n for name, _, n in layers}
            assert kept["DynamicSlidingWindowLayer"] == window - 1 < kept["DynamicLayer"]
    with torch.no_grad():
        for i in range(len(prompts)):
            n = int(lengths[i])
            seq = torch.cat([q_ids[i][q_mask[i].bool()], resp[i, :n]])[None]
            start = int(q_mask[i].sum()) - 1
            want = torch.log_softmax(model(input_ids=seq).logits[0, start:start + n].float(), -1)
            want = want.gather(-1, resp[i, :n, None]).squeeze(-1)
            # the last token of a row may be the hook's boosted stop: compare the ones before it
            torch.testing.assert_close(logprobs[i, :n - 1], want[:n - 1], atol=1e-4, rtol=0)


class StopAfterSomeTokens:
    """A forward hook (``with_kwargs=True``) that makes a decode step's row stop when the token it
    reads is one of a seventh of the vocabulary: a stop that depends on the row's own text only, so
    two samplers that draw the same tokens stop the same rows at the same steps, at varied steps.
    Records the batch size of every decode call, and of the prompts' pass."""

    def __init__(self, token: int):
        self.token, self.rows, self.prefill = token, [], []

    def __call__(self, module, args, kwargs, output):
        ids = kwargs["input_ids"]
        if ids.shape[1] == 1:  # a decode step, not the prompt
            self.rows.append(ids.shape[0])
            output.logits[:, -1, self.token] += 50.0 * (ids[:, 0] % 7 == 0)
        else:
            self.prefill.append(ids.shape[0])
        return output


@pytest.mark.parametrize("family", FAMILIES)
def test_the_static_sampler_draws_what_the_eager_loop_draws(family, family_models):
    """pipeline/rl/static_sampler.py (fixed shapes on a static cache, the CUDA-graph path) against
    the eager loop, on the same uniforms: the same tokens, the same log-probs and entropies, rows
    stopping at different steps while the batch moves down its buckets; then a second call on the
    same buffers with fewer prompts (as many as a bucket holds) and another temperature."""
    from pipeline.models.loading import load_causal_lm
    from pipeline.rl.static_sampler import StaticSampler, uniforms
    fmt = load_chat_format(str(family_models[family]), None, False)
    model = load_causal_lm(str(family_models[family]), compose_config("sft", ["model.path=x"]).model, fmt).eval()
    prompts = [as_conversation(p) for p in ("What is 2 plus 3?", "Name the capital of Krosfia.",
                                            "Repeat the word 'cup' 2 times.", "Hi", "Tell me a story.", "x")]
    static = StaticSampler(model, fmt, rows=8, prompt_tokens=96, max_new_tokens=20, graphs=False, check_every=2)
    for n, T, temperature in ((6, 20, 1.0), (4, 9, 0.7)):
        torch.manual_seed(n)
        u = uniforms(n, T, torch.device("cpu"))
        hook = StopAfterSomeTokens(fmt.end_of_turn_id)
        handle = model.register_forward_hook(hook, with_kwargs=True)
        want = sample(model, fmt, prompts[:n], temperature, T, u=u)
        eager_rows, hook.rows, hook.prefill = hook.rows, [], []
        q_ids, q_mask = want[:2]
        got = static.decode(q_ids, q_mask, temperature, T, u=u)
        handle.remove()
        lengths = want[3].sum(1)
        assert torch.equal(got[0], want[2]) and torch.equal(got[1], want[3])
        torch.testing.assert_close(got[2], want[4], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[3], want[5], atol=1e-4, rtol=0)
        # Each block of check_every = 2 steps runs in the smallest bucket that holds the rows going at
        # its start (the eager loop's batch at that step), until none is left.
        want_rows, t = [], 1
        while t < T and t - 1 < len(eager_rows):
            want_rows += [next(b for b in (1, 2, 4, 8) if b >= eager_rows[t - 1])] * min(2, T - t)
            t += 2
        assert hook.rows == want_rows, (hook.rows, eager_rows)
        assert hook.prefill == [8 if n == 6 else 4]  # the prompts run in the smallest bucket that holds them
        if n == 6:
            assert len(set(lengths.tolist())) > 2, lengths  # rows stopped at several steps
            assert eager_rows[-1] < n  # ... while others went on
            assert set(hook.rows) > {8}, hook.rows  # the static batch moved down to smaller buckets


def test_the_static_sampler_refuses_sliding_window_layers(family_models):
    from pipeline.core.errors import ConfigError
    from pipeline.models.loading import load_causal_lm
    from pipeline.rl.static_sampler import sampler_kind
    fmt = load_chat_format(str(family_models["gemma2"]), None, False)
    model = load_causal_lm(str(family_models["gemma2"]), compose_config("sft", ["model.path=x"]).model, fmt)
    with pytest.raises(ConfigError, match="sliding-window.*ppo.sampler=eager"):
        sampler_kind("static", model)
    assert sampler_kind("auto", model) == "eager"


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_a_static_decode_step_traces_as_one_graph(family, family_models):
    """CUDA graph capture needs a step without host syncs or data-dependent Python branches. A
    whole-graph dynamo trace (no code generated) fails on a branch; the ops the step dispatches show
    a sync: reading a tensor's value on the host (``.item()``, ``int()``, ``if t``) and ops whose
    output shape depends on the data. On the policy with a LoRA adapter (peft's forward), for a
    rotary and a learned-position family."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    from peft import LoraConfig, get_peft_model

    from pipeline.models.loading import load_causal_lm
    from pipeline.rl.static_sampler import StaticSampler
    fmt = load_chat_format(str(family_models[family]), None, False)
    model = load_causal_lm(str(family_models[family]), compose_config("sft", ["model.path=x"]).model, fmt)
    policy = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                            adapter_name="policy").eval()
    static = StaticSampler(policy, fmt, rows=4, prompt_tokens=8, max_new_tokens=4, graphs=False)
    static._prepare(torch.ones(4, 1, dtype=torch.long))
    static._written(1)
    with torch.no_grad(), Ops() as ops:
        static._step(4)
    syncs = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave"}
    assert "index_put_" in ops.names and not ops.names & syncs, ops.names & syncs
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(static._step, backend="eager", fullgraph=True)(4)
    assert int(static.step_t) == 2 and int(static.column) == 3  # it ran, twice


@pytest.mark.parametrize("family", FAMILIES)
def test_a_rollout_stops_at_the_familys_end_of_turn_token(family, family_models):
    from pipeline.models.loading import load_causal_lm
    fmt = load_chat_format(str(family_models[family]), None, False)
    cfg = compose_config("sft", ["model.path=x"]).model
    model = load_causal_lm(str(family_models[family]), cfg, fmt).eval()
    # the family's own class (not "whatever AutoModelForCausalLM makes of the folder", which is
    # what load_causal_lm calls: that comparison could not fail)
    assert type(model).__name__ == family_spec(family)["architecture"]
    eot = fmt.end_of_turn_id
    assert fmt.tokenizer.convert_ids_to_tokens(eot) == END_OF_TURN[family]
    model.register_forward_hook(StopAfter(eot, 3))
    torch.manual_seed(0)
    _, _, resp, mask, logprobs, _ = sample(model, fmt, [as_conversation("What is 2 plus 3?")] * 2, 1.0, 12)
    # token 3 is the end-of-turn token: the mask ends there, nothing after it counts
    assert mask.sum(1).tolist() == [3.0, 3.0]
    assert (resp[:, 2] == eot).all() and (resp[:, 3:] == fmt.pad_id).all()
    assert (logprobs[:, 2] > -1e-3).all()  # the recorded log-prob is of the boosted distribution


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_trains_each_family_on_the_sequences_the_other_stages_see(family, family_models, empty_run, tmp_path):
    """`make dpo` per family: each answer DPO trains on is the tokenizer's own encoding of the rendered
    pair, cut at the answer's end-of-turn token, as a rollout ends and as SFT and the RM read it. TRL
    left to tokenize by itself keeps the template's text after that token (ChatML's and Gemma's
    newline). The trained adapter is then one more stage for eval."""
    from pipeline.core.artifacts import find_parent
    from pipeline.models.reward import load_sft_tokenizer
    from stages import dpo
    from tests.stage.test_dpo_stage import TINY_DPO
    model = [f"model.path={family_models[family]}", f"model.name=tiny-{family}"]
    sft.run(compose_config("sft", TINY_SFT + QUIET + model))
    cfg = compose_config("dpo", TINY_DPO + model)
    parent = find_parent(cfg.paths.run_dir, "sft")
    fmt = load_sft_tokenizer(parent)
    rows = [r for r in dpo.dpo_rows(fmt, cfg.data.prefs.eval, cfg)  # those that fit, as make dpo keeps
            if max(len(r["_ids"]["chosen_ids"]), len(r["_ids"]["rejected_ids"])) <= cfg.train.max_length][:24]
    seen = dpo.dpo_trainer(cfg, parent, fmt, rows, rows, tmp_path, "none").train_dataset
    assert len(seen) == len(rows) == 24
    tok, eot = fmt.tokenizer, fmt.end_of_turn_id
    for row, ex in zip(rows, seen):
        for side in ("chosen", "rejected"):
            text = tok.apply_chat_template(dpo_messages(fmt, row, side), tokenize=False)
            whole = list(fmt.bos_ids) + tok(text, add_special_tokens=False)["input_ids"]
            answer = ex[f"{side}_ids"]
            assert answer[-1] == eot and eot not in answer[:-1], (family, side, tok.decode(answer))
            assert ex["prompt_ids"] + answer == whole[: len(ex["prompt_ids"]) + len(answer)], (family, side)
    metrics = dpo.run(cfg)
    assert metrics["train_loss"] > 0
    report = eval_stage.run(compose_config("eval", QUIET + model + ["max_prompts=8", "policies=[sft,dpo]"]))
    assert set(report["stages"]) == {"sft", "dpo"}


def dpo_messages(fmt, row: dict, side: str) -> list[dict]:
    from pipeline.data.chat import fold_system_turn
    messages = row["prompt"] + row[side]
    return fold_system_turn(messages) if fmt.fold_system else messages
