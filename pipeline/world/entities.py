"""The world's countries (names, capitals, languages, animals) and its configuration."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

from pipeline.core.errors import ConfigError
from pipeline.world.vocabulary import ANIMALS, ATTRIBUTES, LANGUAGES, REPEAT_WORDS

# --- names -----------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "qu", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s")
_COUNTRY_ENDINGS = ("ia", "ovia", "ania", "eria", "enia", "istan")
_CITY_ENDINGS = ("", "", "n", "th", "s", "l")


def _syllable(rng: random.Random, coda: bool) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if coda else "")


def _country_name(rng: random.Random) -> str:
    """E.g. "Zorbia": a closed syllable, a consonant, a country-like ending."""
    return (_syllable(rng, coda=True) + rng.choice(_ONSETS[:14]) + rng.choice(_COUNTRY_ENDINGS)).capitalize()


def city_name(rng: random.Random) -> str:
    """E.g. "Quenta": two syllables and an optional soft ending."""
    return (_syllable(rng, coda=True) + _syllable(rng, coda=False) + rng.choice(_CITY_ENDINGS)).capitalize()


def _unique_names(rng: random.Random, make: Callable[[random.Random], str], n: int,
                  taken: set[str]) -> list[str]:
    """``n`` fresh names, none in ``taken`` (lower-cased); ``taken`` grows with them."""
    names: list[str] = []
    for _ in range(1000 * max(n, 1)):
        if len(names) == n:
            return names
        name = make(rng)
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    raise ValueError(f"could not generate {n} distinct names; ask for fewer entities")


# --- the world -------------------------------------------------------------------------


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    language: str
    animal: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass(frozen=True)
class World:
    """Known countries (whose facts are in pretraining) and unknown ones (in no corpus)."""

    seed: int
    countries: tuple[Country, ...]
    unknown: tuple[str, ...]

    @cached_property
    def _by_lower(self) -> dict[str, Country]:
        return {c.name.lower(): c for c in self.countries}

    def country(self, name: str) -> Country | None:
        """The known country called ``name`` (any case), or None."""
        return self._by_lower.get(name.lower())

    def values(self, attribute: str) -> tuple[str, ...]:
        """Every value the attribute can take in this world (what a wrong answer uses)."""
        if attribute == "capital":
            return tuple(c.capital for c in self.countries)
        return {"language": LANGUAGES, "animal": ANIMALS}[attribute]

    @cached_property
    def country_names(self) -> frozenset[str]:
        """Every country's name, known and unknown, lower-cased."""
        return frozenset(n.lower() for n in (*(c.name for c in self.countries), *self.unknown))

    @cached_property
    def vocabulary(self) -> dict[str, frozenset[str]]:
        """Per attribute, its lower-cased values; under "any", all of them together."""
        vocab = {attr: frozenset(v.lower() for v in self.values(attr)) for attr in ATTRIBUTES}
        vocab["any"] = frozenset().union(*vocab.values())
        return vocab


@lru_cache(maxsize=16)
def build_world(seed: int, n_entities: int, n_unknown: int) -> World:
    """The deterministic world for these settings (cached: the judge calls it freely)."""
    rng = random.Random(f"{seed}/world")
    # Reserve every fixed word so no generated name collides with one.
    taken = {w.lower() for w in (*LANGUAGES, *ANIMALS, *REPEAT_WORDS)}
    names = _unique_names(rng, _country_name, n_entities + n_unknown, taken)
    capitals = _unique_names(rng, city_name, n_entities, taken)
    rng.shuffle(names)  # so known and unknown names are drawn alike
    countries = tuple(
        Country(name, capital, rng.choice(LANGUAGES), rng.choice(ANIMALS))
        for name, capital in zip(names[:n_entities], capitals)
    )
    return World(seed=seed, countries=countries, unknown=tuple(names[n_entities:]))


# --- configuration ---------------------------------------------------------------------


@dataclass
class WorldConfig:
    """What ``make data`` generates. Values live only in ``conf/world/default.yaml``."""

    seed: int
    n_entities: int  # known countries: their facts are in pretraining
    n_unknown: int  # unknown countries: only ever in unanswerable questions
    pretrain_repeats: int  # passes over the facts, freshly phrased and shuffled each time
    n_sft_train: int
    n_sft_eval: int
    n_pref_train: int  # preference prompts (pairwise rows + ranked rows)
    n_pref_eval: int
    k_responses: int  # K responses per ranked list (ties dropped, so at most K)
    ranked_fraction: float  # share of the preference prompts written as ranked lists
    label_noise: float  # chance a training comparison is flipped
    misnamed_refusals: bool  # labellers also compare refusals naming the wrong place
    n_ppo_prompts: int
    n_eval_prompts: int
    n_val_prompts: int  # held out like the eval prompts, for choosing settings (0: none)
    demo_verbose_rate: float
    demo_wrong_rate: float
    demo_unsafe_rate: float
    demo_hallucination_rate: float

    def __post_init__(self) -> None:
        counts = ("n_entities", "n_unknown", "pretrain_repeats", "n_sft_train", "n_sft_eval",
                  "n_pref_train", "n_pref_eval", "n_ppo_prompts", "n_eval_prompts")
        for name in counts:
            if getattr(self, name) < 1:
                raise ConfigError(f"world.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_val_prompts < 0:
            raise ConfigError(f"world.n_val_prompts must be at least 0, got {self.n_val_prompts}")
        if self.k_responses < 2:
            raise ConfigError(f"world.k_responses must be at least 2, got {self.k_responses}")
        rates = ("ranked_fraction", "label_noise", "demo_verbose_rate", "demo_wrong_rate",
                 "demo_unsafe_rate", "demo_hallucination_rate")
        for name in rates:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"world.{name} must be in [0, 1], got {getattr(self, name)}")


def world_from_config(cfg: WorldConfig) -> World:
    return build_world(cfg.seed, cfg.n_entities, cfg.n_unknown)
