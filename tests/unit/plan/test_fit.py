"""pipeline.plan.fit: the largest settings that fit, ppo's auto batches, and the refusal of what cannot fit."""

import pytest

from pipeline.core.errors import ConfigError
from pipeline.plan.arch import arch_of
from pipeline.plan.fit import check_fits, divisors, fit, largest, options, resolve_auto
from pipeline.plan.memory import ppo_breakdown, sft_breakdown
from pipeline.plan.settings import Settings, settings
from pipeline.rl.config import check_config
from tests.conftest import compose_config

pytestmark = pytest.mark.unit

TINY = arch_of("tiny", layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=32, tied=True)
PPO = dict(weight_bytes=4, act_bytes=4, r=2, r_rm=2, prompt=3, response=1, checkpointing=False, fold="never",
           critic=True)


def ppo_settings(micro, gen, minibatch=4, rollout=8) -> Settings:
    return Settings("ppo", {**PPO, "micro": micro, "gen": gen}, "float32", False, 4, minibatch, rollout)


def test_divisors_and_largest():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert largest([1, 2, 4, 8], lambda n: n * 3 <= 13) == 4 and largest([2, 4], lambda n: False) is None


def test_auto_takes_the_largest_divisor_that_fits():
    # static 26272 bytes (test_memory); training 2 x 576 x 4 tokens a response + 256 of logits per response;
    # a micro-batch of 2 needs 26272 + 9216 + 512 = 36000, of 4: 26272 + 18432 + 1024 = 45728.
    assert ppo_breakdown(TINY, **{**PPO, "micro": 2, "gen": 1})["static"] == 26272
    s, notes = resolve_auto(TINY, ppo_settings("auto", "auto"), room=40000)
    assert s.kw["micro"] == 2  # 4 would need 45728
    # sampling g responses: g x 256 (KV cache) + g x 32 x 24 (sampler); 8 (the rollout) needs 8192: fits.
    assert s.kw["gen"] == 8
    assert notes == ["ppo: ppo.micro_batch_size=auto -> 2, ppo.generation_batch_size=auto -> 8 (the largest that "
                     "fit 39.06 KiB: the free GPU memory less 10% of the card)"]
    # An explicit value stays; without a CUDA device auto takes the minibatch and the rollout batch, and says so.
    s, notes = resolve_auto(None, ppo_settings("auto", 4, minibatch=4), room=None)
    assert (s.kw["micro"], s.kw["gen"]) == (4, 4) and "no CUDA device" in notes[0]
    # Nothing fits: 1 and 1, which check_fits then refuses by name when there is a card.
    s, _ = resolve_auto(TINY, ppo_settings("auto", "auto"), room=1)
    assert (s.kw["micro"], s.kw["gen"]) == (1, 1)


def test_with_a_held_cache_micro_and_generation_batches_share_the_room():
    """ppo.sampler static / graphs keep the KV cache through training, so the generation batch adds to
    the training peak. Worked: static without the cache 26272; a held cache is g x (64 + 1) columns x 2
    layers x 2 x 4 (kv width) x 4 bytes = 4160 g; micro 1 trains in 4864, micro 2 in 9728, micro 4 in
    19456. Room 48000: micro 2 at g = 1 (26272 + 4160 + 9728 = 40160; micro 4 would need 49888), then
    g = 2 beside it (26272 + 8320 + 9728 = 44320; 4 would need 52640). Chosen apart, g = 4 fits beside
    micro 1 (47776), and micro 2 with g = 4 would not fit (52640)."""
    held = Settings("ppo", {**PPO, "micro": "auto", "gen": "auto", "held_cache": True}, "float32", False, 4, 4, 8)
    s, _ = resolve_auto(TINY, held, room=48000)
    assert (s.kw["micro"], s.kw["gen"]) == (2, 2)
    assert ppo_breakdown(TINY, **s.kw)["peak"] == 44320 <= 48000
    option = fit(TINY, held.with_(micro=4, gen=8), 48000, four_bit=False, checkpointing=False)
    assert (option.settings.kw["micro"], option.settings.kw["gen"]) == (2, 2) and option.parts["peak"] == 44320
    # The micro-batch is chosen beside one response sampled at a time: in 42000, micro 2 (40160 at g = 1)
    # and then g = 1, not micro 1 beside g = 2 (39456).
    s, _ = resolve_auto(TINY, held, room=42000)
    assert (s.kw["micro"], s.kw["gen"]) == (2, 1)
    option = fit(TINY, held.with_(micro=4, gen=8), 42000, four_bit=False, checkpointing=False)
    assert (option.settings.kw["micro"], option.settings.kw["gen"]) == (2, 1)


