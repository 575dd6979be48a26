import pytest

from kvmotion.core.errors import InvalidInput
from kvmotion.qemu.accel import Accel, decide


def test_kvm_when_vmx_device_and_probe_ok():
    assert decide(frozenset({"vmx", "sse2"}), True, True).accel is Accel.KVM


def test_kvm_on_amd_svm():
    assert decide(frozenset({"svm"}), True, True).accel is Accel.KVM


def test_tcg_without_hw_flags_even_with_dev_kvm():
    # A paravirtual KVM (PVM) exposes /dev/kvm but no vmx/svm: it cannot boot a stock kernel.
    choice = decide(frozenset({"sse2"}), True, None)
    assert choice.accel is Accel.TCG and "vmx/svm" in choice.reason


def test_tcg_when_probe_fails():
    choice = decide(frozenset({"vmx"}), True, False)
    assert choice.accel is Accel.TCG and "could not boot" in choice.reason


def test_tcg_without_device():
    assert decide(frozenset({"vmx"}), False, None).accel is Accel.TCG


def test_forced_overrides_everything():
    assert decide(frozenset(), False, None, "kvm").accel is Accel.KVM
    assert decide(frozenset({"vmx"}), True, True, "TCG").accel is Accel.TCG


def test_forced_unknown_is_rejected():
    with pytest.raises(InvalidInput, match="unknown accelerator"):
        decide(frozenset(), False, None, "xen")
