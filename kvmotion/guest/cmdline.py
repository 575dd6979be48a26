"""The guest kernel's command line: boot settings plus what init.sh should run and configure.

kvmotion's own parameters are named `kvmotion.<key>=<value>`: the kernel ignores unknown dotted
parameters (it takes them for options of a module it does not have) instead of passing them to
/init's environment, whose slot count is limited; init.sh reads them from /proc/cmdline.
"""

from __future__ import annotations

from kvmotion.api.spec import VmSpec, Workload
from kvmotion.core.errors import InvalidInput
from kvmotion.core.units import format_size

PREFIX = "kvmotion."
MAX_LENGTH = 2047  # x86 COMMAND_LINE_SIZE less its NUL: the kernel truncates silently beyond

# Measured under TCG (QEMU CPU seconds to READY, 512 MiB, 4 interleaved boots each): with only
# console=ttyS0 2.76 s; cryptomgr.notests saves about 0.3 s (Debian's kernel self-tests its crypto at
# boot), quiet about 0.07 s (every console byte is an emulated port write), the i8042/8250 ones
# about 0.09 s. mitigations=off, nokaslr, rcu_expedited, init_on_alloc=0, audit=0 and fewer LSMs
# made no measurable difference with -cpu qemu64 and are left out. acpi=off would save 0.25 s but
# takes away ACPI power-off (system_powerdown) and q35's PCIe configuration space.
BOOT_PARAMS: tuple[str, ...] = (
    "console=ttyS0",
    "quiet",
    "panic=-1",  # reboot at once on a panic; QEMU run with -no-reboot then exits
    "cryptomgr.notests",
    "8250.nr_uarts=1",  # ttyS0 is the only serial port
    "i8042.noaux",  # no PS/2 mouse or keyboard to probe: the console is serial
    "i8042.nokbd",
)


def max_working_set(memory: int) -> int:
    """The largest memory-writer working set a guest of `memory` bytes holds without the OOM killer.

    Measured: a 256 MiB guest has 191 MiB available after boot, a 512 MiB one 438 MiB (the kernel
    and its page tables keep the rest); kvm-mem keeps another 24 MiB free for the rest of the guest.
    """
    return max(0, memory - (96 << 20) - memory // 50)


def _param(key: str, value: object) -> str:
    """kvmotion.KEY=VALUE; a value that could end the word (whitespace, quotes, control
    characters) would add parameters of its own, so it is refused (the spec is validated already)."""
    text = str(value)
    if any(c.isspace() or c == '"' or not c.isprintable() for c in text):
        raise InvalidInput(f"kernel parameter {PREFIX}{key}: {text!r} holds whitespace, quotes or control characters")
    return f"{PREFIX}{key}={text}"


def kernel_cmdline(spec: VmSpec) -> str:
    """The -append string for a VM of this spec; NICs are listed in PCI order (eth0, eth1, ...)."""
    if Workload.MEMWRITER in spec.workloads and spec.params.mem_wss > max_working_set(spec.memory):
        raise InvalidInput(
            f"VM {spec.name}: a memory writer working set of {format_size(spec.params.mem_wss)} does not fit in "
            f"{format_size(spec.memory)} of guest memory (at most {format_size(max_working_set(spec.memory))}): "
            "lower the working set or give the VM more memory"
        )
    params = list(BOOT_PARAMS)
    params.append(_param("hostname", spec.name))
    params.append(_param("workloads", ",".join(w.value for w in spec.workloads)))
    params.append(_param("mem_wss", spec.params.mem_wss))
    params.append(_param("mem_rate", spec.params.mem_rate))
    params.append(_param("mem_stride", spec.params.mem_stride))
    params.append(_param("echo_port", spec.params.echo_port))
    for i, nic in enumerate(spec.nics):
        # init.sh finds the interface by MAC, so a different probe order cannot swap addresses.
        params.append(_param(f"nic{i}", f"{nic.mac},{nic.ip or ''}"))
    line = " ".join(params)
    if len(line) > MAX_LENGTH:
        raise InvalidInput(f"VM {spec.name}: {len(spec.nics)} NICs make the kernel command line too long; use fewer NICs")
    return line
