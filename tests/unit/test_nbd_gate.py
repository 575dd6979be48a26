"""nbd_gate: the NBD option phase of the datastore's TLS front end, fed bytes by hand."""

from __future__ import annotations

import random
import struct

import pytest

from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.storage.nbd_gate import (
    GREETING,
    IHAVEOPT,
    MAX_OPTIONS,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REPLY_MAGIC,
    Action,
    Close,
    ConnectServer,
    Negotiation,
    Opened,
    Refused,
    Relay,
    Send,
    Side,
    StartTls,
    State,
    export_access,
)

FLAGS = struct.pack(">I", 3)  # fixed newstyle, no zeroes
HOST_A = Identity(Kind.HOST, "host-a")
QEMU_A = Identity(Kind.QEMU, "host-a")
QEMU_B = Identity(Kind.QEMU, "host-b")
OPERATOR = Identity(Kind.USER, "otto", Role.OPERATOR)
VIEWER = Identity(Kind.USER, "vera", Role.VIEWER)
DATASTORE = Identity(Kind.DATASTORE, "ds1")
INFO_EXPORT = struct.pack(">HQH", 0, 16 << 20, 0x1)  # NBD_INFO_EXPORT: size, transmission flags


def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def go(name: str, option: int = OPT_GO) -> bytes:
    raw = name.encode()
    return opt(option, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))


def reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, option, rtype, len(data)) + data


def reply_type(data: bytes) -> int:
    magic, _, rtype, _ = struct.unpack(">QIII", data[:20])
    assert magic == REPLY_MAGIC
    return rtype


def to(side: Side, actions: list[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send) and a.to is side)


def negotiated(who: Identity, client_flags: bytes = FLAGS) -> Negotiation:
    """A negotiation past STARTTLS and nbdkit's greeting, for `who`."""
    neg = Negotiation()
    assert neg.start() == [Send(Side.CLIENT, GREETING)]
    assert neg.receive(Side.CLIENT, client_flags) == []
    out = neg.receive(Side.CLIENT, opt(OPT_STARTTLS))
    assert out == [Send(Side.CLIENT, reply(OPT_STARTTLS, REP_ACK)), StartTls()]
    assert neg.expecting is None
    assert neg.tls_established(who) == [ConnectServer()]
    assert neg.expecting is Side.SERVER
    assert neg.receive(Side.SERVER, GREETING) == [Send(Side.SERVER, client_flags)]
    assert neg.state is State.OPTIONS
    return neg


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    assert GREETING == NBDMAGIC + IHAVEOPT + b"\x00\x03"


@pytest.mark.parametrize("option", [OPT_GO, OPT_INFO, OPT_LIST, 8, 99])
def test_options_before_tls_get_tls_required(option: int) -> None:
    neg = Negotiation()
    neg.receive(Side.CLIENT, FLAGS)
    out = neg.receive(Side.CLIENT, go("web1.img") if option in (OPT_GO, OPT_INFO) else opt(option))
    assert len(out) == 1 and reply_type(to(Side.CLIENT, out)) == REP_ERR_TLS_REQD
    assert neg.state is State.PLAIN_OPTIONS and to(Side.SERVER, out) == b""


def test_export_name_before_tls_closes_and_abort_is_acknowledged() -> None:
    neg = Negotiation()
    neg.receive(Side.CLIENT, FLAGS)
    [close] = neg.receive(Side.CLIENT, opt(OPT_EXPORT_NAME, b"web1.img@host-a"))
    assert isinstance(close, Close) and "requires TLS" in close.reason
    neg = Negotiation()
    neg.receive(Side.CLIENT, FLAGS)
    out = neg.receive(Side.CLIENT, opt(OPT_ABORT))
    assert reply_type(to(Side.CLIENT, out)) == REP_ACK and isinstance(out[-1], Close)


@pytest.mark.parametrize("flags,why", [(0, "fixed newstyle"), (1 | 4, "unknown client flags")])
def test_bad_client_flags_close(flags: int, why: str) -> None:
    neg = Negotiation()
    [close] = neg.receive(Side.CLIENT, struct.pack(">I", flags))
    assert isinstance(close, Close) and why in close.reason


def test_starttls_with_data_is_invalid_and_data_after_it_closes() -> None:
    neg = Negotiation()
    neg.receive(Side.CLIENT, FLAGS)
    out = neg.receive(Side.CLIENT, opt(OPT_STARTTLS, b"x"))
    assert reply_type(to(Side.CLIENT, out)) == REP_ERR_INVALID
    [close] = neg.receive(Side.CLIENT, opt(OPT_STARTTLS) + b"\x16\x03\x01")
    assert isinstance(close, Close)


