"""Self-announcement frames: what tells the switches where a migrated VM's MAC now lives.

QEMU (net/announce.c) sends, per NIC, a 60-byte broadcast RARP "request reverse" (ethertype
0x8035, opcode 3) whose source, sender and target hardware addresses are the NIC's MAC and whose
protocol addresses are 0.0.0.0; a guest with virtio-net's GUEST_ANNOUNCE sends gratuitous ARPs
(ethertype 0x0806, sender IP == target IP). The builders/parsers are pure; the listener and
send_frame use AF_PACKET sockets, in the current namespace or, via pyroute2, in a named one.
"""

from __future__ import annotations

import enum
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from pyroute2 import netns as pr_netns

from kvmotion.core.errors import InvalidInput, NotFound

ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ARP_HTYPE_ETHER = 1
ARP_PTYPE_IPV4 = 0x0800
BROADCAST = "ff:ff:ff:ff:ff:ff"
MIN_FRAME = 60  # Ethernet minimum without FCS; QEMU pads its RARP to this
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux value; Python < 3.12 lacks the name


class ArpOp(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    REVERSE_REQUEST = 3  # RARP, what QEMU's announce-self sends
    REVERSE_REPLY = 4


class AnnounceKind(str, enum.Enum):
    RARP = "rarp"
    GARP = "garp"  # gratuitous ARP: sender IP == target IP


def mac_to_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise InvalidInput(f"invalid MAC {mac!r}: use six hex pairs such as 52:54:00:12:34:56")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise InvalidInput(f"invalid MAC {mac!r}: use six hex pairs such as 52:54:00:12:34:56") from None


def mac_to_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype ptype hlen plen op sha spa tha tpa


def _arp_frame(ethertype: int, dst: str, src: str, op: ArpOp, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    frame = _ETH.pack(mac_to_bytes(dst), mac_to_bytes(src), ethertype) + _ARP.pack(
        ARP_HTYPE_ETHER,
        ARP_PTYPE_IPV4,
        6,
        4,
        op,
        mac_to_bytes(sha),
        socket.inet_aton(spa),
        mac_to_bytes(tha),
        socket.inet_aton(tpa),
    )
    return frame.ljust(MIN_FRAME, b"\0")


def build_rarp(mac: str) -> bytes:
    """The frame QEMU's announce-self sends for a NIC with this MAC."""
    return _arp_frame(ETH_P_RARP, BROADCAST, mac, ArpOp.REVERSE_REQUEST, mac, "0.0.0.0", mac, "0.0.0.0")


def build_garp(mac: str, ip: str, op: ArpOp = ArpOp.REQUEST) -> bytes:
    """A gratuitous ARP (broadcast, sender IP == target IP), as guests send on link-up/announce."""
    tha = "00:00:00:00:00:00" if op == ArpOp.REQUEST else mac
    return _arp_frame(ETH_P_ARP, BROADCAST, mac, op, mac, ip, tha, ip)


@dataclass(frozen=True)
class Announcement:
    kind: AnnounceKind
    src_mac: str  # Ethernet source: what a learning switch learns
    dst_mac: str
    op: int
    sender_mac: str
    sender_ip: str
    target_mac: str
    target_ip: str


def parse_announcement(frame: bytes) -> Announcement | None:
    """An RARP or gratuitous ARP in `frame`, or None for anything else (ordinary ARP included)."""
    if len(frame) < _ETH.size + _ARP.size:
        return None
    dst, src, ethertype = _ETH.unpack_from(frame)
    if ethertype not in (ETH_P_ARP, ETH_P_RARP):
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, _ETH.size)
    if (htype, ptype, hlen, plen) != (ARP_HTYPE_ETHER, ARP_PTYPE_IPV4, 6, 4):
        return None
    if ethertype == ETH_P_RARP:
        kind = AnnounceKind.RARP
    elif spa == tpa and spa != b"\0\0\0\0" and op in (ArpOp.REQUEST, ArpOp.REPLY):
        kind = AnnounceKind.GARP
    else:
        return None
    return Announcement(
        kind=kind,
        src_mac=mac_to_str(src),
        dst_mac=mac_to_str(dst),
        op=op,
        sender_mac=mac_to_str(sha),
        sender_ip=socket.inet_ntoa(spa),
        target_mac=mac_to_str(tha),
        target_ip=socket.inet_ntoa(tpa),
    )


# --- I/O ----------------------------------------------------------------------------------------


def _packet_socket(ns: str | None, proto: int) -> socket.socket:
    if ns is None:
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    if ns not in pr_netns.listnetns():
        raise NotFound(f"network namespace {ns} does not exist")
    return pr_netns.create_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto), flags=0)


