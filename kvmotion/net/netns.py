"""Network namespaces: create/delete, run code or processes inside one, veths, addresses, routes,
tbf shaping and bridge forwarding-database reads — all through netlink (pyroute2), never `ip`.

Namespaces are named and bind-mounted under /run/netns, as `ip netns` does, so both tools see them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from socket import AF_BRIDGE, AF_INET
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from kvmotion.core.errors import Conflict, InvalidInput, NotFound, SetupError
from kvmotion.net.nl import off_event_loop

NETNS_DIR = Path("/run/netns")
T = TypeVar("T")


def ns_path(ns: str) -> Path:
    return NETNS_DIR / ns


def ns_exists(ns: str) -> bool:
    return ns in pr_netns.listnetns()


def list_ns() -> list[str]:
    return sorted(pr_netns.listnetns())


@off_event_loop
def create_ns(ns: str) -> None:
    """Create a named namespace with its loopback up; Conflict if it exists."""
    if not ns or "/" in ns or len(ns) > 64:
        raise InvalidInput(f"invalid namespace name {ns!r}")
    if ns_exists(ns):
        raise Conflict(f"network namespace {ns} already exists: delete it first")
    try:
        pr_netns.create(ns)
    except OSError as exc:
        raise SetupError(f"could not create network namespace {ns}: {exc}") from exc
    with ns_iproute(ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def delete_ns(ns: str) -> None:
    """Remove a named namespace (its links go with it once no process holds it); no error if absent."""
    if not ns_exists(ns):
        return
    try:
        pr_netns.remove(ns)
    except FileNotFoundError:
        pass


def ns_inode(ns: str) -> int:
    """Inode identifying the namespace (equal to os.stat('/proc/PID/ns/net').st_ino of its members)."""
    try:
        return os.stat(ns_path(ns)).st_ino
    except FileNotFoundError:
        raise NotFound(f"network namespace {ns} does not exist") from None


def pids_in_ns(ns: str) -> list[int]:
    """Every process whose network namespace is `ns`."""
    target = os.stat(ns_path(ns))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if st.st_ino == target.st_ino and st.st_dev == target.st_dev:
            found.append(int(entry))
    return found


def kill_ns_processes(ns: str, grace_s: float = 2.0) -> list[int]:
    """SIGTERM every process in `ns`, SIGKILL those left after `grace_s`; returns the pids found."""
    if not ns_exists(ns):
        return []
    pids = [p for p in pids_in_ns(ns) if p != os.getpid()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if _alive(p)]
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (reaps it if it is our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def enter_ns(ns: str) -> None:
    """Move the calling process (all of it: call only in a fresh child) into namespace `ns`."""
    pr_netns.setns(str(ns_path(ns)), flags=0)


def run_in_ns(ns: str, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
    """Call fn(*args) in a forked child that entered `ns`; return its (picklable) result or re-raise
    its exception. The caller's namespace is never touched."""
    if not ns_exists(ns):
        raise NotFound(f"network namespace {ns} does not exist")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        code = 0
        try:
            enter_ns(ns)
            payload = pickle.dumps((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - carried to the parent
            code = 1
            try:
                payload = pickle.dumps((False, exc))
            except Exception:  # noqa: BLE001 - an unpicklable exception: carry its text
                payload = pickle.dumps((False, SetupError(f"{type(exc).__name__}: {exc}")))
        try:
            with os.fdopen(wfd, "wb") as out:
                out.write(payload)
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        with os.fdopen(rfd, "rb") as inp:
            os.set_blocking(inp.fileno(), False)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    os.kill(pid, signal.SIGKILL)
                    raise SetupError(f"call into namespace {ns} timed out after {timeout:.0f} s")
                ready, _, _ = select.select([inp], [], [], left)
                if not ready:
                    continue
                data = inp.read()
                if not data:
                    break
                chunks.append(data)
    finally:
        os.waitpid(pid, 0)
    if not chunks:
        raise SetupError(f"call into namespace {ns} died without an answer")
    ok, value = pickle.loads(b"".join(chunks))
    if ok:
        return value
    raise value


def call_in_ns_thread(ns: str, fn: Callable[..., T], *args: Any) -> T:
    """Call fn(*args) in a thread that entered `ns` (setns moves only the calling thread): what it
    opens (a TAP through /dev/net/tun, a socket) is this process's descriptor, bound to `ns`."""
    if not ns_exists(ns):
        raise NotFound(f"network namespace {ns} does not exist")
    outcome: list[Any] = []

    def run() -> None:
        try:
            pr_netns.setns(str(ns_path(ns)), flags=0)
            outcome.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - carried to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=f"in-{ns}")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if ok:
        return value
    raise value


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def hide_paths(hidden: Sequence[Path]) -> None:
    """In a mount namespace of the calling process's own, lay an empty read-only tmpfs over each of
    `hidden` (existing folders): the process and its children no longer see what is below them.
    The lab's machines see no other machine's files this way."""
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    for path in hidden:
        _check(_libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                           b"size=4k,mode=0555"), f"hiding {path}")


