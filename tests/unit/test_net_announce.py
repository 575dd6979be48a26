"""RARP / gratuitous ARP frames, byte for byte as QEMU's net/announce.c lays out its RARP."""

import pytest

from kvmotion.core.errors import InvalidInput
from kvmotion.net.announce import (
    AnnounceKind,
    ArpOp,
    build_garp,
    build_rarp,
    parse_announcement,
)

MAC = "52:54:00:12:34:56"
MAC_BYTES = bytes.fromhex("525400123456")


def test_rarp_layout_matches_qemu():
    frame = build_rarp(MAC)
    assert len(frame) == 60
    assert frame[0:6] == b"\xff" * 6  # broadcast
    assert frame[6:12] == MAC_BYTES
    assert frame[12:14] == b"\x80\x35"  # ETH_P_RARP
    assert frame[14:16] == b"\x00\x01"  # hardware: Ethernet
    assert frame[16:18] == b"\x08\x00"  # protocol: IPv4
    assert frame[18] == 6 and frame[19] == 4
    assert frame[20:22] == b"\x00\x03"  # "request reverse"
    assert frame[22:28] == MAC_BYTES and frame[28:32] == b"\0" * 4
    assert frame[32:38] == MAC_BYTES and frame[38:42] == b"\0" * 4
    assert frame[42:] == b"\0" * 18


def test_rarp_roundtrip():
    ann = parse_announcement(build_rarp(MAC))
    assert ann is not None
    assert ann.kind is AnnounceKind.RARP
    assert ann.src_mac == ann.sender_mac == ann.target_mac == MAC
    assert ann.op == ArpOp.REVERSE_REQUEST
    assert ann.sender_ip == "0.0.0.0"


@pytest.mark.parametrize("op", [ArpOp.REQUEST, ArpOp.REPLY])
def test_garp_roundtrip(op):
    frame = build_garp(MAC, "10.77.1.10", op)
    assert frame[12:14] == b"\x08\x06" and len(frame) == 60
    ann = parse_announcement(frame)
    assert ann is not None and ann.kind is AnnounceKind.GARP
    assert ann.sender_ip == ann.target_ip == "10.77.1.10"
    assert ann.src_mac == MAC and ann.op == op


def test_ordinary_arp_and_other_frames_are_not_announcements():
    garp = bytearray(build_garp(MAC, "10.77.1.10"))
    garp[38:42] = bytes([10, 77, 1, 1])  # asks for someone else: an ordinary ARP request
    assert parse_announcement(bytes(garp)) is None
    ipv4 = bytearray(build_rarp(MAC))
    ipv4[12:14] = b"\x08\x00"
    assert parse_announcement(bytes(ipv4)) is None
    assert parse_announcement(build_rarp(MAC)[:30]) is None


def test_bad_mac():
    with pytest.raises(InvalidInput):
        build_rarp("52:54:00:12:34")
    with pytest.raises(InvalidInput):
        build_rarp("52:54:00:12:34:zz")
