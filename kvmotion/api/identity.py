"""Who is calling: identities carried by the cluster CA's certificates, and what each may do.

Every certificate the cluster CA issues names one identity in its subject:

    O=kvmotion, OU=<kind>, CN=<name>[, role=<role>]      (role: X.520 attribute 2.5.4.72, users only)

- host:NAME       a host agent (agent API, agent-to-agent calls, datastore lease calls)
- qemu:NAME       the QEMU processes of host NAME: NBD and migration streams only, never an API
- datastore:NAME  a datastore service (its NBD and control listeners)
- user:NAME       a person or script, with a role: viewer < operator < admin
- center:NAME     the control plane (`kvmotion center`): serves its API, calls agents; every route a
                  user may call (a rule with a role) admits it as it would an admin

The kinds keep a compromised QEMU (which must read its key) from acting as its host's agent.
Pure: no I/O beyond parsing a certificate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.x509.oid import NameOID

from kvmotion.core.errors import Forbidden, InvalidInput, Unauthorized

ORGANIZATION = "kvmotion"
ROLE_OID = x509.ObjectIdentifier("2.5.4.72")  # X.520 "role"

_USER_RE = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")
_DNS_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class Kind(str, Enum):
    HOST = "host"
    QEMU = "qemu"
    DATASTORE = "datastore"
    USER = "user"
    CENTER = "center"


class Role(str, Enum):
    """A user's role; each includes the ones before it."""

    VIEWER = "viewer"  # reads everything
    OPERATOR = "operator"  # creates, starts, stops, migrates VMs; creates disks
    ADMIN = "admin"  # also manages the cluster: users, hosts, datastores, settings

    @property
    def rank(self) -> int:
        return list(Role).index(self)


def check_user_name(name: str) -> str:
    if not _USER_RE.fullmatch(name):
        raise InvalidInput(f"invalid user name {name!r}: 1-32 lowercase letters, digits, '.', '_' or '-', starting with a letter")
    return name


def check_identity_name(kind: Kind, name: str) -> str:
    if kind is Kind.USER:
        return check_user_name(name)
    if not _DNS_RE.fullmatch(name):
        raise InvalidInput(f"invalid {kind.value} name {name!r}: use letters, digits, '-' and dots (a DNS name)")
    return name


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise InvalidInput(f"unknown role {text!r}: use one of {', '.join(r.value for r in Role)}") from None


@dataclass(frozen=True)
class Identity:
    kind: Kind
    name: str
    role: Role | None = None  # users only

    def __post_init__(self) -> None:
        check_identity_name(self.kind, self.name)
        if (self.kind is Kind.USER) != (self.role is not None):
            raise InvalidInput(f"{self.kind.value} {self.name}: a role is given to users and only to users")

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.name}" + (f" ({self.role.value})" if self.role else "")

    def has_role(self, role: Role) -> bool:
        return self.role is not None and self.role.rank >= role.rank

    def is_host(self, name: str | None = None) -> bool:
        return self.kind is Kind.HOST and (name is None or self.name == name)

    def subject(self) -> x509.Name:
        attrs = [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.kind.value),
            x509.NameAttribute(NameOID.COMMON_NAME, self.name),
        ]
        if self.role is not None:
            attrs.append(x509.NameAttribute(ROLE_OID, self.role.value))
        return x509.Name(attrs)

    def tls_dn(self) -> str:
        """The subject as QEMU's TLS layer prints a peer's name, what its tls-authz objects match:
        GnuTLS's gnutls_x509_crt_get_dn keeps the certificate's attribute order (QEMU 10.0.2 says
        "O=kvmotion,OU=qemu,CN=host-a"), unlike RFC 4514's reversed one. Names are DNS names:
        nothing to escape."""
        return ",".join(rdn.rfc4514_string() for rdn in self.subject().rdns)


# What every caller is when a listener runs with --insecure: no certificates, no checks.
INSECURE = Identity(Kind.USER, "insecure", Role.ADMIN)


def _one(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity a (CA-verified) certificate names; Unauthorized if it names none."""
    subject = cert.subject
    org, unit, cn = (_one(subject, o) for o in (NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME))
    if org != ORGANIZATION or unit is None or cn is None:
        raise Unauthorized(
            f"certificate {subject.rfc4514_string()!r} names no kvmotion identity: re-issue it "
            "(`kvmotion host join` for hosts, `kvmotion login` for users)"
        )
    try:
        kind = Kind(unit)
        role = _one(subject, ROLE_OID)
        return Identity(kind, cn, Role(role) if role is not None else None)
    except (ValueError, InvalidInput) as exc:
        raise Unauthorized(f"certificate {subject.rfc4514_string()!r} names no valid identity: {exc}") from None


def identity_of_der(der: bytes) -> Identity:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise Unauthorized(f"unreadable client certificate: {exc}") from None
    return identity_of(cert)


# ---- authorization rules ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """Who may call a route: users with at least `role`, and/or identities of the given kinds."""

    role: Role | None = None
    kinds: frozenset[Kind] = frozenset()

    def allows(self, who: Identity) -> bool:
        if who.kind is Kind.USER:
            return self.role is not None and who.has_role(self.role)
        if who.kind is Kind.CENTER:  # the control plane acts for users: what an admin may do, no more
            return self.role is not None or who.kind in self.kinds
        return who.kind in self.kinds

    def describe(self) -> str:
        parts = [f"users with role {self.role.value} or higher"] if self.role else []
        parts += [f"{k.value} identities" for k in sorted(self.kinds, key=lambda k: k.value)]
        return " or ".join(parts) or "nobody"


VIEW = Rule(Role.VIEWER, frozenset({Kind.HOST}))  # reads: every user, and peer hosts
OPERATE = Rule(Role.OPERATOR)  # VM lifecycle, migrations, disks
ADMINISTER = Rule(Role.ADMIN)
HOSTS = Rule(None, frozenset({Kind.HOST}))  # host-to-host and host-to-datastore calls


def authorize(who: Identity, rule: Rule, what: str) -> Identity:
    if not rule.allows(who):
        raise Forbidden(f"{who} may not {what}: allowed for {rule.describe()}")
    return who
