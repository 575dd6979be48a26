"""The NBD option phase as the datastore's TLS front end sees it: a sans-I/O state machine.

nbdkit 1.32 can require TLS and verify a client certificate, but cannot tell its plugin who the
client is, so it cannot bind `DISK@HOST` to host HOST. The front end (nbd_front.py) therefore
terminates TLS itself and relays to nbdkit on a private Unix socket; this module decides, from
bytes alone, what it sends where:

1. Before TLS (FORCEDTLS, as `nbdkit --tls=require`): our own greeting; the client's flags; then
   options: NBD_OPT_STARTTLS is acknowledged, NBD_OPT_ABORT too (then close), NBD_OPT_EXPORT_NAME
   closes (it cannot be refused), anything else gets NBD_REP_ERR_TLS_REQD.
2. After the TLS handshake the shell names the client's identity (from its certificate): we take
   nbdkit's greeting, pass it the client's flags, and relay the option haggling one option at a
   time (the protocol allows a client one option in flight). Options naming an export are checked
   first (`export_access`): a refused NBD_OPT_GO/INFO/LIST/*_META_CONTEXT gets NBD_REP_ERR_POLICY
   from us and never reaches nbdkit; a refused NBD_OPT_EXPORT_NAME closes the connection.
3. Once nbdkit acknowledges NBD_OPT_GO, or answers NBD_OPT_EXPORT_NAME, the shell relays bytes.

Who may open what: `DISK@HOST` (writable; the lease decides whether a write succeeds) only host:HOST
and qemu:HOST; `DISK` (read only) hosts, QEMUs and users with role operator or higher.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.core.errors import InvalidInput
from kvmotion.storage.lease import ExportName

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server) and client flags alike
FLAG_NO_ZEROES = 1 << 1
SERVER_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES  # what nbdkit advertises; ours must match

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10

REP_ACK = 1
REP_ERR = 1 << 31
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_TLS_REQD = REP_ERR | 5

_OPTION_HEADER = struct.Struct(">8sII")  # IHAVEOPT, option, length
_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, type, length
GREETING = NBDMAGIC + IHAVEOPT + struct.pack(">H", SERVER_FLAGS)
MAX_OPTION_DATA = 64 << 10  # names are at most 4096 bytes; more is a client to drop
MAX_REPLY_DATA = 16 << 20
MAX_OPTIONS = 64  # options per connection, before and after TLS (nbdkit itself allows 32)
_EXPORT_REPLY = 8 + 2  # NBD_OPT_EXPORT_NAME's answer: size, transmission flags (+124 zeroes)


# ---- who may open which export ---------------------------------------------------------------------
@dataclass(frozen=True)
class Access:
    allowed: bool
    reason: str  # why not (empty when allowed)


def may_read(who: Identity) -> bool:
    return who.kind in (Kind.HOST, Kind.QEMU) or who.has_role(Role.OPERATOR)


def export_access(who: Identity, name: str) -> Access:
    """May `who` open export `name`? `DISK@HOST` only as HOST (its agent or its QEMUs); `DISK` to
    read, for hosts, QEMUs and operators."""
    try:
        export = ExportName.parse(name)
    except InvalidInput as exc:
        return Access(False, str(exc))
    if export.host is not None:
        if who.kind in (Kind.HOST, Kind.QEMU) and who.name == export.host:
            return Access(True, "")
        return Access(False, f"{who} may not open {name}: a writable export DISK@HOST is for host:{export.host} "
                             f"and qemu:{export.host} only")
    if may_read(who):
        return Access(True, "")
    return Access(False, f"{who} may not read {name}: exports are for hosts, their QEMUs and users with role "
                         "operator or higher")


def list_access(who: Identity) -> Access:
    if may_read(who):
        return Access(True, "")
    return Access(False, f"{who} may not list exports: allowed for hosts, their QEMUs and operators")


# ---- what the shell does ---------------------------------------------------------------------------
class Side(str, Enum):
    CLIENT = "client"
    SERVER = "server"  # nbdkit


@dataclass(frozen=True)
class Send:
    to: Side
    data: bytes


@dataclass(frozen=True)
class StartTls:
    """Do the TLS handshake on the client's connection, then call `tls_established`."""