def popen_in_ns(ns: str, argv: Sequence[str], hide: Sequence[Path] = (), **popen_kwargs: Any) -> subprocess.Popen:
    """Start `argv` inside namespace `ns` (the child enters it between fork and exec), with the
    folders in `hide` covered (hide_paths)."""
    if not ns_exists(ns):
        raise NotFound(f"network namespace {ns} does not exist")
    missing = [str(p) for p in hide if not Path(p).is_dir()]
    if missing:
        raise NotFound(f"cannot hide {', '.join(missing)}: no such folder")
    path = str(ns_path(ns))
    hidden = tuple(Path(p) for p in hide)

    def _enter() -> None:
        pr_netns.setns(path, flags=0)
        if hidden:
            hide_paths(hidden)

    return subprocess.Popen(list(argv), preexec_fn=_enter, **popen_kwargs)


def ns_iproute(ns: str | None) -> IPRoute:
    """A netlink socket bound inside `ns` (None: the current namespace)."""
    if ns is None:
        return IPRoute()
    if not ns_exists(ns):
        raise NotFound(f"network namespace {ns} does not exist")
    return IPRoute(netns=ns, flags=0)


def _ns_fd(ns: str | None) -> int:
    """An open fd naming namespace `ns` (None: the caller's own), for IFLA_NET_NS_FD."""
    return os.open("/proc/self/ns/net" if ns is None else str(ns_path(ns)), os.O_RDONLY)