def test_auto_micro_follows_a_small_minibatch():
    cfg = compose_config("ppo", ["ppo.minibatch_size=4", "ppo.micro_batch_size=auto", "ppo.generation_batch_size=auto"])
    check_config(cfg)  # with micro 16 this is refused: 16 does not divide 4
    s, _ = resolve_auto(None, settings("ppo", cfg, on_gpu=False, prompt=20, ranks=(16, 16)), room=None)
    assert (s.kw["micro"], s.kw["gen"]) == (4, cfg.ppo.rollout_batch_size)
    with pytest.raises(ConfigError, match="ppo.micro_batch_size=16 must divide ppo.minibatch_size=4, or be auto"):
        check_config(compose_config("ppo", ["ppo.minibatch_size=4"]))


@pytest.mark.parametrize("override, message", [
    ("ppo.micro_batch_size=most", r"ppo.micro_batch_size='most' must be a positive integer or auto"),
    ("ppo.generation_batch_size=2.5", r"ppo.generation_batch_size=2.5 must be a positive integer or auto"),
    ("ppo.generation_batch_size=0", r"ppo.generation_batch_size=0 must be > 0"),
])
def test_a_batch_size_neither_positive_nor_auto_is_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config("ppo", [override]))


def test_options_keep_the_batch_per_step_and_go_cheapest_first():
    s = Settings("sft", dict(weight_bytes=4, act_bytes=4, r=2, micro=8, length=4, checkpointing=False),
                 "float32", False, 4, 8)
    # static 13984; 1 row needs 4 x (2 x 576) + 4 x 32 x 4 + 4 x 8 x 8 = 5376 more, 2 rows 10752: a room of
    # 25000 takes 2 rows a pass (x 4 accumulation steps keeps the 8 rows a step).
    assert sft_breakdown(TINY, **{**s.kw, "micro": 2})["peak"] == 13984 + 10752
    o = fit(TINY, s, 25000, four_bit=False, checkpointing=False)
    assert o.settings.kw["micro"] == 2
    assert o.overrides == "train.per_device_train_batch_size=2 train.gradient_accumulation_steps=4"
    labels = [label for label, _ in options(TINY, s, 25000)]
    assert labels == ["fp32", "fp32, checkpointing", "4-bit", "4-bit, checkpointing"]
    assert fit(TINY, s, 10000, four_bit=False, checkpointing=True) is None  # the static part alone is 13984


def test_an_unfit_configuration_is_refused_in_one_line_with_what_fits():
    s = ppo_settings(4, 8)
    assert check_fits(TINY, s, None, "no card") is None and check_fits(TINY, s, 10 ** 6, "big") is None
    with pytest.raises(ConfigError) as e:
        check_fits(TINY, s, 40000, "gpu_memory=40000")
    message = str(e.value)
    assert "\n" not in message
    # micro 4 needs 45728 bytes (44.66 KiB); the budget is 90% of 40000 = 36000, which micro 2 fills exactly;
    # with checkpointing micro 4 would need 26272 + 16 x (2 x 32 + 576) + 1024 = 37536: micro 2 again, whose
    # peak is then sampling's, 26272 + 8 x (256 + 768) = 34464 (33.66 KiB).
    assert message == ("ppo: the predicted peak 44.66 KiB does not fit the card's 39.06 KiB (gpu_memory=40000); "
                       "settings that fit: ppo.micro_batch_size=2 (35.16 KiB); or ppo.gradient_checkpointing=true "
                       "ppo.micro_batch_size=2 (33.66 KiB) (`make plan` lists every option)")
    with pytest.raises(ConfigError, match="nothing fits: weights, adapters and optimizer alone take 25.66 KiB"):
        check_fits(TINY, s, 20000, "gpu_memory=20000")
    # Over the budget but under the card: a warning, not a refusal; on either boundary the lower side.
    assert "within 10% of the card's" in check_fits(TINY, ppo_settings(2, 8), 37000, "x")
    assert check_fits(TINY, ppo_settings(2, 8), 40000, "x") is None  # peak 36000 = the budget
    assert "within 10% of the card's" in check_fits(TINY, ppo_settings(2, 8), 36000, "x")  # = the card


