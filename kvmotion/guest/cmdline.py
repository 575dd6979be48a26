"""The guest kernel's command line: boot settings plus what init.sh should run and configure.

kvmotion's own parameters are named `kvmotion.<key>=<value>`: the kernel ignores unknown dotted
parameters (it takes them for options of a module it does not have) instead of passing them to
/init's environment, whose slot count is limited; init.sh reads them from /proc/cmdline.
"""

from __future__ import annotations

from kvmotion.errors import InvalidInput
from kvmotion.qemu.spec import VmSpec

PREFIX = "kvmotion."
MAX_LENGTH = 2047  # x86 COMMAND_LINE_SIZE less its NUL: the kernel truncates silently beyond

# Measured under TCG (see the guest image report): the serial console is slow to emulate, so the
# kernel stays quiet; the others skip work a throwaway test guest does not need.
BOOT_PARAMS: tuple[str, ...] = (
    "console=ttyS0",
    "quiet",
    "panic=-1",  # reboot at once on a panic; QEMU run with -no-reboot then exits
    "mitigations=off",  # TCG pays dearly for page-table isolation and speculation barriers
    "cryptomgr.notests",  # the Debian kernel self-tests its crypto at boot
    "8250.nr_uarts=1",
    "i8042.noaux",
    "i8042.nokbd",
)


def kernel_cmdline(spec: VmSpec) -> str:
    """The -append string for a VM of this spec; NICs are listed in PCI order (eth0, eth1, ...)."""
    params = list(BOOT_PARAMS)
    params.append(f"{PREFIX}hostname={spec.name}")
    params.append(f"{PREFIX}workloads={','.join(w.value for w in spec.workloads)}")
    params.append(f"{PREFIX}mem_wss={spec.params.mem_wss}")
    params.append(f"{PREFIX}mem_rate={spec.params.mem_rate}")
    params.append(f"{PREFIX}echo_port={spec.params.echo_port}")
    for i, nic in enumerate(spec.nics):
        # init.sh finds the interface by MAC, so a different probe order cannot swap addresses.
        params.append(f"{PREFIX}nic{i}={nic.mac},{nic.ip or ''}")
    line = " ".join(params)
    if len(line) > MAX_LENGTH:
        raise InvalidInput(f"VM {spec.name}: {len(spec.nics)} NICs make the kernel command line too long; use fewer NICs")
    return line