def send_frame(ifname: str, frame: bytes, ns: str | None = None) -> None:
    """Transmit a raw Ethernet frame out of `ifname` (in `ns`, or the current namespace)."""
    with _packet_socket(ns, 0) as s:
        try:
            s.bind((ifname, 0))
        except OSError:
            raise NotFound(f"interface {ifname} does not exist in namespace {ns or '(current)'}") from None
        s.send(frame)


@dataclass(frozen=True)
class SeenAnnouncement:
    t_mono: float  # time.monotonic() when the listener read it (comparable across processes)
    t_kernel: float  # kernel receive timestamp, CLOCK_REALTIME seconds
    ifname: str
    outgoing: bool  # transmitted by (rather than received on) the interface
    announcement: Announcement


class _BpfProgram:
    """A classic BPF socket filter (struct sock_fprog) kept alive for setsockopt."""

    def __init__(self, insns: list[tuple[int, int, int, int]]):
        import ctypes

        self._buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in insns))
        self._prog = struct.pack("HL", len(insns), ctypes.addressof(self._buf))

    def program(self) -> bytes:
        return self._prog


# ldh [12]; jeq #RARP -> accept; jeq #ARP -> accept; ret 0; accept: ret 0xffff
_ARP_RARP_FILTER = _BpfProgram(
    [
        (0x28, 0, 0, 12),
        (0x15, 2, 0, ETH_P_RARP),
        (0x15, 1, 0, ETH_P_ARP),
        (0x06, 0, 0, 0),
        (0x06, 0, 0, 0xFFFF),
    ]
)


class AnnounceListener:
    """Records RARP and gratuitous ARP frames seen on one interface (or all, ifname=None), with
    host-side timestamps, in a background thread. Usable as a context manager."""

    def __init__(self, ifname: str | None = None, ns: str | None = None):
        self.ifname = ifname
        self.ns = ns
        self._socks: list[socket.socket] = []
        self._seen: list[SeenAnnouncement] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> AnnounceListener:
        # ETH_P_ALL, not per-protocol sockets: on a bridge port the bridge consumes frames before
        # protocol handlers run, only "all" taps see them. A BPF filter keeps the rest in the kernel.
        s = _packet_socket(self.ns, ETH_P_ALL)
        s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _ARP_RARP_FILTER.program())
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if self.ifname is not None:
            try:
                s.bind((self.ifname, ETH_P_ALL))
            except OSError:
                s.close()
                raise NotFound(f"interface {self.ifname} does not exist in namespace {self.ns or '(current)'}") from None
        self._socks.append(s)
        self._thread = threading.Thread(target=self._run, name="announce-listener", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        poller = select.poll()
        by_fd = {s.fileno(): s for s in self._socks}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        while not self._stop.is_set():
            for fd, _ in poller.poll(50):
                data, ancdata, _flags, addr = by_fd[fd].recvmsg(2048, 64)
                now = time.monotonic()
                ann = parse_announcement(data)
                if ann is None:
                    continue
                t_kernel = time.time()
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", payload[:16])
                        t_kernel = sec + nsec / 1e9
                seen = SeenAnnouncement(
                    t_mono=now,
                    t_kernel=t_kernel,
                    ifname=addr[0],
                    outgoing=addr[2] == socket.PACKET_OUTGOING,
                    announcement=ann,
                )
                with self._lock:
                    self._seen.append(seen)

    def seen(self) -> list[SeenAnnouncement]:
        with self._lock:
            return list(self._seen)

    def wait_for(self, count: int, timeout: float) -> list[SeenAnnouncement]:
        """Wait until `count` announcements were seen (or `timeout` s passed); returns them all."""
        deadline = time.monotonic() + timeout
        while len(self.seen()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.seen()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        for s in self._socks:
            s.close()
        self._socks = []

    def __enter__(self) -> AnnounceListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
