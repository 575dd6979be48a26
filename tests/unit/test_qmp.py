"""kvmotion.qemu.qmp against a monitor that greets, then falls silent (a QEMU stuck holding its big lock)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from kvmotion.core.errors import VmFailed
from kvmotion.qemu.qmp import Qmp

GREETING = {"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}


async def _silent_after_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(json.dumps(GREETING).encode() + b"\r\n")
    await writer.drain()
    buf, decoder = "", json.JSONDecoder()
    while chunk := await reader.read(4096):
        buf += chunk.decode()
        while buf.strip():  # the client sends JSON objects back to back, not lines
            msg, end = decoder.raw_decode(buf.lstrip())
            buf = buf.lstrip()[end:]
            if msg["execute"] == "qmp_capabilities":
                writer.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\r\n")
                await writer.drain()
            # anything else: never answered


def test_execute_within_gives_up_on_a_silent_monitor(tmp_path: Path):
    async def run() -> tuple[str, float]:
        path = tmp_path / "qmp.sock"
        server = await asyncio.start_unix_server(_silent_after_handshake, path=str(path))
        qmp = Qmp("vm1")
        try:
            await qmp.connect(path, timeout=5)
            t0 = time.monotonic()
            with pytest.raises(VmFailed) as err:
                await qmp.execute_within(0.3, "query-status")
            return str(err.value), time.monotonic() - t0
        finally:
            await qmp.close()
            server.close()
            await server.wait_closed()

    message, took = asyncio.run(run())
    assert "vm1" in message and "did not answer query-status within 0.3 s" in message and "stuck" in message, message
    assert 0.3 <= took < 2.0, took
