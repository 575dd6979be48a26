"""Pure parts of kvmotion.net.links: TAP naming and derived MACs."""

import pytest

from kvmotion.core.errors import InvalidInput
from kvmotion.net.links import IFNAMSIZ, check_ifname, derived_mac, tap_name


def test_tap_name_is_deterministic_short_and_distinct():
    names = {tap_name(f"vm{i}", nic) for i in range(200) for nic in range(4)}
    assert len(names) == 800
    assert tap_name("web1", 0) == tap_name("web1", 0)
    assert tap_name("web1", 0) != tap_name("web1", 1)
    longest = tap_name("a-very-long-vm-name-of-31-chars", 99)
    assert len(longest) <= IFNAMSIZ


def test_tap_name_rejects_bad_index():
    with pytest.raises(InvalidInput):
        tap_name("web1", -1)
    with pytest.raises(InvalidInput):
        tap_name("web1", 100)


def test_check_ifname():
    assert check_ifname("br-vm") == "br-vm"
    for bad in ("", "x" * 16, "a/b", "a b"):
        with pytest.raises(InvalidInput):
            check_ifname(bad)


def test_derived_mac_is_stable_and_keeps_first_octet():
    mac = derived_mac("br-x", 0x02)
    assert mac == derived_mac("br-x", 0x02)
    assert mac.startswith("02:") and len(mac.split(":")) == 6
    assert derived_mac("br-y", 0xFE).startswith("fe:")