@dataclass(frozen=True)
class ConnectServer:
    """Connect to nbdkit; its greeting comes next."""


@dataclass(frozen=True)
class Opened:
    """The client enters transmission on `export` (for the log)."""

    export: str


@dataclass(frozen=True)
class Refused:
    """An option the policy refused (for the log); the connection goes on unless a Close follows."""

    export: str
    reason: str


@dataclass(frozen=True)
class Relay:
    """Negotiation is over: relay bytes both ways, starting with what was read past it."""

    to_server: bytes
    to_client: bytes


@dataclass(frozen=True)
class Close:
    reason: str
    quiet: bool = False  # a normal end (the client aborted): not worth a log line


Action = Send | StartTls | ConnectServer | Opened | Refused | Relay | Close


class State(str, Enum):
    CLIENT_FLAGS = "client flags"
    PLAIN_OPTIONS = "options before TLS"
    TLS_HANDSHAKE = "TLS handshake"
    SERVER_GREETING = "nbdkit's greeting"
    OPTIONS = "options"
    SERVER_REPLIES = "nbdkit's option replies"
    EXPORT_REPLY = "nbdkit's export reply"
    RELAY = "relay"
    CLOSED = "closed"


def option_reply(option: int, reply: int, message: str = "") -> bytes:
    data = message.encode()
    return _REPLY_HEADER.pack(REPLY_MAGIC, option, reply, len(data)) + data


def _name_prefixed(data: bytes) -> str | None:
    """The export name at the start of NBD_OPT_GO/INFO/*_META_CONTEXT data (32-bit length, name)."""
    if len(data) < 4:
        return None
    (n,) = struct.unpack_from(">I", data)
    if 4 + n > len(data):
        return None
    try:
        return data[4 : 4 + n].decode()
    except UnicodeDecodeError:
        return None


def _go_name(data: bytes) -> str | None:
    """NBD_OPT_GO/INFO: name, then a 16-bit count of information requests of 16 bits each."""
    name = _name_prefixed(data)
    if name is None:
        return None
    rest = len(data) - 4 - len(name.encode())
    if rest < 2:
        return None
    (count,) = struct.unpack_from(">H", data, len(data) - rest)
    return name if rest == 2 + 2 * count else None


