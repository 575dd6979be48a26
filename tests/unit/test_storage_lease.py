"""LeaseTable and the write rule, with a fake clock."""

from __future__ import annotations

import json
import random

import pytest

from kvmotion.api.disks import Lease
from kvmotion.core.errors import Forbidden, InvalidInput, LeaseError
from kvmotion.storage.lease import ExportName, LeaseTable, WriteRefusal, check_flush, check_write

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
    lease = table.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
    assert lease == Lease("web1.img", "host-b", "web1", 2, clock.t + TTL, handed_over_by="host-a")
    with pytest.raises(LeaseError):
        table.renew("web1.img", "host-a")
    back = table.transfer("web1.img", "host-b", "host-a", "web1", by="host-a")  # abort after switchover
    assert (back.host, back.generation) == ("host-a", 3)


@pytest.mark.parametrize("setup", ["none", "other", "expired"])
def test_transfer_refused_unless_from_host_holds_live_lease(table: LeaseTable, clock: FakeClock, setup: str) -> None:
    if setup == "other":
        table.acquire("web1.img", "host-c", "web1")
    elif setup == "expired":
        table.acquire("web1.img", "host-a", "web1")
        clock.advance(TTL)
    with pytest.raises(LeaseError, match="cannot transfer"):
        table.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
    holder = table.holder("web1.img")
    assert holder is None or holder.host == "host-c"


def test_transfer_to_itself_needs_the_generation_and_reissues(table: LeaseTable) -> None:
    table.acquire("web1.img", "host-a", "web1")
    with pytest.raises(InvalidInput):
        table.transfer("web1.img", "host-a", "host-a", "web1", by="host-a")
    reissued = table.transfer("web1.img", "host-a", "host-a", "web1", generation=1, by="host-a")  # a re-issue
    assert (reissued.host, reissued.generation) == ("host-a", 2)
    with pytest.raises(LeaseError, match="generation 2 now, not 1"):
        table.transfer("web1.img", "host-a", "host-b", "web1", generation=1, by="host-a")


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
    table.transfer("a.img", "host-a", "host-b", "vm1", by="host-a")
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
    table.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
    dst = check_write(table.holder("web1.img"), "host-b", dst_bound, clock())
    assert dst.allowed and dst.generation == 2
    assert check_write(table.holder("web1.img"), "host-a", src_bound, clock()).refusal is WriteRefusal.NOT_HOLDER
    # The lease comes back to host-a: its old connection stays fenced, a new one may write.
    table.transfer("web1.img", "host-b", "host-a", "web1", by="host-a")
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


# ---- who may move a lease ---------------------------------------------------------------------------
def test_only_the_holder_hands_a_lease_on(table: LeaseTable) -> None:
    """host-b cannot move host-a's lease: not to a third host, not to itself."""
    table.acquire("web1.img", "host-a", "web1")
    with pytest.raises(Forbidden, match="host host-b may not move the lease"):
        table.transfer("web1.img", "host-a", "host-c", "web1", by="host-b")
    with pytest.raises(LeaseError, match="host-b did not hand it over"):
        table.transfer("web1.img", "host-a", "host-b", "web1", by="host-b")
    with pytest.raises(LeaseError, match="host-b did not hand it over"):
        table.transfer("web1.img", "host-a", "host-b", "web1", generation=1, by="host-b")
    lease = table.holder("web1.img")
    assert lease is not None and (lease.host, lease.generation, lease.handed_over_by) == ("host-a", 1, None)


def test_the_host_that_handed_it_over_takes_it_back_until_the_new_holder_renews(table: LeaseTable) -> None:
    table.acquire("web1.img", "host-a", "web1")
    moved = table.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
    assert moved.handed_over_by == "host-a"
    with pytest.raises(LeaseError, match="host-c did not hand it over"):
        table.transfer("web1.img", "host-b", "host-c", "web1", by="host-c")
    back = table.transfer("web1.img", "host-b", "host-a", "web1", by="host-a")  # rollback
    assert (back.host, back.generation, back.handed_over_by) == ("host-a", 3, None)
    with pytest.raises(LeaseError, match="host-b did not hand it over"):  # taking it back is not handing it over
        table.transfer("web1.img", "host-a", "host-b", "web1", by="host-b")
    table.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
    renewed = table.renew("web1.img", "host-b")  # the destination runs the VM: the lease is its own now
    assert renewed.handed_over_by is None
    with pytest.raises(LeaseError, match="has renewed it since"):
        table.transfer("web1.img", "host-b", "host-a", "web1", by="host-a")
    assert table.holder("web1.img").host == "host-b"  # type: ignore[union-attr]