def test_own_writable_export_is_relayed_to_nbdkit() -> None:
    neg = negotiated(HOST_A)
    raw = go("web1.img@host-a")
    assert neg.receive(Side.CLIENT, raw) == [Send(Side.SERVER, raw)]
    assert neg.expecting is Side.SERVER
    info = reply(OPT_GO, 3, INFO_EXPORT)
    assert neg.receive(Side.SERVER, info) == [Send(Side.CLIENT, info)]
    ack = reply(OPT_GO, REP_ACK)
    out = neg.receive(Side.SERVER, ack + b"early")
    assert out == [Send(Side.CLIENT, ack), Opened("web1.img@host-a"), Relay(b"", b"early")]
    assert neg.state is State.RELAY
    with pytest.raises(RuntimeError):
        neg.receive(Side.CLIENT, b"more")


def test_another_hosts_writable_export_is_refused_by_policy_and_never_reaches_nbdkit() -> None:
    neg = negotiated(QEMU_B)
    out = neg.receive(Side.CLIENT, go("web1.img@host-a"))
    assert isinstance(out[0], Refused) and "qemu:host-b may not open web1.img@host-a" in out[0].reason
    assert reply_type(to(Side.CLIENT, out)) == REP_ERR_POLICY and to(Side.SERVER, out) == b""
    assert neg.state is State.OPTIONS  # the client may go on (and read, say)
    raw = go("web1.img@host-b")
    assert neg.receive(Side.CLIENT, raw) == [Send(Side.SERVER, raw)]


def test_failed_go_at_nbdkit_returns_to_options() -> None:
    neg = negotiated(HOST_A)
    neg.receive(Side.CLIENT, go("nope.img"))
    err = reply(OPT_GO, 0x80000006, b"no disk")
    assert neg.receive(Side.SERVER, err) == [Send(Side.CLIENT, err)]
    assert neg.state is State.OPTIONS


@pytest.mark.parametrize("who,export,allowed", [
    (HOST_A, "web1.img@host-a", True),
    (QEMU_A, "web1.img@host-a", True),
    (QEMU_B, "web1.img@host-a", False),
    (Identity(Kind.HOST, "host-b"), "web1.img@host-a", False),
    (HOST_A, "web1.img", True),
    (QEMU_B, "web1.img", True),
    (OPERATOR, "web1.img", True),
    (Identity(Kind.USER, "root", Role.ADMIN), "web1.img", True),
    (OPERATOR, "web1.img@host-a", False),
    (VIEWER, "web1.img", False),
    (DATASTORE, "web1.img", False),
    (HOST_A, "", False),
    (HOST_A, "../etc/passwd", False),
    (HOST_A, "web1.img@host a", False),
])
def test_export_access(who: Identity, export: str, allowed: bool) -> None:
    access = export_access(who, export)
    assert access.allowed is allowed
    assert bool(access.reason) is not allowed


def test_export_name_option_after_tls() -> None:
    neg = negotiated(HOST_A)
    raw = opt(OPT_EXPORT_NAME, b"web1.img@host-a")
    assert neg.receive(Side.CLIENT, raw) == [Send(Side.SERVER, raw)]
    answer = struct.pack(">QH", 16 << 20, 0x1)  # no zeroes: the client asked for none
    assert neg.receive(Side.SERVER, answer[:5]) == []
    assert neg.receive(Side.SERVER, answer[5:]) == [Send(Side.CLIENT, answer), Opened("web1.img@host-a"), Relay(b"", b"")]
    neg = negotiated(HOST_A, client_flags=struct.pack(">I", 1))  # zeroes wanted: 124 more bytes
    neg.receive(Side.CLIENT, raw)
    assert neg.receive(Side.SERVER, answer) == []
    assert isinstance(neg.receive(Side.SERVER, bytes(124))[-1], Relay)
    neg = negotiated(VIEWER)
    out = neg.receive(Side.CLIENT, opt(OPT_EXPORT_NAME, b"web1.img"))
    assert isinstance(out[0], Refused) and isinstance(out[-1], Close) and to(Side.SERVER, out) == b""


