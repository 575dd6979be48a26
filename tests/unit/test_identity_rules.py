"""The authorization rules for each kind of identity, as every listener applies them."""

from __future__ import annotations

import pytest

from kvmotion.api.identity import ADMINISTER, HOSTS, OPERATE, VIEW, Identity, Kind, Role, authorize
from kvmotion.core.errors import Forbidden

CENTER = Identity(Kind.CENTER, "center")


@pytest.mark.parametrize("rule", [VIEW, OPERATE, ADMINISTER])
def test_the_center_passes_every_rule_a_user_may(rule) -> None:
    assert rule.allows(CENTER) and rule.allows(Identity(Kind.USER, "root", Role.ADMIN))
    assert authorize(CENTER, rule, "do it") is CENTER


def test_the_center_is_no_host_and_hosts_are_no_users() -> None:
    with pytest.raises(Forbidden, match="center:center may not talk host to host: allowed for host identities"):
        authorize(CENTER, HOSTS, "talk host to host")
    assert not OPERATE.allows(Identity(Kind.HOST, "host-b")) and not ADMINISTER.allows(Identity(Kind.HOST, "host-b"))
    assert not VIEW.allows(Identity(Kind.QEMU, "host-a")) and not VIEW.allows(Identity(Kind.DATASTORE, "ds1"))
