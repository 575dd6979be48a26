"""One error hierarchy for kvmotion.

Every error carries a one-line, actionable message; the CLI prints it as is and exits non-zero.
"""

from __future__ import annotations


class KvmotionError(Exception):
    """Base of all kvmotion errors; str() is the one-line message shown to the user."""

    exit_code = 1


class InvalidInput(KvmotionError):
    """The user asked for something malformed (bad size, bad flag value, bad name)."""

    exit_code = 2


class NotFound(KvmotionError):
    """A named object (VM, host, disk, datastore, migration) does not exist."""

    exit_code = 3


class Conflict(KvmotionError):
    """The request clashes with current state (name taken, VM already running, lease held)."""

    exit_code = 4


class InsufficientResources(KvmotionError):
    """The host lacks memory, CPUs or another resource the request needs."""

    exit_code = 5


class Unreachable(KvmotionError):
    """A host agent, datastore or peer could not be reached."""

    exit_code = 6


class SetupError(KvmotionError):
    """Something kvmotion needs on this machine is missing (QEMU, kernel, busybox, tools)."""

    exit_code = 7


class VmFailed(KvmotionError):
    """A QEMU process failed to start or died unexpectedly."""

    exit_code = 8


class MigrationError(KvmotionError):
    """A migration failed or was refused; the VM stays where the message says."""

    exit_code = 9


class PrecheckFailed(MigrationError):
    """One or more prerequisite checks refused a migration."""


class LeaseError(KvmotionError):
    """A disk write lease could not be acquired, renewed or transferred."""

    exit_code = 10


class Unauthorized(KvmotionError):
    """The caller presented no credentials the cluster accepts (no certificate, another CA's, expired)."""

    exit_code = 11


class Forbidden(KvmotionError):
    """The caller is known but its identity or role may not do this."""

    exit_code = 12
