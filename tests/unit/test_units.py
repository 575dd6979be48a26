import pytest

from kvmotion.core.errors import InvalidInput
from kvmotion.core.units import format_duration, format_size, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize("text,expected", [("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("4096", 4096), ("64k", 65536)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [("1gbit", 125_000_000), ("10Gbit", 1_250_000_000), ("1gbps", 125_000_000),
                                           ("100M", 100_000_000), ("1G", 10**9)])
def test_parse_rate_bits_and_bytes(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text,expected", [("300ms", 0.3), ("2s", 2.0), ("1.5m", 90.0), ("5", 5.0)])
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("fn,text", [(parse_size, "lots"), (parse_rate, "fast"), (parse_duration, "soon"), (parse_size, "-1M")])
def test_bad_input_is_invalid_input(fn, text):
    with pytest.raises(InvalidInput):
        fn(text)


def test_format():
    assert format_size(512 << 20) == "512.0 MiB"
    assert format_duration(0.0123) == "12 ms"
    assert format_duration(75) == "1m15s"
