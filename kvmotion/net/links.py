"""Bridges and TAP devices in the CURRENT network namespace (where the host agent runs), via netlink.

A VM's NIC is a persistent TAP enslaved to its port group's bridge. The agent attaches to it
(open_tap: /dev/net/tun, TUNSETIFF with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, what QEMU's own tap_open
asks for) and hands QEMU the descriptor (`-netdev` fd=N), so QEMU needs neither CAP_NET_ADMIN nor
this namespace. The kernel refuses the attach only if IFF_MULTI_QUEUE differs from the persistent
device's, and re-sets IFF_VNET_HDR per attach. So we create single-queue TAPs with vnet_hdr on.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kvmotion.core.errors import Conflict, InvalidInput, NotFound, SetupError
from kvmotion.net.nl import off_event_loop

IFNAMSIZ = 15  # usable characters of a Linux interface name
TUNSETIFF = 0x400454CA  # linux/if_tun.h: _IOW('T', 202, int)
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux: name[16], flags, padding
BRIDGE_AGEING_S = 300  # Linux's default; migration relies on RARP to re-teach, not on ageing
IFF_UP = 0x1  # linux/if.h: the link is administratively up
TAP_KIND = "tun"  # a TAP's link kind (IFLA_INFO_KIND): a VM's NIC, never an uplink


def check_ifname(name: str) -> str:
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise InvalidInput(f"invalid interface name {name!r}: use 1-{IFNAMSIZ} characters, no '/' or spaces")
    return name


def tap_name(vm_name: str, index: int) -> str:
    """Deterministic TAP name for NIC `index` of VM `vm_name`: 'kv' + 8 hex of a hash + 'n' + index."""
    if not 0 <= index < 100:
        raise InvalidInput(f"invalid NIC index {index}: use 0-99")
    digest = hashlib.sha256(vm_name.encode()).hexdigest()[:8]
    return f"kv{digest}n{index}"


def derived_mac(name: str, first_octet: int) -> str:
    """A stable MAC for a device we create, so a bridge's own address does not wander with its ports."""
    digest = hashlib.sha256(name.encode()).digest()
    return ":".join(f"{b:02x}" for b in (first_octet, *digest[:5]))


def random_mac() -> str:
    """A random locally administered unicast MAC."""
    return ":".join(f"{b:02x}" for b in (0x02, *os.urandom(5)))


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _kind(ipr: IPRoute, index: int) -> str | None:
    return ipr.get_links(index)[0].get(("linkinfo", "kind"))


def _sysctl(path: str, value: str) -> None:
    """Best effort: the knob may be absent (no IPv6) — the device still works."""
    try:
        Path(path).write_text(value)
    except OSError:
        pass


def quiet_ipv6(name: str) -> None:
    """No IPv6 autoconf on a device: its router solicitations and MLD reports would be noise in the
    switches' forwarding databases."""
    _sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")


def make_l2_only(name: str) -> None:
    """A port-group bridge or TAP carries guests' frames only. Linux answers ARP for any of the
    host's addresses on any device by default, so without arp_ignore=8 a bridge on the VM network
    would answer for the host's management IP and pull its traffic onto the wrong link."""
    quiet_ipv6(name)
    _sysctl(f"/proc/sys/net/ipv4/conf/{name}/arp_ignore", "8")


def _fail(action: str, name: str, exc: NetlinkError) -> SetupError:
    return SetupError(f"could not {action} {name}: {exc.args[-1] if exc.args else exc} (errno {exc.code})")


@off_event_loop
def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return _index(ipr, name) is not None


@off_event_loop
def ensure_bridge(name: str) -> None:
    """Create (or re-configure) a learning bridge with STP off and forward delay 0, and bring it up."""
    check_ifname(name)
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        try:
            if idx is None:
                ipr.link(
                    "add",
                    ifname=name,
                    kind="bridge",
                    # Fixed (so it doesn't follow its ports) but random: hosts' bridges of the
                    # same name share one L2 segment and must not share an address.
                    address=random_mac(),
                    br_stp_state=0,
                    br_forward_delay=0,
                    br_ageing_time=BRIDGE_AGEING_S * 100,
                )
                idx = _index(ipr, name)
                assert idx is not None
            elif _kind(ipr, idx) != "bridge":
                raise Conflict(f"interface {name} exists and is not a bridge: delete it or pick another name")
            else:
                ipr.link("set", index=idx, kind="bridge", br_stp_state=0, br_forward_delay=0)
            make_l2_only(name)
            ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise _fail("create bridge", name, exc) from exc


