"""QMP through the official `qemu.qmp` library, with kvmotion's errors and event timestamps."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.protocol import ConnectError, StateError

from kvmotion.core.errors import VmFailed


@dataclass(frozen=True)
class QmpEvent:
    name: str
    timestamp: float  # QEMU's own wall-clock time of the event (seconds since epoch)
    data: dict


def _to_event(msg) -> QmpEvent:
    ts = msg.get("timestamp", {})
    return QmpEvent(
        name=str(msg["event"]),
        timestamp=ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6,
        data=dict(msg.get("data", {})),
    )


class Qmp:
    """One QMP session to one QEMU process."""

    def __init__(self, vm_name: str) -> None:
        self.vm_name = vm_name
        self._client = QMPClient(vm_name)

    async def connect(self, socket_path: Path, timeout: float = 15.0, alive=lambda: True) -> None:
        """Connect, retrying while QEMU creates its socket; stop early if the process died. The agent
        may have bound the socket for QEMU (connect succeeds at once): the greeting is awaited with
        the same deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await asyncio.wait_for(self._client.connect(str(socket_path)), max(deadline - time.monotonic(), 0.05))
                return
            except (TimeoutError, ConnectError, OSError) as exc:
                if not alive():
                    raise VmFailed(f"QEMU for VM {self.vm_name} exited before its monitor came up") from exc
                if time.monotonic() > deadline:
                    raise VmFailed(f"QEMU monitor of VM {self.vm_name} did not answer at {socket_path}: {exc}") from exc
                self._client = QMPClient(self.vm_name)
                await asyncio.sleep(0.05)

    @property
    def connected(self) -> bool:
        from qemu.qmp import Runstate

        return self._client.runstate == Runstate.RUNNING

    async def execute(self, command: str, /, **arguments: Any) -> Any:
        """QEMU's answer, decoded JSON; VmFailed when QEMU refuses or the monitor is gone."""
        try:
            return await self._client.execute(command, arguments or None)
        except ExecuteError as exc:
            raise VmFailed(f"QEMU refused {command} for VM {self.vm_name}: {exc.error.error.desc}") from exc
        except (StateError, ExecInterruptedError, ConnectionError, EOFError) as exc:
            raise VmFailed(f"lost the QEMU monitor of VM {self.vm_name} during {command}") from exc

    async def execute_within(self, seconds: float, command: str, /, **arguments: Any) -> Any:
        """execute(), giving up after `seconds`: a QEMU stuck holding its big lock never answers."""
        try:
            return await asyncio.wait_for(self.execute(command, **arguments), seconds)
        except TimeoutError:
            raise VmFailed(f"QEMU of VM {self.vm_name} did not answer {command} within {seconds:g} s: "
                           f"it is stuck (its process is left as it is for a post-mortem)") from None

    def listen(self, *names: str) -> EventStream:
        return EventStream(self._client, names)

    async def close(self) -> None:
        try:
            await self._client.disconnect()
        except Exception:  # noqa: BLE001 - disconnect re-raises whatever ended the session; we are done with it
            pass


class EventStream:
    """Events of the given names, as an async context manager yielding QmpEvent."""

    def __init__(self, client: QMPClient, names: tuple[str, ...]) -> None:
        self._client = client
        self._listener = EventListener(list(names) or None)

    async def __aenter__(self) -> EventStream:
        self._client.register_listener(self._listener)
        return self

    async def __aexit__(self, *exc) -> None:
        self._client.remove_listener(self._listener)

    def get_nowait(self) -> QmpEvent:
        """The next queued event; asyncio.QueueEmpty when there is none."""
        return _to_event(self._listener._queue.get_nowait())  # the library has no public non-blocking get

    async def get(self, timeout: float | None = None) -> QmpEvent:
        return _to_event(await asyncio.wait_for(self._listener.get(), timeout))

    async def wait_for(self, name: str, timeout: float | None = None, where=lambda ev: True) -> QmpEvent:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ev = await self.get(left)
            if ev.name == name and where(ev):
                return ev