def test_the_rl_stage_refuses_an_unfit_config_before_loading(tmp_path, capsys, monkeypatch):
    """A family stand-in's config.json and tokenizer, a 1 MiB card: the function stages.ppo.run calls
    before any weight loads refuses in one line; nothing is mocked."""
    from pipeline.models.loading import load_tokenizer
    from stages.ppo import fit_to_card
    from tests.families import build_family
    from tests.unit.data.test_families import CORPUS

    folder = str(build_family("llama3", tmp_path / "llama3", CORPUS))
    rows = [{"messages": [{"role": "user", "content": "What is 2 plus 3?"}]}]
    cfg = compose_config("ppo", ["gpu_memory=1MiB"])
    fmt = load_tokenizer(folder, cfg.model)
    with pytest.raises(ConfigError) as e:
        fit_to_card(cfg, folder, (16, 16), fmt, rows)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("ppo: the predicted peak ")
    assert "does not fit the card's 1.00 MiB (gpu_memory=1MiB)" in str(e.value)
    # auto on CPU: the fallback, said; the returned settings keep their interpolations (seed).
    _device(monkeypatch, None)
    cfg = compose_config("ppo", ["ppo.micro_batch_size=auto", "ppo.generation_batch_size=auto"])
    ppo = fit_to_card(cfg, folder, (16, 16), fmt, rows)
    assert (ppo.micro_batch_size, ppo.generation_batch_size, ppo.seed) == (32, 64, cfg.seed)
    assert "ppo.micro_batch_size=auto -> 32" in capsys.readouterr().out
    # With no card to fit, the base's config.json is never read: a hub id need not be reachable.
    ppo = fit_to_card(cfg, str(tmp_path / "not-downloaded"), (16, 16), fmt, rows)
    assert (ppo.micro_batch_size, ppo.generation_batch_size) == (32, 64)


def _device(monkeypatch, memory) -> None:
    """Make the plan read a CUDA device with ``memory`` = (free, total) bytes, or none (None): the one
    hardware query (torch.cuda.mem_get_info), so these tests mean the same on a CPU and on a GPU."""
    import pipeline.plan.card as card
    import pipeline.plan.fit as fit_module
    for module in (card, fit_module):
        monkeypatch.setattr(module, "cuda_memory", lambda: memory)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    from tests.families import build_family
    from tests.unit.data.test_families import CORPUS
    return str(build_family("llama3", tmp_path_factory.mktemp("llama3"), CORPUS))


def test_on_a_gpu_auto_fills_the_free_memory_less_the_margin_and_within_gpu_memory(monkeypatch, llama3):
    from pipeline.plan.arch import read_arch
    from pipeline.plan.fit import fit_ppo
    from pipeline.plan.memory import breakdown

    cfg = compose_config("ppo", ["ppo.micro_batch_size=auto", "ppo.generation_batch_size=16"])
    arch, total = read_arch(llama3), 10 ** 9
    s = settings("ppo", cfg, on_gpu=True, prompt=20, ranks=(16, 16)).with_(gen=16)
    need = {m: breakdown("ppo", arch, **s.with_(micro=m).kw) for m in divisors(32)}
    need = {m: b["static"] + b["training"] for m, b in need.items()}
    # Free memory that leaves exactly micro 8's need once 10% of the card is kept back: 8, not 16.
    _device(monkeypatch, (int(need[8] + 0.1 * total) + 1, total))
    ppo, notes = fit_ppo(cfg, llama3, prompt=20, ranks=(16, 16))
    assert (ppo.micro_batch_size, ppo.generation_batch_size) == (8, 16)
    assert notes[0].startswith("ppo: ppo.micro_batch_size=auto -> 8 (the largest that fit ")
    # gpu_memory smaller than the device: its budget (90% of it) binds instead, micro 4.
    card = int(need[4] / 0.9) + 1
    ppo, _ = fit_ppo(compose_config("ppo", ["ppo.micro_batch_size=auto", "ppo.generation_batch_size=16",
                                            f"gpu_memory={card}"]), llama3, prompt=20, ranks=(16, 16))
    assert ppo.micro_batch_size == 4


def test_sft_and_rm_are_planned_with_16_bit_activations_on_a_gpu(monkeypatch, llama3):
    from pipeline.plan.arch import read_arch
    from pipeline.plan.fit import fit_train
    from pipeline.plan.memory import breakdown

    arch = read_arch(llama3)
    peak = {gpu: breakdown("sft", arch, **settings("sft", compose_config("sft"), on_gpu=gpu).kw)["peak"]
            for gpu in (False, True)}
    assert peak[True] < peak[False]  # precision auto: fp32 activations on CPU, 16-bit on a GPU
    card = int((peak[True] + peak[False]) / 2 / 0.9)  # fits with 16-bit activations, not with fp32
    cfg = compose_config("sft", [f"gpu_memory={card}"])
    _device(monkeypatch, None)
    with pytest.raises(ConfigError, match="does not fit the card's"):
        fit_train("sft", cfg, llama3)  # no CUDA device: fp32 activations
    _device(monkeypatch, (card, card))
    assert fit_train("sft", cfg, llama3) is None
    # No gpu_memory: the device's total is the card; nothing is checked without one.
    small = int(peak[True] / 2)
    _device(monkeypatch, (small, small))
    with pytest.raises(ConfigError, match=r"\(the CUDA device's total\)"):
        fit_train("sft", compose_config("sft"), llama3)
    _device(monkeypatch, None)
    assert fit_train("sft", compose_config("sft"), llama3) is None
