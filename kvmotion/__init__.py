"""kvmotion: live migration of running QEMU/KVM virtual machines between Linux hosts."""

__version__ = "0.1.0"
