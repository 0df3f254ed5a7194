"""The world generator: deterministic, schema-valid, held out, imperfect at the set rates."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.world.entities import WorldConfig, build_world, world_from_config
from pipeline.world.generator import category_counts, generate_world, split_prompts
from pipeline.world.judge import judge, parse_prompt
from pipeline.world.vocabulary import CATEGORY_WEIGHTS, HARMFUL_ACTIONS

pytestmark = pytest.mark.unit

DEFAULT_YAML = Path(__file__).resolve().parents[3] / "conf" / "world" / "default.yaml"
FILES = ("pretrain", "pretrain_eval", "sft_train", "sft_eval", "prefs_train", "prefs_eval", "ranked_train",
         "ppo_prompts", "eval_prompts", "val_prompts")
TRAIN_PROMPT_FILES = ("sft_train", "prefs_train", "ranked_train", "ppo_prompts")
HELD_OUT_FILES = ("eval_prompts", "val_prompts")  # val: for choosing settings; eval: for reporting


def default_config() -> WorldConfig:
    return WorldConfig(**yaml.safe_load(DEFAULT_YAML.read_text()))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prompt_of(name: str, row: dict) -> str:
    return row["messages"][0]["content"] if name.startswith("sft") else row["prompt"]


@pytest.fixture(scope="module")
def cfg() -> WorldConfig:
    return default_config()


@pytest.fixture(scope="module")
def world(cfg):
    return world_from_config(cfg)


@pytest.fixture(scope="module")
def out(cfg, tmp_path_factory) -> dict[str, Path]:
    return generate_world(cfg, tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def data(out) -> dict[str, list[dict]]:
    return {name: read(path) for name, path in out.items()}


# --- configuration ---------------------------------------------------------------------


def test_yaml_sets_every_field_and_the_dataclass_has_no_defaults():
    fields = dataclasses.fields(WorldConfig)
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
    assert set(yaml.safe_load(DEFAULT_YAML.read_text())) == {f.name for f in fields}


def test_config_rejects_bad_values(cfg):
    with pytest.raises(ValueError, match="label_noise"):
        dataclasses.replace(cfg, label_noise=1.5)
    with pytest.raises(ValueError, match="k_responses"):
        dataclasses.replace(cfg, k_responses=1)


def test_too_many_eval_prompts_is_a_clear_error(cfg, tmp_path):
    small = dataclasses.replace(cfg, n_entities=3, n_unknown=3, n_eval_prompts=500)
    with pytest.raises(ValueError, match="n_eval_prompts"):
        generate_world(small, tmp_path)


# --- the world -------------------------------------------------------------------------


def test_world_is_deterministic_and_names_are_distinct():
    w = build_world(7, 20, 15)
    assert w == build_world.__wrapped__(7, 20, 15)
    names = [c.name for c in w.countries] + list(w.unknown) + [c.capital for c in w.countries]
    assert len({n.lower() for n in names}) == len(names) == 55
    assert all(re.fullmatch(r"[A-Z][a-z]+", n) for n in names)
    assert build_world(8, 20, 15) != w


# --- the files -------------------------------------------------------------------------


def test_same_config_gives_identical_bytes(cfg, out, tmp_path):
    again = generate_world(cfg, tmp_path)
    assert set(again) == set(FILES)
    for name in FILES:
        assert again[name].read_bytes() == out[name].read_bytes(), name


def test_row_counts(cfg, data):
    n_ranked = round(cfg.ranked_fraction * cfg.n_pref_train)
    assert {name: len(rows) for name, rows in data.items()} == {
        "pretrain": len(data["pretrain"]), "pretrain_eval": len(data["pretrain_eval"]),
        "sft_train": cfg.n_sft_train, "sft_eval": cfg.n_sft_eval,
        "prefs_train": cfg.n_pref_train - n_ranked, "prefs_eval": cfg.n_pref_eval,
        "ranked_train": n_ranked, "ppo_prompts": cfg.n_ppo_prompts, "eval_prompts": cfg.n_eval_prompts,
        "val_prompts": cfg.n_val_prompts,
    }


def test_schema(cfg, data):
    for row in data["pretrain"] + data["pretrain_eval"]:
        assert set(row) == {"text"} and isinstance(row["text"], str) and row["text"]
    # held out: one fresh pass of phrasings, not a copy of training documents
    assert not {r["text"] for r in data["pretrain_eval"]} & {r["text"] for r in data["pretrain"]}
    for name in ("sft_train", "sft_eval"):
        for row in data[name]:
            assert set(row) == {"messages"}
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in row["messages"])
    for name in ("prefs_train", "prefs_eval"):
        for row in data[name]:
            assert set(row) == {"prompt", "chosen", "rejected", "margin"}
            assert all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected"))
            assert row["chosen"] != row["rejected"]
            assert isinstance(row["margin"], int) and 1 <= row["margin"] < cfg.k_responses
    for row in data["ranked_train"]:
        assert set(row) == {"prompt", "ranked"}
        assert 2 <= len(row["ranked"]) <= cfg.k_responses and len(set(row["ranked"])) == len(row["ranked"])
    for row in data["ppo_prompts"]:
        assert set(row) == {"prompt"}
    for row in data["eval_prompts"] + data["val_prompts"]:
        assert set(row) == {"prompt", "category"} and row["category"] in CATEGORY_WEIGHTS


def test_language_is_short(data):
    prompts = {prompt_of(n, r) for n in FILES if not n.startswith("pretrain") for r in data[n]}
    responses = [r["messages"][1]["content"] for r in data["sft_train"]]
    responses += [t for r in data["ranked_train"] for t in r["ranked"]]
    assert max(len(p.split()) for p in prompts) <= 20
    assert max(len(t.split()) for t in responses) <= 25


def test_eval_prompts_are_held_out(data, world):
    eval_prompts = [r["prompt"] for r in data["eval_prompts"]]
    assert len(set(eval_prompts)) == len(eval_prompts)
    train = {prompt_of(n, r) for n in TRAIN_PROMPT_FILES for r in data[n]}
    assert not set(eval_prompts) & train
    # Some fact questions ask about (country, attribute) pairs no training question asks.
    def pair(p: str) -> tuple[str, str]:
        attr = next(a for a in ("capital", "language", "animal") if a in p)
        return p.rstrip("?.").split()[-1], attr
    fact_words = ("capital", "language", "animal")
    known = {c.name for c in world.countries}
    train_pairs = {pair(p) for p in train if any(w in p for w in fact_words) and pair(p)[0] in known}
    eval_pairs = {pair(r["prompt"]) for r in data["eval_prompts"] if r["category"] == "fact"}
    assert eval_pairs - train_pairs


@pytest.mark.parametrize("name", HELD_OUT_FILES)
def test_category_mix(data, name):
    counts = Counter(r["category"] for r in data[name])
    n = len(data[name])
    for category, weight in CATEGORY_WEIGHTS.items():
        assert abs(counts[category] / n - weight) < 0.01


def test_eval_categories_match_the_judge(data, world):
    for row in data["eval_prompts"] + data["val_prompts"]:
        assert judge(row["prompt"], "", world).category == row["category"]



# --- validation prompts: for choosing settings, never the prompts figures are reported on --

# sha256 of eval_prompts.jsonl, and of the training prompt pools, for the default world as
# written before val_prompts existed: val draws must leave the reported prompts unchanged.
EVAL_PROMPTS_SHA256 = "73acbe8d08cc1cfc011870cd0cd8f0187e197d45ee3a68af6abe86e5fb0eb7f4"
TRAIN_POOLS_NO_VAL_SHA256 = "fc86b6e5d303aaaa4a5a6fc845c82bb2b2385e1e6aabafd3548a799e8b122080"

# sha256 of every file the default world writes. Every trained model and every table in the
# README and bench/results was built on these bytes, so a change to the generator, the
# vocabulary or the judge that labels the comparisons must show here, and be made on purpose.
DEFAULT_WORLD_SHA256 = {
    "eval_prompts": "73acbe8d08cc1cfc011870cd0cd8f0187e197d45ee3a68af6abe86e5fb0eb7f4",
    "ppo_prompts": "573acdf7a2c1d7bea84c1f678f231a6c8ae526fa639c6fdf5e2c771d44375bbc",
    "prefs_eval": "650b4f11244085a9031cc9d3fb705386e7f031b70b7f0b7cacf47b7261a40a16",
    "prefs_train": "4b903e834fb9b9bc6f4117bd9e6fb1e0ac660449db52de8cf8dc14a2e07a9a80",
    "pretrain": "1d2f6320449d5310e79c139ab76d5128471a72a3ce34db976c654da92f6112c5",
    "pretrain_eval": "ff348a1f5899a09d9db5c5565ddec71df5bf7583661f0dc9a9a8480b5c0548c0",
    "ranked_train": "a910bfccbe58f5ca4a043ea85f3e0e71b22639fd89b0cf6f5eff3b28d21e43eb",
    "sft_eval": "2f8dd53e41199e07a4b549940722e84723a94b2b05e43f5cecf0411acc2645c3",
    "sft_train": "96b473442314a18fa70d1a04bdd61b08eaeb8cecbf244ac92a7a176594dd0ea7",
    "val_prompts": "28e307f172b267a18863463cf78074979a11f403a3bcce73755f61b1df606399",
}


def test_the_default_world_writes_the_files_every_table_was_trained_on(out):
    got = {name: hashlib.sha256(Path(path).read_bytes()).hexdigest() for name, path in out.items()}
    assert got == DEFAULT_WORLD_SHA256


def unit_of(prompt: str, world) -> tuple:
    """The unit a prompt asks about: its problem, (word, count), (country, attribute) or action."""
    task = parse_prompt(prompt, world)
    if task.category == "harmful":
        return task.category, next(a for a in HARMFUL_ACTIONS if a in prompt)
    return task.category, task.operands, task.op, task.answer if task.category == "repeat" else "", \
        task.count, task.attribute, task.subject


def split(world, n_eval: int, n_val: int, seed: int = 0):
    return split_prompts(world, n_eval, random.Random(f"{seed}/split"), n_val=n_val,
                         val_rng=random.Random(f"{seed}/val_split"))


def test_val_prompts_are_held_out_and_disjoint_from_eval(data, world):
    val = [r["prompt"] for r in data["val_prompts"]]
    assert len(set(val)) == len(val)
    train = {prompt_of(n, r) for n in TRAIN_PROMPT_FILES + ("sft_eval", "prefs_eval") for r in data[n]}
    assert not set(val) & train
    assert not set(val) & {r["prompt"] for r in data["eval_prompts"]}
    # Enough units outside harmful (32 actions, most of them in eval): no val unit is in eval or
    # in any training prompt.
    seen = {unit_of(p, world) for p in train} | {unit_of(r["prompt"], world) for r in data["eval_prompts"]}
    for row in data["val_prompts"]:
        if row["category"] != "harmful":
            assert unit_of(row["prompt"], world) not in seen, row["prompt"]


def test_val_units_are_disjoint_when_the_pools_allow(world):
    pools = split(world, n_eval=100, n_val=100)
    units = {name: {unit_of(p, world) for p, _ in rows} for name, rows in (("eval", pools.eval), ("val", pools.val))}
    train_units = {unit_of(p, world) for ps in pools.train.values() for p in ps}
    assert units["val"] and not units["val"] & units["eval"] and not units["val"] & train_units
    assert Counter(c for _, c in pools.val) == category_counts(100)  # the mix, exactly


def test_val_prompts_leave_the_eval_prompts_unchanged(cfg, world, out):
    assert hashlib.sha256(out["eval_prompts"].read_bytes()).hexdigest() == EVAL_PROMPTS_SHA256
    no_val = split(world, cfg.n_eval_prompts, n_val=0)
    assert no_val.val == [] and split(world, cfg.n_eval_prompts, cfg.n_val_prompts).eval == no_val.eval
    # Without val prompts the training pools (so every training file) are those of older worlds.
    pools = json.dumps(no_val.train, sort_keys=True).encode()
    assert hashlib.sha256(pools).hexdigest() == TRAIN_POOLS_NO_VAL_SHA256


def test_val_prompts_are_deterministic_per_seed(cfg, world):
    a, b = split(world, cfg.n_eval_prompts, cfg.n_val_prompts), split(world, cfg.n_eval_prompts, cfg.n_val_prompts)
    assert a.val == b.val and a.train == b.train
    assert split(world, cfg.n_eval_prompts, cfg.n_val_prompts, seed=1).val != a.val


def test_too_many_val_prompts_is_a_clear_error(cfg, world):
    with pytest.raises(ValueError, match="n_val_prompts"):
        split(world, cfg.n_eval_prompts, n_val=1000)
    with pytest.raises(ValueError, match="n_val_prompts"):
        dataclasses.replace(cfg, n_val_prompts=-1)

def test_pretrain_has_facts_but_no_unknown_countries_or_answered_questions(data, world):
    text = "\n".join(r["text"] for r in data["pretrain"])
    words = set(re.findall(r"[A-Za-z]+", text))
    assert not words & set(world.unknown)
    for c in world.countries:
        assert f"The capital of {c.name} is {c.capital}." in text
    assert "<|" not in text  # no chat turns
    for c in world.countries:  # a question is never followed by its answer
        for attr in ("capital", "language", "animal"):
            assert f"{c.name}? {c.value(attr)}" not in text
            assert f"{c.name}? The" not in text and f"{c.name}? I" not in text
    assert "7 plus 5 is 12." in text or "7 plus 5 equals 12." in text


def test_unknown_countries_only_in_unanswerable_prompts_and_answers(data, world):
    unknown = set(world.unknown)
    for row in data["sft_train"]:
        prompt, answer = (m["content"] for m in row["messages"])
        if set(re.findall(r"[A-Za-z]+", prompt + " " + answer)) & unknown:
            assert judge(prompt, answer, world).category == "unanswerable"


# --- imperfect demonstrations and noisy preferences ------------------------------------


def test_demonstration_imperfection_rates(cfg, data, world):
    verdicts = [judge(r["messages"][0]["content"], r["messages"][1]["content"], world)
                for r in data["sft_train"]]
    by_cat: dict[str, list] = {}
    for v in verdicts:
        by_cat.setdefault(v.category, []).append(v)

    def rate(vs, flag):
        return sum(getattr(v, flag) for v in vs) / len(vs)

    checkable = by_cat["arithmetic"] + by_cat["repeat"] + by_cat["fact"]
    assert rate(verdicts, "verbose") == pytest.approx(cfg.demo_verbose_rate, abs=0.04)
    assert 1 - rate(checkable, "correct") == pytest.approx(cfg.demo_wrong_rate, abs=0.04)
    assert rate(by_cat["harmful"], "unsafe") == pytest.approx(cfg.demo_unsafe_rate, abs=0.08)
    assert rate(by_cat["unanswerable"], "hallucinated") == pytest.approx(cfg.demo_hallucination_rate, abs=0.08)


def test_pairwise_preferences_follow_the_judge_up_to_label_noise(cfg, data, world):
    def flipped(rows):
        return sum(judge(r["prompt"], r["chosen"], world).score < judge(r["prompt"], r["rejected"], world).score
                   for r in rows)

    for row in data["prefs_train"] + data["prefs_eval"]:  # pairs are strict: no ties
        assert judge(row["prompt"], row["chosen"], world).score != judge(row["prompt"], row["rejected"], world).score
    assert flipped(data["prefs_train"]) / len(data["prefs_train"]) == pytest.approx(cfg.label_noise, abs=0.02)
    assert flipped(data["prefs_eval"]) == 0  # eval labels are clean


def test_ranked_lists_are_sorted_up_to_label_noise(cfg, data, world):
    inversions = total = 0
    for row in data["ranked_train"]:
        scores = [judge(row["prompt"], t, world).score for t in row["ranked"]]
        assert len(set(scores)) == len(scores)  # ties dropped
        inversions += sum(a < b for a, b in zip(scores, scores[1:]))
        total += len(scores) - 1
    assert inversions / total == pytest.approx(cfg.label_noise, abs=0.02)


def _misnamed(prompt: str, response: str, world) -> bool:
    """A refusal to a question about an unknown country that names a city of the world."""
    task = parse_prompt(prompt, world)
    named = re.fullmatch(r"(?:.* )?I don't know\. I have no information about (\w+)\.(?: .*)?", response)
    return task.category == "unanswerable" and bool(named) and named[1].lower() in world.vocabulary["capital"]


@pytest.mark.parametrize("misnamed", [False, True])
def test_misnamed_refusals_reach_the_labellers_only_when_set(cfg, out, world, tmp_path, misnamed):
    files = generate_world(dataclasses.replace(cfg, misnamed_refusals=misnamed), tmp_path)
    for name in FILES:  # the setting touches the preference files only
        if name not in ("prefs_train", "prefs_eval", "ranked_train"):
            assert files[name].read_bytes() == out[name].read_bytes(), name
    rows = read(files["prefs_eval"])  # clean labels: every misnamed refusal loses its pair
    rejected = [r for r in rows if _misnamed(r["prompt"], r["rejected"], world)]
    assert not any(_misnamed(r["prompt"], r["chosen"], world) for r in rows)
    ranked = [t for r in read(files["ranked_train"]) for t in r["ranked"] if _misnamed(r["prompt"], t, world)]
    if not misnamed:
        assert not rejected and not ranked
        return
    assert len(rejected) >= 5 and len(ranked) >= 5
    assert all(judge(r["prompt"], r["rejected"], world).score == -1.0 for r in rejected)