def _lookup(ipr: IPRoute, ns: str | None, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NotFound(f"interface {ifname} does not exist in namespace {ns or '(root)'}")
    return found[0]


@off_event_loop
def link_exists_in(ns: str | None, ifname: str) -> bool:
    if ns is not None and not ns_exists(ns):
        return False
    with ns_iproute(ns) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


@off_event_loop
def create_veth(name_a: str, ns_a: str | None, name_b: str, ns_b: str | None, *, up: bool = True) -> None:
    """A veth pair with end `name_a` in `ns_a` and `name_b` in `ns_b` (None: the current namespace)."""
    for name in (name_a, name_b):
        if not name or len(name) > 15:
            raise InvalidInput(f"invalid interface name {name!r}: use 1-15 characters")
    fd_b = _ns_fd(ns_b)
    try:
        with ns_iproute(ns_a) as ipr:
            if ipr.link_lookup(ifname=name_a):
                raise Conflict(f"interface {name_a} already exists in namespace {ns_a or '(root)'}")
            try:
                ipr.link("add", ifname=name_a, kind="veth", peer={"ifname": name_b, "net_ns_fd": fd_b})
            except NetlinkError as exc:
                raise SetupError(f"could not create veth {name_a}/{name_b}: {exc}") from exc
            if up:
                ipr.link("set", index=_lookup(ipr, ns_a, name_a), state="up")
    finally:
        os.close(fd_b)
    if up:
        set_up(ns_b, name_b)


@off_event_loop
def set_up(ns: str | None, ifname: str) -> None:
    with ns_iproute(ns) as ipr:
        ipr.link("set", index=_lookup(ipr, ns, ifname), state="up")


@off_event_loop
def delete_link_in(ns: str | None, ifname: str) -> None:
    """Delete a link in `ns` (a veth's peer goes too); no error if the link or namespace is absent."""
    if ns is not None and not ns_exists(ns):
        return
    with ns_iproute(ns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise SetupError(f"could not delete {ifname}: {exc}") from exc


@off_event_loop
def add_address(ns: str | None, ifname: str, cidr: str) -> None:
    """Put `cidr` ('10.1.0.5/24') on `ifname`; no error if it is there already."""
    addr, _, prefix = cidr.partition("/")
    if not prefix:
        raise InvalidInput(f"invalid address {cidr!r}: use ADDR/PREFIX")
    with ns_iproute(ns) as ipr:
        try:
            ipr.addr("add", index=_lookup(ipr, ns, ifname), address=addr, prefixlen=int(prefix))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise SetupError(f"could not add {cidr} to {ifname}: {exc}") from exc


@off_event_loop
def add_route(ns: str | None, dst: str, *, gateway: str | None = None, dev: str | None = None) -> None:
    """Route `dst` ('10.2.0.0/24' or 'default') via a gateway and/or out of a device; idempotent."""
    with ns_iproute(ns) as ipr:
        kwargs: dict[str, Any] = {"dst": dst}
        if gateway:
            kwargs["gateway"] = gateway
        if dev:
            kwargs["oif"] = _lookup(ipr, ns, dev)
        try:
            ipr.route("replace", **kwargs)
        except NetlinkError as exc:
            raise SetupError(f"could not add route to {dst}: {exc}") from exc


@off_event_loop
def del_route(ns: str | None, dst: str) -> None:
    """Delete the route to `dst`; no error if absent."""
    if ns is not None and not ns_exists(ns):
        return
    with ns_iproute(ns) as ipr:
        try:
            ipr.route("del", dst=dst)
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise SetupError(f"could not delete route to {dst}: {exc}") from exc


@dataclass(frozen=True)
class TbfParams:
    """Token bucket of a shaped link, in bytes and seconds (what `tc ... tbf` takes)."""

    rate: int  # bytes/s
    burst: int  # bytes
    latency_s: float

    @staticmethod
    def for_rate(rate_bytes_per_s: int, latency_s: float = 0.010) -> TbfParams:
        # 128 KiB is what measured 0.96 of 1 Gbit/s; faster links need a bucket of ~1 ms of traffic
        # or the qdisc's timer granularity caps them below the rate.
        return TbfParams(rate=rate_bytes_per_s, burst=max(128 * 1024, rate_bytes_per_s // 1000), latency_s=latency_s)


@off_event_loop
def shape(ns: str | None, ifname: str, rate_bytes_per_s: int, *, latency_s: float = 0.010) -> TbfParams:
    """Limit the egress of `ifname` in `ns` to `rate_bytes_per_s` with a tbf root qdisc (replacing
    any). Shape both ends of a veth to limit both directions."""
    if not 0 < rate_bytes_per_s < 2**32:
        raise InvalidInput(f"invalid link rate {rate_bytes_per_s} B/s: use 1 B/s to 4 GB/s")
    params = TbfParams.for_rate(rate_bytes_per_s, latency_s)
    with ns_iproute(ns) as ipr:
        idx = _lookup(ipr, ns, ifname)
        try:
            ipr.tc(
                "replace",
                "tbf",
                index=idx,
                handle="1:",
                rate=params.rate,
                burst=params.burst,
                latency=int(params.latency_s * 1_000_000),
            )
        except NetlinkError as exc:
            raise SetupError(f"could not shape {ifname}: {exc}") from exc
    return params


@off_event_loop
def unshape(ns: str | None, ifname: str) -> None:
    """Remove the root qdisc set by shape(); no error if there is none."""
    with ns_iproute(ns) as ipr:
        try:
            ipr.tc("del", index=_lookup(ipr, ns, ifname), root=True)
        except NetlinkError:
            pass


@off_event_loop
def shaping(ns: str | None, ifname: str) -> int | None:
    """The tbf rate (bytes/s) on `ifname`, or None when it is not shaped."""
    with ns_iproute(ns) as ipr:
        idx = _lookup(ipr, ns, ifname)
        for q in ipr.get_qdiscs(index=idx):
            if q.get("TCA_KIND") == "tbf":
                return int(q.get("TCA_OPTIONS").get("TCA_TBF_PARMS")["rate"])
    return None


# USER_HZ: NDA_CACHEINFO ages are clock_t ticks (jiffies_to_clock_t in the bridge's fdb_fill_info).
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_NUD_NOARP, _NUD_PERMANENT = 0x40, 0x80


@dataclass(frozen=True)
class FdbEntry:
    """Where a bridge learned a MAC, and how long ago (seconds, USER_HZ granularity)."""

    mac: str
    port: str
    updated_s_ago: float | None  # last time a frame from this MAC arrived on `port`
    used_s_ago: float | None  # last time the bridge forwarded to it
    static: bool  # permanent/local entries (the bridge's own ports) are not learned


@off_event_loop
def fdb_entries(ns: str | None, bridge: str) -> list[FdbEntry]:
    """Every entry of `bridge`'s forwarding database in `ns`."""
    with ns_iproute(ns) as ipr:
        br = _lookup(ipr, ns, bridge)
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        entries = []
        for msg in ipr.get_neighbours(family=AF_BRIDGE):
            if msg.get("NDA_MASTER") != br:
                continue
            cache = msg.get("NDA_CACHEINFO")
            entries.append(
                FdbEntry(
                    mac=str(msg.get("NDA_LLADDR")).lower(),
                    port=names.get(msg["ifindex"], str(msg["ifindex"])),
                    updated_s_ago=cache["ndm_updated"] / _CLOCK_TICKS if cache else None,
                    used_s_ago=cache["ndm_used"] / _CLOCK_TICKS if cache else None,
                    static=bool(msg["state"] & (_NUD_PERMANENT | _NUD_NOARP)),
                )
            )
        return entries


def fdb_entry(ns: str | None, bridge: str, mac: str) -> FdbEntry | None:
    """The learned (non-static) entry for `mac` on `bridge`, or None if the bridge does not know it."""
    mac = mac.lower()
    for entry in fdb_entries(ns, bridge):
        if entry.mac == mac and not entry.static:
            return entry
    return None


def fdb_port(ns: str | None, bridge: str, mac: str) -> str | None:
    """Name of the port on which `bridge` learned `mac`, or None."""
    entry = fdb_entry(ns, bridge, mac)
    return entry.port if entry else None


@off_event_loop
def link_mac(ns: str | None, ifname: str) -> str:
    """MAC address of `ifname` in `ns` (read over netlink: /sys shows the mounter's namespace)."""
    with ns_iproute(ns) as ipr:
        return str(ipr.get_links(_lookup(ipr, ns, ifname))[0].get("IFLA_ADDRESS")).lower()


@off_event_loop
def neighbour_mac(ns: str | None, ip: str) -> str | None:
    """The MAC that `ns`'s ARP table holds for `ip`, or None."""
    with ns_iproute(ns) as ipr:
        for msg in ipr.get_neighbours(dst=ip):
            lladdr = msg.get("NDA_LLADDR")
            if lladdr:
                return str(lladdr).lower()
    return None


@off_event_loop
def ipv4_addresses(ns: str | None = None) -> list[str]:
    """Every IPv4 address of `ns` (None: the current namespace) as 'ADDR/PREFIX'."""
    with ns_iproute(ns) as ipr:
        return [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(family=AF_INET)]


@dataclass(frozen=True)
class EgressLink:
    """The interface this namespace reaches an address through, and how fast it sends."""

    ifname: str
    nic_rate: int | None  # bytes/s the NIC reports (ethtool); None when it reports none
    shaped_rate: int | None  # bytes/s of a tbf root qdisc on it; None when not shaped

    @property
    def rate(self) -> int | None:
        known = [r for r in (self.nic_rate, self.shaped_rate) if r]
        return min(known) if known else None


def _nic_rate(ifname: str) -> int | None:
    from pyroute2.ethtool import Ethtool

    try:
        with Ethtool() as et:
            speed = et.get_link_mode(ifname).speed  # Mbit/s; None or -1 when unknown
    except Exception:  # noqa: BLE001 - pyroute2 raises its own for "no ethtool here" (lo, tun)
        return None
    return speed * 1_000_000 // 8 if speed and speed > 0 else None


@off_event_loop
def egress_link(dst: str) -> EgressLink:
    """The link the current namespace routes `dst` over (NIC speed and tbf shaping)."""
    with IPRoute() as ipr:
        try:
            route = ipr.route("get", dst=dst)[0]
        except (NetlinkError, IndexError) as exc:
            raise NotFound(f"no route to {dst}: {exc}") from exc
        idx = route.get("RTA_OIF")
        links = ipr.get_links(idx) if idx else []
        if not links:
            raise NotFound(f"no interface carries the route to {dst}")
        ifname = links[0].get("IFLA_IFNAME")
    return EgressLink(ifname=ifname, nic_rate=_nic_rate(ifname), shaped_rate=shaping(None, ifname))