def test_list_and_meta_context_follow_the_read_rule() -> None:
    neg = negotiated(HOST_A)
    assert neg.receive(Side.CLIENT, opt(OPT_LIST)) == [Send(Side.SERVER, opt(OPT_LIST))]
    server = reply(OPT_LIST, 2, struct.pack(">I", 8) + b"web1.img")
    assert neg.receive(Side.SERVER, server + reply(OPT_LIST, REP_ACK)) == [
        Send(Side.CLIENT, server), Send(Side.CLIENT, reply(OPT_LIST, REP_ACK))]
    neg = negotiated(VIEWER)
    out = neg.receive(Side.CLIENT, opt(OPT_LIST))
    assert reply_type(to(Side.CLIENT, out)) == REP_ERR_POLICY
    neg = negotiated(QEMU_B)
    name = b"web1.img@host-a"
    meta = opt(OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name + struct.pack(">I", 0))
    assert reply_type(to(Side.CLIENT, neg.receive(Side.CLIENT, meta))) == REP_ERR_POLICY


def test_malformed_and_repeated_options() -> None:
    neg = negotiated(HOST_A)
    bad = opt(OPT_GO, struct.pack(">I", 100) + b"short")
    assert reply_type(to(Side.CLIENT, neg.receive(Side.CLIENT, bad))) == REP_ERR_INVALID
    assert reply_type(to(Side.CLIENT, neg.receive(Side.CLIENT, opt(OPT_STARTTLS)))) == REP_ERR_INVALID
    [close] = neg.receive(Side.CLIENT, b"NOTMAGIC" + bytes(8))
    assert isinstance(close, Close)
    neg = negotiated(HOST_A)
    [close] = neg.receive(Side.CLIENT, IHAVEOPT + struct.pack(">II", OPT_GO, 1 << 20))
    assert isinstance(close, Close) and "over the limit" in close.reason
    neg = Negotiation()
    neg.receive(Side.CLIENT, FLAGS)
    out = neg.receive(Side.CLIENT, opt(99) * (MAX_OPTIONS + 1))
    assert isinstance(out[-1], Close) and f"over {MAX_OPTIONS} options" in out[-1].reason


def test_unexpected_server_bytes_close() -> None:
    neg = negotiated(HOST_A)
    neg.receive(Side.CLIENT, go("web1.img@host-a"))
    [close] = neg.receive(Side.SERVER, reply(OPT_LIST, REP_ACK))  # a reply to another option
    assert isinstance(close, Close)
    neg = Negotiation()
    neg.receive(Side.CLIENT, FLAGS + opt(OPT_STARTTLS))
    neg.tls_established(HOST_A)
    [close] = neg.receive(Side.SERVER, NBDMAGIC + IHAVEOPT + b"\x00\x00")  # a server without fixed newstyle
    assert isinstance(close, Close)


def test_abort_after_tls_is_passed_on_then_closes() -> None:
    neg = negotiated(HOST_A)
    assert neg.receive(Side.CLIENT, opt(OPT_ABORT)) == [Send(Side.SERVER, opt(OPT_ABORT))]
    out = neg.receive(Side.SERVER, reply(OPT_ABORT, REP_ACK))
    assert out[0] == Send(Side.CLIENT, reply(OPT_ABORT, REP_ACK)) and isinstance(out[-1], Close)


def _script(chunk: int | None, seed: int) -> list[Action]:
    """A whole negotiation (refused GO, LIST, allowed GO) with the bytes cut at random places."""
    rng = random.Random(seed)
    neg = Negotiation()
    actions: list[Action] = list(neg.start())

    def feed(side: Side, data: bytes) -> None:
        while data:
            n = len(data) if chunk is None else rng.randint(1, chunk)
            actions.extend(neg.receive(side, data[:n]))
            data = data[n:]

    feed(Side.CLIENT, FLAGS + opt(99) + opt(OPT_STARTTLS))
    actions.extend(neg.tls_established(QEMU_A))
    feed(Side.SERVER, GREETING)
    feed(Side.CLIENT, go("web1.img@host-b"))
    feed(Side.CLIENT, opt(OPT_LIST))
    feed(Side.SERVER, reply(OPT_LIST, 2, struct.pack(">I", 1) + b"x") + reply(OPT_LIST, REP_ACK))
    feed(Side.CLIENT, go("web1.img@host-a"))
    feed(Side.SERVER, reply(OPT_GO, 3, INFO_EXPORT) + reply(OPT_GO, REP_ACK))
    return actions


@pytest.mark.parametrize("seed", range(10))
def test_any_cutting_of_the_bytes_gives_the_same_actions(seed: int) -> None:
    whole = _script(None, seed)
    assert isinstance(whole[-1], Relay) and Opened("web1.img@host-a") in whole
    cut = _script(7, seed)

    def merged(acts: list, side: Side) -> bytes:
        return b"".join(a.data for a in acts if isinstance(a, Send) and a.to is side)

    for side in Side:
        assert merged(cut, side) == merged(whole, side)
    assert [a for a in cut if not isinstance(a, Send)] == [a for a in whole if not isinstance(a, Send)]
