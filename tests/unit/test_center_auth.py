"""Join tokens, passwords and CSR signing: the pure logic under the center's join and login."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmotion.api.center import TokenParts, ca_sha256, parse_token
from kvmotion.api.identity import Identity, Kind, Role, identity_of
from kvmotion.api.pki import (
    cert_pem,
    init_ca,
    load_csr,
    new_key_and_csr,
    sha256_hex,
    sign_csr,
)
from kvmotion.center import auth
from kvmotion.center.store import TokenRow
from kvmotion.core.errors import InvalidInput, Unauthorized

CA_HASH = "ab" * 32
NOW = 1_800_000_000.0


def _made(ttl: float = 3600, uses: int | None = 1) -> tuple[auth.TokenParts, TokenRow]:
    return auth.new_token(CA_HASH, NOW, ttl, uses, "user:admin (admin)")


def test_token_format_and_storage() -> None:
    parts, row = _made()
    text = str(parts)
    prefix, ca, token_id, secret = text.split(".")
    assert (prefix, ca, token_id) == ("kvm1", CA_HASH, row.id)
    assert len(token_id) == 12 and len(secret) == 32
    assert secret not in repr(row) and row.secret_hash == auth.secret_hash(secret)  # only the hash is kept
    assert parse_token(f"  {text}\n") == parts
    assert row.expires == NOW + 3600 and row.uses_left == 1
    assert _made()[0].secret != parts.secret


def test_a_good_token_is_accepted() -> None:
    parts, row = _made()
    auth.check_token(parts, CA_HASH, row, NOW + 3599)


@pytest.mark.parametrize("text", ["", "kvm1", "kvm2." + "ab" * 32 + ".0123456789ab." + "0" * 32,
                                  "kvm1." + "ab" * 31 + ".0123456789ab." + "0" * 32,
                                  "kvm1." + "ab" * 32 + ".0123456789AB." + "0" * 32,
                                  "kvm1." + "ab" * 32 + ".0123456789ab." + "0" * 31 + ".x"])
def test_malformed_tokens(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"^malformed join token: expected kvm1\.<CA sha256>\.<id>\.<secret>"):
        parse_token(text)


def test_refusals_are_one_line_and_never_quote_the_secret() -> None:
    parts, row = _made()
    cases = {
        "another cluster": (TokenParts("cd" * 32, parts.id, parts.secret), row, NOW),
        "unknown join token": (parts, None, NOW),
        "is forged": (TokenParts(CA_HASH, parts.id, "0" * 32), row, NOW),
        "expired at 2027-01-15 09:00:00 UTC": (parts, row, NOW + 3600),
        "is used up": (parts, TokenRow(**{**row.__dict__, "uses_left": 0}), NOW),
    }
    for says, (presented, stored, now) in cases.items():
        with pytest.raises(Unauthorized) as refused:
            auth.check_token(presented, CA_HASH, stored, now)
        message = str(refused.value)
        assert says in message and "\n" not in message and parts.secret not in message, message
    # A forger learns nothing about the token's expiry or uses: the secret is checked first.
    with pytest.raises(Unauthorized, match="forged"):
        auth.check_token(TokenParts(CA_HASH, parts.id, "0" * 32), CA_HASH, TokenRow(**{**row.__dict__, "uses_left": 0}),
                         NOW + 7200)


def test_unlimited_tokens_and_bad_requests() -> None:
    parts, row = _made(uses=None)
    auth.check_token(parts, CA_HASH, row, NOW)
    with pytest.raises(InvalidInput):
        auth.new_token(CA_HASH, NOW, 0, None, "x")
    with pytest.raises(InvalidInput):
        auth.new_token(CA_HASH, NOW, 60, 0, "x")


def test_passwords() -> None:
    stored = auth.hash_password("correct horse battery", log2_n=10)
    scheme, log2_n, r, p, salt, digest = stored.split("$")
    assert (scheme, log2_n, r, p) == ("scrypt", "10", "8", "1") and len(salt) == 32 and len(digest) == 64
    assert "correct" not in stored
    assert auth.verify_password("correct horse battery", stored)
    assert not auth.verify_password("correct horse batterz", stored)
    assert auth.hash_password("correct horse battery", log2_n=10) != stored  # salted
    for damaged in ("", "scrypt$10$8$1$zz$00", "bcrypt$10$8$1$00$00", "scrypt$40$8$1$00$00", stored[:-2]):
        assert not auth.verify_password("correct horse battery", damaged)
    passwords = auth.Passwords(log2_n=10)
    assert passwords.check("pw", passwords.hash("pw"))
    assert not passwords.check("pw", None)  # an unknown user: a decoy hash is computed, and refused
    assert auth.verify_password("x", auth.hash_password("x"))  # the default cost verifies too
    with pytest.raises(InvalidInput, match="at least 12 characters"):
        auth.check_new_password("short")
    assert len(auth.new_password()) >= 16


# ---- CSRs --------------------------------------------------------------------------------------------------
def test_sign_csr_names_whom_the_ca_decides(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    key_pem, csr_pem = new_key_and_csr("please make me admin")
    cert = sign_csr(ca, csr_pem, Identity(Kind.HOST, "host-a"), ("10.0.0.1",), server=True)
    assert identity_of(cert) == Identity(Kind.HOST, "host-a")
    key = serialization.load_pem_private_key(key_pem, None)
    assert cert.public_key() == key.public_key()  # for the requester's own key
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host-a"] and [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    user = sign_csr(tmp_path / "ca", load_csr(csr_pem), Identity(Kind.USER, "ada", Role.VIEWER), server=False,
                    validity=dt.timedelta(days=7))
    assert identity_of(user) == Identity(Kind.USER, "ada", Role.VIEWER)
    assert list(user.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert user.not_valid_after_utc - user.not_valid_before_utc <= dt.timedelta(days=7, hours=1)
    assert sha256_hex(ca.cert) == ca_sha256(cert_pem(ca.cert)) == ca.fingerprint.replace(":", "").lower()


def test_center_identity() -> None:
    center = Identity(Kind.CENTER, "center")
    assert str(center) == "center:center"
    assert identity_of_subject(center) == center


def identity_of_subject(who: Identity) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(who.subject()).issuer_name(who.subject()).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return identity_of(cert)


def _csr(key, sign_with=None) -> str:  # type: ignore[no-untyped-def]
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(sign_with or key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_bad_csrs_are_refused_in_one_line() -> None:
    good_key = ec.generate_private_key(ec.SECP256R1())
    good = _csr(good_key)
    # A CSR whose signature was made by another key than the one it carries: patch the key bytes.
    other = ec.generate_private_key(ec.SECP256R1())
    forged = x509.load_pem_x509_csr(good.encode())
    der = forged.public_bytes(serialization.Encoding.DER)
    own = good_key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    theirs = other.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    swapped = x509.load_der_x509_csr(der.replace(own, theirs)).public_bytes(serialization.Encoding.PEM).decode()
    cases = {
        "not a PEM certificate signing request": "hello",
        "the key must be ECDSA P-256 or P-384": _csr(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "its signature does not verify": swapped,
        "longer than 4096 characters": good + "x" * 5000,
    }
    for says, pem in cases.items():
        with pytest.raises(InvalidInput) as refused:
            load_csr(pem, "host CSR")
        assert str(refused.value) == f"invalid host CSR: {says}"
    assert load_csr(good).public_key() == good_key.public_key()
    assert load_csr(_csr(ec.generate_private_key(ec.SECP384R1())))  # P-384 is fine
    with pytest.raises(InvalidInput, match="must be ECDSA P-256 or P-384"):
        load_csr(_csr(ec.generate_private_key(ec.SECP521R1())))
