"""LeaseTable and the write rule, with a fake clock."""

from __future__ import annotations

import pytest

from kvmotion.errors import InvalidInput, LeaseError
from kvmotion.storage.lease import ExportName, Lease, LeaseTable, WriteRefusal, check_flush, check_write

TTL = 10.0


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> LeaseTable:
    return LeaseTable(TTL, clock)


def test_acquire_gives_generation_one_and_ttl(table: LeaseTable, clock: FakeClock) -> None:
    lease = table.acquire("web1.img", "host-a", "web1")
    assert lease == Lease("web1.img", "host-a", "web1", 1, clock.t + TTL)
    assert table.holder("web1.img") == lease
    assert table.generation("web1.img") == 1


def test_second_writer_is_refused_while_lease_lives(table: LeaseTable) -> None:
    table.acquire("web1.img", "host-a", "web1")
    with pytest.raises(LeaseError, match="leased to host-a"):
        table.acquire("web1.img", "host-b", "web1")
    with pytest.raises(LeaseError, match="leased to host-a"):
        table.acquire("web1.img", "host-a", "other-vm")  # one writer per disk, even on one host


def test_owner_acquiring_again_renews_same_generation(table: LeaseTable, clock: FakeClock) -> None:
    first = table.acquire("web1.img", "host-a", "web1")
    clock.advance(4)
    again = table.acquire("web1.img", "host-a", "web1")
    assert again.generation == first.generation
    assert again.expires_at == clock.t + TTL


def test_renew_extends_and_keeps_generation(table: LeaseTable, clock: FakeClock) -> None:
    table.acquire("web1.img", "host-a", "web1")
    clock.advance(9)
    lease = table.renew("web1.img", "host-a")
    assert lease.generation == 1 and lease.expires_at == clock.t + TTL
    clock.advance(9)
    assert table.holder("web1.img") is not None


def test_unrenewed_lease_expires_and_cannot_be_renewed(table: LeaseTable, clock: FakeClock) -> None:
    table.acquire("web1.img", "host-a", "web1")
    clock.advance(TTL)  # expires_at is exclusive
    assert table.holder("web1.img") is None
    with pytest.raises(LeaseError, match="expired"):
        table.renew("web1.img", "host-a")


def test_expired_lease_goes_to_next_writer_with_new_generation(table: LeaseTable, clock: FakeClock) -> None:
    table.acquire("web1.img", "host-a", "web1")
    clock.advance(TTL + 1)
    lease = table.acquire("web1.img", "host-b", "web1")
    assert (lease.host, lease.generation) == ("host-b", 2)
    with pytest.raises(LeaseError, match="leased to host-b"):
        table.renew("web1.img", "host-a")


def test_renew_refusals(table: LeaseTable) -> None:
    with pytest.raises(LeaseError, match="no lease"):
        table.renew("web1.img", "host-a")
    table.acquire("web1.img", "host-a", "web1")
    with pytest.raises(LeaseError, match="leased to host-a"):
        table.renew("web1.img", "host-b")


def test_transfer_moves_lease_with_new_generation(table: LeaseTable, clock: FakeClock) -> None:
    table.acquire("web1.img", "host-a", "web1")
    clock.advance(5)
    lease = table.transfer("web1.img", "host-a", "host-b", "web1")
    assert lease == Lease("web1.img", "host-b", "web1", 2, clock.t + TTL)
    with pytest.raises(LeaseError):
        table.renew("web1.img", "host-a")
    back = table.transfer("web1.img", "host-b", "host-a", "web1")  # abort after switchover
    assert (back.host, back.generation) == ("host-a", 3)


@pytest.mark.parametrize("setup", ["none", "other", "expired"])
def test_transfer_refused_unless_from_host_holds_live_lease(table: LeaseTable, clock: FakeClock, setup: str) -> None:
    if setup == "other":
        table.acquire("web1.img", "host-c", "web1")
    elif setup == "expired":
        table.acquire("web1.img", "host-a", "web1")
        clock.advance(TTL)
    with pytest.raises(LeaseError, match="cannot transfer"):
        table.transfer("web1.img", "host-a", "host-b", "web1")
    holder = table.holder("web1.img")
    assert holder is None or holder.host == "host-c"


