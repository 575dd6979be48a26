"""The cluster CA: one self-signed ECDSA P-256 root per cluster, one certificate per identity.

Like vSphere's encrypted vMotion, every host gets a certificate from the cluster's own CA and
peers accept nothing else. The subject names the identity (kvmotion.api.identity): a host's
certificate serves its agent's HTTPS API and its calls to peers and datastores; its QEMUs get
their own (qemu:HOST, in the host folder's qemu/), readable after QEMU drops root, good only
for NBD and migration streams; users get client-only certificates carrying their role.
Folders use the file names QEMU's `tls-creds-x509` object looks for in its `dir`:

    ca-cert.pem  server-cert.pem  server-key.pem  client-cert.pem  client-key.pem

Key usage is marked non-critical: QEMU refuses a leaf whose *critical* key usage lacks
keyEncipherment, which an ECDSA key cannot do.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmotion.api.identity import Identity, Kind, check_identity_name, identity_of
from kvmotion.core.errors import Conflict, InvalidInput, NotFound, SetupError
from kvmotion.core.files import write_atomic

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"

CA_VALIDITY = dt.timedelta(days=3652)  # 10 years
HOST_VALIDITY = dt.timedelta(days=1826)  # 5 years: an expired host certificate stops migrations
QEMU_DIR = "qemu"  # a host folder's subfolder with its QEMUs' identity
# Hosts' clocks differ a little; a certificate born "in the future" would be refused for that long.
BACKDATE = dt.timedelta(hours=1)



@dataclass(frozen=True)
class CA:
    """A loaded cluster CA (its private key stays in `dir`, mode 0600)."""

    dir: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_path(self) -> Path:
        return self.dir / CA_CERT

    @property
    def key_path(self) -> Path:
        return self.dir / CA_KEY

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate, as `openssl x509 -fingerprint -sha256` prints it."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    @property
    def expires(self) -> dt.datetime:
        return self.cert.not_valid_after_utc


@dataclass(frozen=True)
class HostCredentials:
    """A host's folder in the tls-creds-x509 layout."""

    dir: Path
    host: str
    ips: tuple[str, ...]
    expires: dt.datetime

    @property
    def ca_cert(self) -> Path:
        return self.dir / CA_CERT

    @property
    def cert(self) -> Path:
        return self.dir / SERVER_CERT

    @property
    def key(self) -> Path:
        return self.dir / SERVER_KEY


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def load_ca(ca_dir: Path | str) -> CA:
    """The CA in `ca_dir` (ca-cert.pem + ca-key.pem)."""
    d = Path(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise NotFound(f"no cluster CA in {d} ({Path(exc.filename).name} missing): the center makes it at its first start "
                       "(`kvmotion center serve`)") from exc
    except PermissionError as exc:
        raise SetupError(f"cannot read the cluster CA in {d}: {exc.strerror}; run as root") from exc
    except ValueError as exc:
        raise SetupError(f"the cluster CA in {d} is damaged ({exc}): restore it from a backup of the center's data") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise SetupError(f"the cluster CA key in {d} does not match its certificate: restore the pair")
    return CA(dir=d, cert=cert, key=key)


def init_ca(ca_dir: Path | str, name: str = "kvmotion cluster CA") -> CA:
    """Create the cluster CA in `ca_dir` (folder 0700, key 0600); an existing CA is kept and returned.

    Keeping it matters: replacing a CA silently would invalidate every host certificate.
    """
    d = Path(ca_dir)
    if (d / CA_CERT).exists() or (d / CA_KEY).exists():
        return load_ca(d)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix tells two clusters' CAs apart in error messages and `openssl x509 -text`.
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvmotion"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {secrets.token_hex(4)}"),
    ])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(d / CA_KEY, _key_pem(key), 0o600)
    write_atomic(d / CA_CERT, _cert_pem(cert), 0o644)
    return CA(dir=d, cert=cert, key=key)


def check_host_name(name: str) -> str:
    return check_identity_name(Kind.HOST, name)


def _parse_ips(ips: list[str] | tuple[str, ...]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for text in ips:
        try:
            out.append(ipaddress.ip_address(text.strip()))
        except ValueError:
            raise InvalidInput(f"invalid IP address {text!r}: use e.g. 10.0.0.1 or fd00::1") from None
    return out


@dataclass(frozen=True)
class Issued:
    """A certificate written into a folder in QEMU's tls-creds-x509 layout."""

    dir: Path
    identity: Identity
    ips: tuple[str, ...]
    expires: dt.datetime


def _leaf(
    ca: CA, who: Identity, public_key: ec.EllipticCurvePublicKey, addresses: list, dns: tuple[str, ...], *,
    server: bool, validity: dt.timedelta,
) -> x509.Certificate:
    """`who`'s certificate for `public_key`, signed by `ca`: client use always, server use (SAN: the
    name, `dns` and `addresses`) when `server`."""
    now = _now()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(who.subject())
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + validity, ca.expires))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if server:
        names = dict.fromkeys((who.name, *dns))
        san: list[x509.GeneralName] = [x509.DNSName(n) for n in names] + [x509.IPAddress(a) for a in addresses]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def _check_dns(names: tuple[str, ...]) -> tuple[str, ...]:
    for name in names:
        check_identity_name(Kind.HOST, name)  # the DNS-name rule
    return names


