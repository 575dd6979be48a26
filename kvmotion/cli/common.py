"""What every CLI command shares: printing tables or JSON (reaching agents: kvmotion.api.hosts)."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.table import Table

from kvmotion.api.agent import VmStatus
from kvmotion.core.jsonio import as_json
from kvmotion.core.units import format_duration, format_size

console = Console()
err_console = Console(stderr=True)


def print_json(obj: object) -> None:
    json.dump(as_json(obj), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def vm_table(vms: list[VmStatus]) -> Table:
    table = Table("name", "state", "host", "memory", "CPUs", "uptime", "ready")
    now = time.time()
    for vm in vms:
        uptime = format_duration(now - vm.started_at) if vm.started_at and vm.pid else "-"
        table.add_row(vm.name, vm.state.value, vm.host, format_size(vm.memory), str(vm.vcpus), uptime, "yes" if vm.ready else "no")
    return table