def test_transfer_to_itself_needs_the_generation_and_reissues(table: LeaseTable) -> None:
    table.acquire("web1.img", "host-a", "web1")
    with pytest.raises(InvalidInput):
        table.transfer("web1.img", "host-a", "host-a", "web1")
    reissued = table.transfer("web1.img", "host-a", "host-a", "web1", generation=1)  # with its generation: a re-issue
    assert (reissued.host, reissued.generation) == ("host-a", 2)
    with pytest.raises(LeaseError, match="generation 2 now, not 1"):
        table.transfer("web1.img", "host-a", "host-b", "web1", generation=1)


def test_release_and_generations_never_repeat(table: LeaseTable) -> None:
    table.acquire("web1.img", "host-a", "web1")
    table.release("web1.img", "host-a")
    assert table.holder("web1.img") is None
    table.release("web1.img", "host-a")  # idempotent
    assert table.acquire("web1.img", "host-a", "web1").generation == 2


def test_release_by_non_holder_is_refused(table: LeaseTable) -> None:
    table.acquire("web1.img", "host-a", "web1")
    with pytest.raises(LeaseError):
        table.release("web1.img", "host-b")
    assert table.holder("web1.img") is not None


def test_expire_drops_only_expired(table: LeaseTable, clock: FakeClock) -> None:
    table.acquire("a.img", "host-a", "vm1")
    clock.advance(6)
    table.acquire("b.img", "host-a", "vm2")
    clock.advance(5)
    gone = table.expire()
    assert [lease.disk for lease in gone] == ["a.img"]
    assert [lease.disk for lease in table.leases()] == ["b.img"]
    assert table.generation("a.img") == 1


def test_json_roundtrip_keeps_leases_and_generations(table: LeaseTable, clock: FakeClock) -> None:
    table.acquire("a.img", "host-a", "vm1")
    table.transfer("a.img", "host-a", "host-b", "vm1")
    table.acquire("b.img", "host-a", "vm2")
    table.release("b.img", "host-a")
    copy = LeaseTable.from_json(table.to_json(), TTL, clock)
    assert copy.holder("a.img") == table.holder("a.img")
    assert copy.generation("a.img") == 2 and copy.generation("b.img") == 1
    assert copy.acquire("b.img", "host-c", "vm3").generation == 2


def test_bad_inputs() -> None:
    with pytest.raises(InvalidInput):
        LeaseTable(0)
    table = LeaseTable(TTL, FakeClock())
    with pytest.raises(InvalidInput):
        table.acquire("../etc/passwd", "host-a", "vm")
    with pytest.raises(InvalidInput):
        table.acquire("web1.img", "host a", "vm")


# -- the write rule the NBD server applies ---------------------------------------------------

NOW = 1000.0
LEASE = Lease("web1.img", "host-a", "web1", 4, NOW + 5)


@pytest.mark.parametrize(
    ("lease", "host", "bound", "refusal"),
    [
        (LEASE, None, None, WriteRefusal.READ_ONLY),
        (None, "host-a", None, WriteRefusal.NO_LEASE),
        (None, "host-a", 4, WriteRefusal.NO_LEASE),
        (LEASE, "host-b", None, WriteRefusal.NOT_HOLDER),
        (Lease("web1.img", "host-a", "web1", 4, NOW), "host-a", 4, WriteRefusal.EXPIRED),
        (LEASE, "host-a", 3, WriteRefusal.STALE),
    ],
)
def test_check_write_refusals(lease: Lease | None, host: str | None, bound: int | None, refusal: WriteRefusal) -> None:
    check = check_write(lease, host, bound, NOW)
    assert check.refusal is refusal and not check.allowed


def test_check_write_binds_first_write_to_current_generation() -> None:
    assert check_write(LEASE, "host-a", None, NOW).generation == 4
    assert check_write(LEASE, "host-a", 4, NOW).allowed