@off_event_loop
def enslave(name: str, bridge: str) -> None:
    """Attach an existing link to a bridge as a learning port and bring it up."""
    with IPRoute() as ipr:
        idx, br = _index(ipr, name), _index(ipr, bridge)
        if idx is None:
            raise NotFound(f"interface {name} does not exist")
        if br is None:
            raise NotFound(f"bridge {bridge} does not exist: create the port group's bridge first")
        try:
            ipr.link("set", index=idx, master=br)
            ipr.brport("set", index=idx, learning=1, unicast_flood=1)
            ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise _fail(f"attach to bridge {bridge}", name, exc) from exc


@off_event_loop
def delete_link(name: str) -> None:
    """Delete a link (a veth's peer goes with it); no error if it is absent."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return
        try:
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise _fail("delete", name, exc) from exc


@off_event_loop
def create_tap(name: str, bridge: str) -> None:
    """Persistent single-queue TAP (no_pi, vnet_hdr), up, enslaved to `bridge`. Idempotent."""
    check_ifname(name)
    with IPRoute() as ipr:
        if _index(ipr, bridge) is None:
            raise NotFound(f"bridge {bridge} does not exist: create the port group's bridge first")
        idx = _index(ipr, name)
        if idx is not None:
            info = ipr.get_links(idx)[0].get(("linkinfo", "data")) if _kind(ipr, idx) == "tun" else None
            if info is None or info.get("IFLA_TUN_TYPE") != 2 or info.get("IFLA_TUN_MULTI_QUEUE"):
                raise Conflict(f"interface {name} exists and is not a single-queue TAP: delete it first")
        else:
            try:
                ipr.link(
                    "add",
                    ifname=name,
                    kind="tuntap",
                    mode="tap",
                    ifr={"no_pi": 1, "vnet_hdr": 1, "multi_queue": 0},
                )
                idx = _index(ipr, name)
                assert idx is not None
                # 0xfe first octet (as libvirt does): the bridge never adopts a TAP's address.
                ipr.link("set", index=idx, address=derived_mac(name, 0xFE))
            except NetlinkError as exc:
                raise _fail("create TAP", name, exc) from exc
            except OSError as exc:  # the ioctl path of pyroute2's tuntap
                raise SetupError(f"could not create TAP {name}: {exc.strerror} (is /dev/net/tun there?)") from exc
        make_l2_only(name)
    enslave(name, bridge)


def open_tap(name: str) -> int:
    """A descriptor attached to TAP `name` (create_tap made it; single-queue, vnet_hdr), close-on-exec,
    for QEMU to inherit. Opened in the caller's network namespace, which must hold the device
    (TUNSETIFF would otherwise create a new, unattached TAP of that name there)."""
    check_ifname(name)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise SetupError(f"could not open /dev/net/tun for TAP {name}: {exc.strerror}") from exc
    ifreq = struct.pack(f"16sH{IFREQ_SIZE - 18}x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError as exc:
        os.close(fd)
        raise SetupError(f"could not attach to TAP {name}: {exc.strerror}") from exc
    return fd


@off_event_loop
def delete_tap(name: str) -> None:
    """Delete a TAP; no error if it is absent. QEMU holding it open does not stop the deletion."""
    delete_link(name)


@off_event_loop
def master_of(name: str) -> str | None:
    """Name of the bridge `name` is enslaved to, or None."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            raise NotFound(f"interface {name} does not exist")
        master = ipr.get_links(idx)[0].get("master")
        if not master:
            return None
        return ipr.get_links(master)[0].get("ifname")


@dataclass(frozen=True)
class Port:
    """A bridge port as netlink shows it."""

    up: bool  # administratively up, with carrier, operstate up (or unknown: a driver that keeps none)
    kind: str | None  # link kind: TAP_KIND for a VM's TAP, "veth", "bond", ...; None for a NIC


@dataclass(frozen=True)
class Bridge:
    """A bridge and its ports, in the caller's network namespace."""

    up: bool  # administratively up (a bridge set down forwards nothing)
    ports: Mapping[str, Port]


def _port(link: Any) -> Port:
    up = bool(link["flags"] & IFF_UP) and link.get("carrier") == 1 and link.get("operstate") in ("UP", "UNKNOWN")
    return Port(up=up, kind=link.get(("linkinfo", "kind")))


@off_event_loop
def read_bridge(name: str) -> Bridge | None:
    """Bridge `name` and its ports (the links whose master it is) through netlink, so in the calling
    thread's network namespace (sysfs shows the namespace of whoever mounted it). None if there is
    no such bridge, or it went while being read."""
    with IPRoute() as ipr:
        try:
            idx = _index(ipr, name)
            if idx is None:
                return None
            links = ipr.get_links()
        except NetlinkError:
            return None
        bridge = next((link for link in links if link["index"] == idx), None)
        if bridge is None or bridge.get(("linkinfo", "kind")) != "bridge":
            return None
        ports = {link.get("ifname"): _port(link) for link in links if link.get("master") == idx}
        return Bridge(up=bool(bridge["flags"] & IFF_UP), ports=ports)