class Negotiation:
    """One client connection's option phase. Feed it bytes with `receive(side, data)` from the side
    it is `expecting`; it returns what to do, in order. Bytes past the end of negotiation come back
    in the Relay action."""

    def __init__(self) -> None:
        self.state = State.CLIENT_FLAGS
        self.who: Identity | None = None
        self.client_flags = 0
        self.options = 0
        self._option = 0  # the option whose replies are being relayed
        self._export = ""  # the export it names
        self._buf = {Side.CLIENT: bytearray(), Side.SERVER: bytearray()}

    def start(self) -> list[Action]:
        return [Send(Side.CLIENT, GREETING)]

    @property
    def expecting(self) -> Side | None:
        """The side whose bytes it waits for (None: it waits for the shell: TLS, relay, closed)."""
        if self.state in (State.SERVER_GREETING, State.SERVER_REPLIES, State.EXPORT_REPLY):
            return Side.SERVER
        if self.state in (State.CLIENT_FLAGS, State.PLAIN_OPTIONS, State.OPTIONS):
            return Side.CLIENT
        return None

    def receive(self, side: Side, data: bytes) -> list[Action]:
        if self.state in (State.TLS_HANDSHAKE, State.RELAY, State.CLOSED):
            raise RuntimeError(f"bytes from the {side.value} in state {self.state.value}")
        self._buf[side] += data
        out: list[Action] = []
        while self.state not in (State.TLS_HANDSHAKE, State.RELAY, State.CLOSED):
            before = self.state, len(self._buf[Side.CLIENT]), len(self._buf[Side.SERVER])
            out += self._step()
            if (self.state, len(self._buf[Side.CLIENT]), len(self._buf[Side.SERVER])) == before:
                break  # needs more bytes
        return out

    def tls_established(self, who: Identity) -> list[Action]:
        if self.state is not State.TLS_HANDSHAKE:
            raise RuntimeError(f"TLS established in state {self.state.value}")
        self.who = who
        self.state = State.SERVER_GREETING
        return [ConnectServer()]

    # ---- internals ------------------------------------------------------------------------------
    def _close(self, reason: str, quiet: bool = False) -> list[Action]:
        self.state = State.CLOSED
        return [Close(reason, quiet)]

    def _take(self, side: Side, n: int) -> bytes | None:
        buf = self._buf[side]
        if len(buf) < n:
            return None
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def _client_option(self) -> tuple[int, bytes, bytes] | Close | None:
        """(option, data, raw bytes) once a whole option is buffered; Close if it is malformed."""
        buf = self._buf[Side.CLIENT]
        if len(buf) < _OPTION_HEADER.size:
            return None
        magic, option, length = _OPTION_HEADER.unpack_from(buf)
        if magic != IHAVEOPT:
            return Close("not an NBD option (bad magic)")
        if length > MAX_OPTION_DATA:
            return Close(f"option {option} carries {length} bytes, over the limit of {MAX_OPTION_DATA}")
        raw = self._take(Side.CLIENT, _OPTION_HEADER.size + length)
        if raw is None:
            return None
        self.options += 1
        if self.options > MAX_OPTIONS:
            return Close(f"over {MAX_OPTIONS} options")
        return option, raw[_OPTION_HEADER.size :], raw

    def _step(self) -> list[Action]:
        if self.state is State.CLIENT_FLAGS:
            return self._client_flags()
        if self.state is State.PLAIN_OPTIONS:
            return self._plain_option()
        if self.state is State.SERVER_GREETING:
            return self._server_greeting()
        if self.state is State.OPTIONS:
            return self._option_after_tls()
        if self.state is State.SERVER_REPLIES:
            return self._server_reply()
        if self.state is State.EXPORT_REPLY:
            return self._export_reply()
        raise AssertionError(self.state)

    def _client_flags(self) -> list[Action]:
        raw = self._take(Side.CLIENT, 4)
        if raw is None:
            return []
        (flags,) = struct.unpack(">I", raw)
        if flags & ~SERVER_FLAGS:
            return self._close(f"unknown client flags {flags:#x}")
        if not flags & FLAG_FIXED_NEWSTYLE:
            return self._close("the client does not speak fixed newstyle NBD, which TLS needs")
        self.client_flags = flags
        self.state = State.PLAIN_OPTIONS
        return []

    def _plain_option(self) -> list[Action]:
        got = self._client_option()
        if got is None:
            return []
        if isinstance(got, Close):
            return self._close(got.reason)
        option, data, _ = got
        if option == OPT_STARTTLS:
            if data:
                return [Send(Side.CLIENT, option_reply(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS carries no data"))]
            if self._buf[Side.CLIENT]:
                return self._close("data sent after NBD_OPT_STARTTLS before its reply")
            self.state = State.TLS_HANDSHAKE
            return [Send(Side.CLIENT, option_reply(option, REP_ACK)), StartTls()]
        if option == OPT_ABORT:
            return [Send(Side.CLIENT, option_reply(option, REP_ACK)), *self._close("the client aborted before TLS", quiet=True)]
        if option == OPT_EXPORT_NAME:
            return self._close("NBD_OPT_EXPORT_NAME before TLS: this datastore requires TLS")
        return [Send(Side.CLIENT, option_reply(option, REP_ERR_TLS_REQD,
                                               "this datastore requires TLS with a certificate of the cluster CA"))]

    def _server_greeting(self) -> list[Action]:
        raw = self._take(Side.SERVER, len(GREETING))
        if raw is None:
            return []
        (flags,) = struct.unpack(">H", raw[16:])
        if raw[:16] != NBDMAGIC + IHAVEOPT or (self.client_flags & ~flags):
            return self._close(f"nbdkit's greeting is not what the front end advertised: {raw!r}")
        self.state = State.OPTIONS
        return [Send(Side.SERVER, struct.pack(">I", self.client_flags))]

    def _option_after_tls(self) -> list[Action]:
        got = self._client_option()
        if got is None:
            return []
        if isinstance(got, Close):
            return self._close(got.reason)
        option, data, raw = got
        assert self.who is not None
        if option == OPT_STARTTLS:
            return [Send(Side.CLIENT, option_reply(option, REP_ERR_INVALID, "TLS is already on"))]
        if option == OPT_EXPORT_NAME:
            try:
                name = data.decode()
            except UnicodeDecodeError:
                return self._close("export name is not UTF-8")
            access = export_access(self.who, name)
            if not access.allowed:
                return [Refused(name, access.reason), *self._close(access.reason)]
            self._option, self._export = option, name
            self.state = State.EXPORT_REPLY
            return [Send(Side.SERVER, raw)]
        if option in (OPT_GO, OPT_INFO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            name = _go_name(data) if option in (OPT_GO, OPT_INFO) else _name_prefixed(data)
            if name is None:
                return [Send(Side.CLIENT, option_reply(option, REP_ERR_INVALID, "malformed option data"))]
            access = export_access(self.who, name)
        elif option == OPT_LIST:
            name, access = "", list_access(self.who)
        else:  # structured replies, extended headers, abort, options nbdkit does not know: its call
            name, access = "", Access(True, "")
        if not access.allowed:
            return [Refused(name, access.reason), Send(Side.CLIENT, option_reply(option, REP_ERR_POLICY, access.reason))]
        self._option, self._export = option, name
        self.state = State.SERVER_REPLIES
        return [Send(Side.SERVER, raw)]

    def _server_reply(self) -> list[Action]:
        buf = self._buf[Side.SERVER]
        if len(buf) < _REPLY_HEADER.size:
            return []
        magic, option, reply, length = _REPLY_HEADER.unpack_from(buf)
        if magic != REPLY_MAGIC or option != self._option or length > MAX_REPLY_DATA:
            return self._close(f"unexpected option reply from nbdkit (magic {magic:#x}, option {option})")
        raw = self._take(Side.SERVER, _REPLY_HEADER.size + length)
        if raw is None:
            return []
        out: list[Action] = [Send(Side.CLIENT, raw)]
        if reply != REP_ACK and not reply & REP_ERR:
            return out  # one of several replies (NBD_REP_SERVER, _INFO, _META_CONTEXT): more follow
        if option == OPT_ABORT:
            return out + self._close("the client aborted", quiet=True)
        if option == OPT_GO and reply == REP_ACK:
            return [*out, Opened(self._export), *self._relay()]
        self.state = State.OPTIONS
        return out

    def _export_reply(self) -> list[Action]:
        size = _EXPORT_REPLY + (0 if self.client_flags & FLAG_NO_ZEROES else 124)
        raw = self._take(Side.SERVER, size)
        if raw is None:
            return []
        return [Send(Side.CLIENT, raw), Opened(self._export), *self._relay()]

    def _relay(self) -> list[Action]:
        self.state = State.RELAY
        to_server, to_client = bytes(self._buf[Side.CLIENT]), bytes(self._buf[Side.SERVER])
        self._buf[Side.CLIENT].clear()
        self._buf[Side.SERVER].clear()
        return [Relay(to_server, to_client)]
