"""The datastore's control API fuzzed from its OpenAPI document (tests/fuzz.py): no 5xx, one-line
errors, nothing written outside the test's folders, no process started; a viewer and a host are
refused every change that is not theirs.

In process, secured as `datastore serve` serves it, with certificates of a throw-away cluster CA:
users for the disk routes, host host-a for the lease routes. main's API checks no caller (its
lease calls name their host in the body): there the viewer and host runs must fail, and xfail;
with the datastore branch's API (callers from their certificates) every test runs as it is.
Preallocation above PREALLOC_LIMIT fails as on a full file system, so that no run reserves real
disk space.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kvmotion.api.address import API_PREFIX
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.serving import Security, secure
from kvmotion.storage.api import create_app
from kvmotion.storage.datastore import Datastore
from tests.certs import TestCA
from tests.fuzz import FuzzReport, changes_refused, fuzz, label_of

ADMIN = Identity(Kind.USER, "ada", Role.ADMIN)
VIEWER = Identity(Kind.USER, "vera", Role.VIEWER)
HOST = Identity(Kind.HOST, "host-a")
LEASE_ROUTES = frozenset(f"POST {API_PREFIX}/disks/{{disk}}/{call}" for call in ("acquire", "renew", "transfer", "release"))
DISK = "web1.img"  # exists before the run
PREALLOC_LIMIT = 16 << 20
ADMIN_EXAMPLES = 220  # per operation and generation mode
MIN_ADMIN_REQUESTS = 2400


class Store:
    """Datastore ds1 (its root in `root`) behind its control API, secured."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "ds1").mkdir()
        ds = Datastore("ds1", root / "ds1", 30.0)
        ds.create_disk(DISK, 1 << 20)
        self.fastapi = create_app(ds)
        self.app = secure(self.fastapi, Security(tls_files=None, audit_log=root / "audit.log"), "datastore ds1")
        self.ca = TestCA(root / "ca")

    def pem(self, who: Identity) -> str:
        return self.ca.creds(who).pem

    def fuzz(self, examples: int, caller, expect=None) -> FuzzReport:  # type: ignore[no-untyped-def]
        return fuzz(self.app, roots=[self.root], examples=examples, caller=caller, expect=expect,
                    known={"disk": [DISK]}, bodies={f"POST {API_PREFIX}/disks": {"size": 1 << 20}})

    def checks_callers(self) -> bool:
        """Whether any route checks its caller (kvmotion.api.serving.allow)."""
        pending = [dep for route in self.fastapi.routes for dep in getattr(getattr(route, "dependant", None),
                                                                          "dependencies", ())]
        while pending:
            dep = pending.pop()
            if getattr(dep.call, "checks_caller", False):
                return True
            pending.extend(dep.dependencies)
        return False


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    fallocate = os.posix_fallocate

    def limited(fd: int, offset: int, length: int) -> None:
        if offset + length > PREALLOC_LIMIT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", limited)
    return Store(tmp_path)


def test_admin_fuzz(store: Store) -> None:
    admin, host = store.pem(ADMIN), store.pem(HOST)

    def expect(case, response) -> str | None:  # type: ignore[no-untyped-def]
        if response.status_code in (401, 403) and label_of(case.operation) not in LEASE_ROUTES:
            return "an admin refused"
        return None

    report = store.fuzz(ADMIN_EXAMPLES, caller=lambda label: host if label in LEASE_ROUTES else admin, expect=expect)
    print(report.summary(), report.table(), sep="\n")
    report.assert_clean(min_requests=MIN_ADMIN_REQUESTS)
    assert report.statuses[200] and report.statuses[409]  # some calls succeeded, some met a lease or a name


@pytest.mark.parametrize("who, allowed", [(VIEWER, frozenset()), (HOST, LEASE_ROUTES)], ids=["viewer", "host"])
def test_changes_refused_fuzz(store: Store, who: Identity, allowed: frozenset[str]) -> None:
    report = store.fuzz(15, caller=lambda label: store.pem(who), expect=changes_refused(allowed))
    print(report.summary(), report.table(), sep="\n")
    if not store.checks_callers():
        # main's datastore API checks no caller (the datastore branch adds the checks; then this runs as is).
        assert any("a change not refused" in failure for failure in report.failures)
        pytest.xfail("this datastore API lets any caller change disks and leases")
    report.assert_clean(min_requests=100)
    assert report.statuses[403]