def test_connection_opened_before_handoff_writes_only_after_it() -> None:
    """The destination's shadow VM connects early; it writes after transfer, not before."""
    clock = FakeClock(NOW)
    table = LeaseTable(TTL, clock)
    table.acquire("web1.img", "host-a", "web1")
    src_bound = check_write(table.holder("web1.img"), "host-a", None, clock()).generation
    dst_bound: int | None = None
    assert check_write(table.holder("web1.img"), "host-b", dst_bound, clock()).refusal is WriteRefusal.NOT_HOLDER
    table.transfer("web1.img", "host-a", "host-b", "web1")
    dst = check_write(table.holder("web1.img"), "host-b", dst_bound, clock())
    assert dst.allowed and dst.generation == 2
    assert check_write(table.holder("web1.img"), "host-a", src_bound, clock()).refusal is WriteRefusal.NOT_HOLDER
    # The lease comes back to host-a: its old connection stays fenced, a new one may write.
    table.transfer("web1.img", "host-b", "host-a", "web1")
    assert check_write(table.holder("web1.img"), "host-a", src_bound, clock()).refusal is WriteRefusal.STALE
    assert check_write(table.holder("web1.img"), "host-a", None, clock()).generation == 3
    assert check_write(table.holder("web1.img"), "host-b", dst.generation, clock()).refusal is WriteRefusal.NOT_HOLDER


def test_flush_needs_the_lease_but_not_the_connections_generation() -> None:
    """A connection bound to generation 3 may flush once its host holds the lease again (under 4,
    after a rolled-back handoff): QEMU flushes the old node when it reopens onto a new connection.
    Writes stay refused, and a flush binds nothing."""
    assert check_write(LEASE, "host-a", 3, NOW).refusal is WriteRefusal.STALE
    assert check_flush(LEASE, "host-a", 3, NOW).allowed and check_flush(LEASE, "host-a", 3, NOW).generation == 3
    assert check_flush(LEASE, "host-a", None, NOW).generation is None
    assert check_flush(LEASE, "host-a", 4, NOW).allowed
    for lease, host, refusal in [
        (LEASE, None, WriteRefusal.READ_ONLY),
        (None, "host-a", WriteRefusal.NO_LEASE),
        (LEASE, "host-b", WriteRefusal.NOT_HOLDER),
        (Lease("web1.img", "host-a", "web1", 4, NOW), "host-a", WriteRefusal.EXPIRED),
    ]:
        assert check_flush(lease, host, 3, NOW).refusal is refusal


def test_export_names() -> None:
    assert ExportName.parse("web1.img@host-b") == ExportName("web1.img", "host-b")
    assert ExportName.parse("web1.img") == ExportName("web1.img", None)
    assert str(ExportName("web1.img", "host-b")) == "web1.img@host-b"
    for bad in ("", "@host", "web1.img@", "a/b", "web1.img@host@x", ".hidden"):
        with pytest.raises(InvalidInput):
            ExportName.parse(bad)


def test_resume_after_outage_restores_leases_live_when_the_service_went_down(
    table: LeaseTable, clock: FakeClock
) -> None:
    table.acquire("gone.img", "host-c", "vm0")  # expires at 1010, before the outage
    clock.advance(8)
    table.acquire("a.img", "host-a", "vm1")  # expires at 1018
    table.acquire("b.img", "host-b", "vm2")
    down_at = clock.t + 4  # the service dies at 1012 ...
    clock.advance(20)  # ... and is back at 1028: a.img and b.img expired meanwhile
    assert table.holder("a.img") is None
    resumed = table.resume_after_outage(down_at)
    assert sorted(lease.disk for lease in resumed) == ["a.img", "b.img"]
    lease = table.holder("a.img")
    assert lease is not None and (lease.host, lease.generation, lease.expires_at) == ("host-a", 1, clock.t + TTL)
    assert table.renew("a.img", "host-a").generation == 1  # same generation: connections stay bound
    assert table.holder("gone.img") is None  # already expired when the service went down
    assert table.acquire("gone.img", "host-d", "vm3").generation == 2


def test_resume_after_outage_never_shortens_a_lease(table: LeaseTable, clock: FakeClock) -> None:
    table.acquire("a.img", "host-a", "vm1")
    clock.advance(1)
    assert table.resume_after_outage(clock.t - 0.5) == [table.holder("a.img")]
    assert table.holder("a.img").expires_at == clock.t + TTL  # type: ignore[union-attr]
    before = table.holder("a.img")
    assert table.resume_after_outage(clock.t) == []  # already a full TTL left
    assert table.holder("a.img") == before
