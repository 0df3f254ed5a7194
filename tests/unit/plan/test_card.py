"""pipeline.plan.card: card sizes as a user writes them."""

import pytest

from pipeline.core.errors import ConfigError
from pipeline.plan.card import budget, parse_bytes, show_bytes, the_card

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("value, expected", [
    ("24GiB", 24 * 2 ** 30), ("80GB", 80 * 10 ** 9), ("24e9", 24 * 10 ** 9), (24e9, 24 * 10 ** 9),
    ("1MiB", 2 ** 20), ("512 mib", 512 * 2 ** 20), (1000, 1000), ("1.5GiB", 3 * 2 ** 29), ("2TB", 2 * 10 ** 12),
    ("1", 1),  # the smallest size there is
])
def test_sizes_parse_with_decimal_and_binary_units(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["24 gigs", "GiB", "-1GiB", "0", "0.5", True, "nan", "1e400"])
def test_a_size_that_means_nothing_is_refused_with_the_key_and_examples(value):
    with pytest.raises(ConfigError, match=r"gpu_memory=.* must be a size: .*24GiB, 80GB"):
        parse_bytes(value)


def test_sizes_read_back_and_the_budget_keeps_a_tenth_free():
    assert [show_bytes(n) for n in (24 * 2 ** 30, 2 ** 20, 1536, 12)] == ["24.00 GiB", "1.00 MiB", "1.50 KiB", "12 B"]
    assert budget(100) == 90
    assert the_card("24GiB") == (24 * 2 ** 30, "gpu_memory=24GiB")