def issue_cert(
    ca_dir: Path | str, who: Identity, ips: list[str] | tuple[str, ...], out_dir: Path | str, *,
    server: bool, validity: dt.timedelta = HOST_VALIDITY, key_gid: int | None = None, dns: tuple[str, ...] = (),
) -> Issued:
    """Issue `who`'s certificate into `out_dir`: client-cert/key always, server-cert/key too when
    `server` (SAN: the name, `dns` and `ips`). With `key_gid` the keys are 0640 for that group."""
    addresses = _parse_ips(ips)
    ca = load_ca(ca_dir)
    out = Path(out_dir)
    if out.resolve() == ca.dir.resolve():
        raise Conflict(f"{out} holds the CA: issue certificates into their own folder")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(ca, who, key.public_key(), addresses, _check_dns(dns), server=server, validity=validity)
    write_credentials(out, _cert_pem(ca.cert), _cert_pem(cert), _key_pem(key), server=server, key_gid=key_gid)
    return Issued(dir=out, identity=who, ips=tuple(str(a) for a in addresses), expires=cert.not_valid_after_utc)


def write_credentials(out: Path, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, *, server: bool,
                      key_gid: int | None = None) -> None:
    """One identity's folder in the tls-creds-x509 layout: client-cert/key always, server-cert/key
    too when `server` (the same pair). With `key_gid` the key is 0640 for that group, else 0600."""
    out.mkdir(parents=True, exist_ok=True)
    key_mode = 0o640 if key_gid is not None else 0o600
    files = [(CA_CERT, ca_pem, 0o644, None), (CLIENT_KEY, key_pem, key_mode, key_gid), (CLIENT_CERT, cert_pem, 0o644, None)]
    if server:
        files += [(SERVER_KEY, key_pem, key_mode, key_gid), (SERVER_CERT, cert_pem, 0o644, None)]
    for name, data, mode, gid in files:
        write_atomic(out / name, data, mode, gid)


def check_issued(cert_pem: str, key_pem: bytes, ca_pem: str, who: Identity) -> x509.Certificate:
    """A certificate the CA sent back for a CSR, before it is kept: for our key, naming `who`,
    signed by the CA (InvalidInput naming what is wrong)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise InvalidInput(f"unreadable certificate for {who}: {exc}") from None
    if cert.public_key() != key.public_key():
        raise InvalidInput(f"the certificate for {who} is not for the key this host made")
    if identity_of(cert) != who:
        raise InvalidInput(f"the certificate for {who} names {identity_of(cert)}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidInput(f"the certificate for {who} is not signed by the cluster CA") from None
    return cert


# Keys a CSR may carry: what QEMU's GnuTLS, OpenSSL and our own issue_cert all handle.
CSR_CURVES = (ec.SECP256R1, ec.SECP384R1)
MAX_CSR_PEM = 4096  # characters: an EC CSR is well under 1 KiB


def load_csr(pem: str | bytes, what: str = "certificate signing request") -> x509.CertificateSigningRequest:
    """A CSR whose signature proves its key's owner made it, with an accepted key; InvalidInput otherwise."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_PEM:
        raise InvalidInput(f"invalid {what}: longer than {MAX_CSR_PEM} characters")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise InvalidInput(f"invalid {what}: not a PEM certificate signing request") from None
    try:
        key = csr.public_key()
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidInput(f"invalid {what}: its key or signature algorithm is not supported") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, CSR_CURVES):
        raise InvalidInput(f"invalid {what}: the key must be ECDSA P-256 or P-384")
    if not signed:
        raise InvalidInput(f"invalid {what}: its signature does not verify")
    return csr


def sign_csr(
    ca: CA | Path | str, csr: x509.CertificateSigningRequest | str | bytes, who: Identity,
    ips: list[str] | tuple[str, ...] = (), *, server: bool, validity: dt.timedelta = HOST_VALIDITY,
) -> x509.Certificate:
    """`who`'s certificate for the key of `csr` (PEM, checked by load_csr): the CA decides the subject
    and the names (SAN: `who`'s name and `ips` when `server`); what the CSR asks for beyond its key
    is ignored. The private key never leaves the requester."""
    loaded = ca if isinstance(ca, CA) else load_ca(ca)
    if not isinstance(csr, x509.CertificateSigningRequest):
        csr = load_csr(csr)
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # load_csr refused any other key
    return _leaf(loaded, who, key, _parse_ips(ips), (), server=server, validity=validity)


def new_key_and_csr(label: str = "kvmotion") -> tuple[bytes, str]:
    """A fresh P-256 key (PEM, PKCS#8) and a CSR for it: what a joining host or a user sends to be
    signed. The CSR's subject is a label only; the CA names the identity."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)]))
           .sign(key, hashes.SHA256()))
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return _cert_pem(cert).decode()


def sha256_hex(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate (DER), lowercase hex without separators: what a join token pins."""
    return cert.fingerprint(hashes.SHA256()).hex()


def issue_host_cert(
    ca_dir: Path | str, host_name: str, ips: list[str] | tuple[str, ...], out_dir: Path | str, *,
    qemu_key_gid: int | None,
) -> HostCredentials:
    """Issue host `host_name`'s certificate into `out_dir`, and its QEMUs' into `out_dir`/qemu: the
    key QEMU reads after dropping root, readable by group `qemu_key_gid` (kvmotion.qemu.confine.qemu_gid:
    the group QEMU runs with; None when there is none)."""
    check_host_name(host_name)
    issued = issue_cert(ca_dir, Identity(Kind.HOST, host_name), ips, out_dir, server=True)
    issue_cert(ca_dir, Identity(Kind.QEMU, host_name), ips, Path(out_dir) / QEMU_DIR, server=True, key_gid=qemu_key_gid)
    return HostCredentials(dir=issued.dir, host=host_name, ips=issued.ips, expires=issued.expires)