def test_acquiring_again_counts_as_renewing(table: LeaseTable) -> None:
    table.acquire("web1.img", "host-a", "web1")
    table.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
    assert table.acquire("web1.img", "host-b", "web1").handed_over_by is None
    with pytest.raises(LeaseError):
        table.transfer("web1.img", "host-b", "host-a", "web1", by="host-a")


def test_a_lease_handed_on_twice_goes_back_one_step_only(table: LeaseTable) -> None:
    table.acquire("web1.img", "host-a", "web1")
    table.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
    table.renew("web1.img", "host-b")
    table.transfer("web1.img", "host-b", "host-c", "web1", by="host-b")
    with pytest.raises(LeaseError):
        table.transfer("web1.img", "host-c", "host-a", "web1", by="host-a")
    assert table.transfer("web1.img", "host-c", "host-b", "web1", by="host-b").host == "host-b"


def test_handed_over_by_survives_the_state_file_and_old_files_load() -> None:
    clock = FakeClock()
    table = LeaseTable(TTL, clock)
    table.acquire("web1.img", "host-a", "web1")
    table.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
    copy = LeaseTable.from_json(table.to_json(), TTL, clock)
    assert copy.holder("web1.img").handed_over_by == "host-a"  # type: ignore[union-attr]
    old = {"version": 1, "generations": {"web1.img": 1},
           "leases": [{"disk": "web1.img", "host": "host-a", "vm": "web1", "generation": 1, "expires_at": clock.t + 5}]}
    assert LeaseTable.from_json(json.dumps(old), TTL, clock).holder("web1.img").handed_over_by is None  # type: ignore[union-attr]


HOSTS = ("host-a", "host-b", "host-c")


def _random_step(rng: random.Random, table: LeaseTable, clock: FakeClock) -> tuple[str, str, Lease | None]:
    """One random call by a random host; returns (what, caller, result or None when refused)."""
    by = rng.choice(HOSTS)
    op = rng.choice(["acquire", "renew", "release", "transfer", "transfer", "transfer", "wait"])
    current = table.holder("web1.img")
    try:
        if op == "acquire":
            return op, by, table.acquire("web1.img", by, "web1")
        if op == "renew":
            return op, by, table.renew("web1.img", by)
        if op == "release":
            table.release("web1.img", by)
            return op, by, None
        if op == "transfer":
            from_host = current.host if current is not None and rng.random() < 0.8 else rng.choice(HOSTS)
            to_host = rng.choice(HOSTS)
            generation = current.generation if current is not None and rng.random() < 0.5 else None
            return op, by, table.transfer("web1.img", from_host, to_host, "web1", generation, by=by)
        clock.advance(rng.choice([1.0, 4.0, TTL + 1]))
        return op, by, None
    except (LeaseError, Forbidden, InvalidInput):
        return op, by, None


@pytest.mark.parametrize("seed", range(25))
def test_random_calls_never_let_a_host_take_another_hosts_live_lease(seed: int) -> None:
    """Property-style: from any sequence of calls by any hosts, a live lease changes hands only by
    its holder's call, or by the call of the host that handed it over, before the holder renewed;
    generations only grow, once per new lease; a lease never names its holder as the one that handed it over."""
    rng = random.Random(seed)
    clock = FakeClock()
    table = LeaseTable(TTL, clock)
    last_generation = 0
    for _ in range(400):
        before = table.holder("web1.img")
        op, by, _result = _random_step(rng, table, clock)
        after = table.holder("web1.img")
        assert table.generation("web1.img") >= last_generation
        if after is not None:
            assert after.handed_over_by != after.host
        if before is not None and after is not None and op != "wait" and (after.host, after.generation) != (before.host, before.generation):
            assert op == "transfer", (op, by, before, after)
            assert by == before.host or before.handed_over_by == by, (by, before, after)
            assert after.generation == last_generation + 1
        if before is not None and after is None and op == "release":
            assert by == before.host
        if after is not None and (before is None or after.generation != before.generation):
            assert after.generation == max(last_generation, before.generation if before else 0) + 1
        last_generation = table.generation("web1.img")
