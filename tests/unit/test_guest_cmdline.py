"""The guest kernel command line built from a VM spec."""

from __future__ import annotations

import pytest

from kvmotion.api.spec import MAX_NICS, NicSpec, VmSpec, Workload, WorkloadParams
from kvmotion.core.errors import InvalidInput
from kvmotion.guest.cmdline import kernel_cmdline, max_working_set


def _params(cmdline: str) -> dict[str, str]:
    out = {}
    for word in cmdline.split():
        key, _, value = word.partition("=")
        out[key] = value
    return out


def test_console_and_boot_settings() -> None:
    words = kernel_cmdline(VmSpec(name="web1", memory=512 << 20)).split()
    assert "console=ttyS0" in words
    assert "quiet" in words
    assert "panic=-1" in words


def test_default_spec_is_idle() -> None:
    p = _params(kernel_cmdline(VmSpec(name="web1", memory=512 << 20)))
    assert p["kvmotion.workloads"] == "idle"
    assert p["kvmotion.hostname"] == "web1"
    assert not any(k.startswith("kvmotion.nic") for k in p)


def test_workloads_and_params() -> None:
    spec = VmSpec(
        name="db",
        memory=512 << 20,
        workloads=(Workload.MEMWRITER, Workload.ECHO, Workload.DISKWRITER),
        params=WorkloadParams(mem_wss=64 << 20, mem_rate=0, mem_stride=64, echo_port=7100),
    )
    p = _params(kernel_cmdline(spec))
    assert p["kvmotion.workloads"] == "mem,echo,disk"
    assert p["kvmotion.mem_wss"] == str(64 << 20)
    assert p["kvmotion.mem_rate"] == "0"
    assert p["kvmotion.mem_stride"] == "64"
    assert p["kvmotion.echo_port"] == "7100"


def test_nics_in_pci_order_by_mac() -> None:
    spec = VmSpec(
        name="web1",
        memory=512 << 20,
        nics=(
            NicSpec(mac="52:54:00:00:00:02", portgroup="a", ip="10.0.0.2/24"),
            NicSpec(mac="52:54:00:00:00:01", portgroup="b"),
        ),
    )
    p = _params(kernel_cmdline(spec))
    assert p["kvmotion.nic0"] == "52:54:00:00:00:02,10.0.0.2/24"
    assert p["kvmotion.nic1"] == "52:54:00:00:00:01,"


def test_every_own_parameter_is_dotted() -> None:
    # Undotted unknown parameters become init's environment, which the kernel caps at 32 entries.
    spec = VmSpec(name="x", memory=256 << 20,
                  nics=tuple(NicSpec(mac=f"52:54:00:00:00:{i:02x}", portgroup="p") for i in range(MAX_NICS)))
    for word in kernel_cmdline(spec).split():
        if word.startswith("kvmotion"):
            assert word.startswith("kvmotion.")
    assert len(kernel_cmdline(spec)) < 2048  # x86's COMMAND_LINE_SIZE


def test_pure() -> None:
    spec = VmSpec(name="web1", memory=512 << 20, workloads=(Workload.ECHO,))
    assert kernel_cmdline(spec) == kernel_cmdline(spec)


def test_most_nics_fit_and_more_are_refused_by_the_spec() -> None:
    nics = tuple(NicSpec(mac=f"52:54:00:00:01:{i:02x}", portgroup="p", ip=f"100.100.{i}.200/24") for i in range(64))
    longest = VmSpec(name="x" * 31, memory=256 << 20, nics=nics[:MAX_NICS],
                     workloads=tuple(Workload), params=WorkloadParams(mem_wss=0, mem_rate=10**12, mem_stride=512))
    assert len(kernel_cmdline(longest)) < 2048
    with pytest.raises(InvalidInput, match=f"invalid VM spec: nics: .*at most {MAX_NICS}"):
        VmSpec(name="x", memory=256 << 20, nics=nics)


def test_working_set_must_fit_in_guest_memory() -> None:
    too_big = VmSpec(name="x", memory=256 << 20, workloads=(Workload.MEMWRITER,))  # default 256 MiB set
    with pytest.raises(InvalidInput, match="does not fit"):
        kernel_cmdline(too_big)
    # Without the memory writer the working set does not matter.
    kernel_cmdline(VmSpec(name="x", memory=256 << 20, workloads=(Workload.ECHO,)))
    # Measured in booted guests: 191 MiB available at 256 MiB, 438 MiB at 512 MiB, less 24 MiB headroom.
    assert max_working_set(256 << 20) <= (191 - 24) << 20
    assert max_working_set(512 << 20) <= (438 - 24) << 20
    assert max_working_set(512 << 20) >= 256 << 20  # the default working set fits the usual test VM
    kernel_cmdline(VmSpec(name="x", memory=512 << 20, workloads=(Workload.MEMWRITER,)))


@pytest.mark.parametrize("stride", [0, 3, 1024, -8])
def test_memory_writer_stride_is_a_power_of_two_within_a_page(stride: int) -> None:
    with pytest.raises(InvalidInput, match="stride"):
        WorkloadParams(mem_stride=stride)


def test_a_spec_written_before_the_stride_existed_rewrites_whole_pages() -> None:
    spec = VmSpec(name="x", memory=512 << 20, params=WorkloadParams(mem_stride=8))
    assert VmSpec.from_json(spec.to_json()) == spec
    old = spec.to_json()
    del old["params"]["mem_stride"]
    assert VmSpec.from_json(old).params.mem_stride == 1
    old["params"]["mem_stride"] = 5
    with pytest.raises(InvalidInput, match="stride"):
        VmSpec.from_json(old)
