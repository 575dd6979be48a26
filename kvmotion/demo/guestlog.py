"""Follows a VM's serial logs on every host of a lab (QEMU appends the guest's console there) and
stamps each guest event with the wall-clock time the host saw it: the guest's own clock stops while
the VM is paused, so arrival on the host is the time that means something."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path

from kvmotion.demo.report import ConsoleLine
from kvmotion.guest.serial import parse_line

POLL_S = 0.05


class GuestLog:
    """A background thread reading new lines from each host's serial log of one VM."""

    def __init__(self, logs: Mapping[str, Path]) -> None:
        self._logs = dict(logs)
        self._offsets = {h: 0 for h in self._logs}
        self._partial = {h: b"" for h in self._logs}
        self._lines: list[ConsoleLine] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="guest-log", daemon=True)

    def start(self) -> GuestLog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        self.poll()  # whatever arrived last

    def lines(self) -> list[ConsoleLine]:
        with self._lock:
            return list(self._lines)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Until predicate(lines) holds or `timeout` seconds pass; True if it held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.lines()):
                return True
            time.sleep(POLL_S)
        return predicate(self.lines())

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        for host, path in self._logs.items():
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets[host])
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            now = time.time()
            self._offsets[host] += len(data)
            chunks = (self._partial[host] + data).split(b"\n")
            self._partial[host] = chunks.pop()
            found = []
            for raw in chunks:
                event = parse_line(raw.decode("utf-8", "replace"))
                if event is not None:
                    found.append(ConsoleLine(at=now, host=host, event=event))
            if found:
                with self._lock:
                    self._lines.extend(found)
