"""Browser sessions: sign in with a password (as POST /v1/login checks it) or with a one-time
sign-in token a logged-in CLI asks for; then a cookie names the session and a CSRF token guards
every mutating call.

- The cookie's value and the CSRF token are random (256 bits); the store keeps only their sha256.
- A session's caller is the user, with the role the store gives the user now: every route's role
  check applies as to a certificate. A removed user's sessions go with it (foreign key).
- A mutating call must carry the CSRF token in the X-KVMotion-CSRF header, and must not come from
  another site (Sec-Fetch-Site / Origin): a forged request gets 403, one line.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

from starlette.requests import HTTPConnection

from kvmotion.api.identity import Identity, Kind
from kvmotion.api.serving import MUTATING
from kvmotion.api.web import (
    CSRF_HEADER,
    SESSION_COOKIE,
    SESSION_TTL,
    SIGNIN_TTL,
    SessionLogin,
    SessionView,
    SigninToken,
)
from kvmotion.center.auth import Passwords
from kvmotion.center.store import SessionRow, Store
from kvmotion.core.errors import Forbidden, Unauthorized


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Sessions:
    """Sessions over `store`; passwords checked by `passwords` (the center's, same cost)."""

    def __init__(self, store: Store, passwords: Passwords, clock: Callable[[], float]) -> None:
        self.store = store
        self.passwords = passwords
        self.clock = clock

    def _new(self, user: str, now: float) -> tuple[SessionRow, str, str]:
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        row = SessionRow(id_hash=_hash(cookie), user=user, kind="session", csrf_hash=_hash(csrf), created=now,
                         expires=now + SESSION_TTL)
        return row, cookie, csrf

    def sign_in(self, request: SessionLogin) -> tuple[SessionView, str]:
        """The session's view (with its CSRF token) and the cookie's value; Unauthorized in one line."""
        now = self.clock()
        if request.token is not None:
            made: dict[str, tuple[str, str]] = {}

            def make(user: str) -> SessionRow:
                row, cookie, csrf = self._new(user, now)
                made["secrets"] = (cookie, csrf)
                return row

            row = self.store.redeem_signin(_hash(request.token), now, make)
            if row is None:
                raise Unauthorized("unknown, used or expired sign-in token: ask for a new one "
                                   "(`kvmotion center web-token`)")
            cookie, csrf = made["secrets"]
        else:
            assert request.user is not None and request.password is not None  # the model's rule
            user = self.store.user(request.user)
            if not self.passwords.check(request.password, user.password_hash if user else None) or user is None:
                raise Unauthorized("wrong user name or password")
            row, cookie, csrf = self._new(user.name, now)
            self.store.add_session(row, f"user:{user.name}")
        found = self.store.session(row.id_hash)
        if found is None or found.role is None:
            raise Unauthorized(f"user {row.user} no longer exists")
        return SessionView(user=found.user, role=found.role, csrf=csrf, expires=found.expires), cookie

    def signin_token(self, who: Identity) -> SigninToken:
        """A one-time sign-in token for `who`'s own user (users only: hosts and the center sign in nowhere)."""
        if who.kind is not Kind.USER:
            raise Forbidden(f"{who} is not a user: only users sign in to the web client")
        if self.store.user(who.name) is None:
            raise Unauthorized(f"user {who.name} no longer exists")
        now = self.clock()
        token = secrets.token_urlsafe(24)
        self.store.add_session(SessionRow(id_hash=_hash(token), user=who.name, kind="signin", csrf_hash="",
                                          created=now, expires=now + SIGNIN_TTL), str(who))
        return SigninToken(token=token, path=f"/#signin={token}", expires=now + SIGNIN_TTL)

    def sign_out(self, conn: HTTPConnection) -> None:
        cookie = conn.cookies.get(SESSION_COOKIE)
        if cookie:
            self.store.delete_session(_hash(cookie))

    def view(self, conn: HTTPConnection) -> SessionRow | None:
        """The caller's live session (None: no cookie); Unauthorized for an unknown or expired one."""
        cookie = conn.cookies.get(SESSION_COOKIE)
        if not cookie:
            return None
        row = self.store.session(_hash(cookie))
        if row is None or row.kind != "session" or row.expires <= self.clock():
            raise Unauthorized("session expired or signed out: sign in again")
        return row

    def identify(self, conn: HTTPConnection) -> Identity | None:
        """The caller a session cookie names (None: no cookie). Mutating calls need the session's
        CSRF token and must not come from another site: Forbidden otherwise."""
        row = self.view(conn)
        if row is None:
            return None
        if conn.scope.get("method") in MUTATING:
            site = conn.headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                raise Forbidden(f"refused a {site} request carrying a session: only the center's own page may call")
            origin = conn.headers.get("origin")
            host = conn.headers.get("host")
            if origin is not None and host is not None and origin.split("://", 1)[-1] != host:
                raise Forbidden(f"refused a request from origin {origin[:100]!r}: only the center's own page may call")
            token = conn.headers.get(CSRF_HEADER)
            if not token or not hmac.compare_digest(_hash(token), row.csrf_hash):
                raise Forbidden(f"missing or wrong {CSRF_HEADER} header: a session's changes need its CSRF token")
        assert row.role is not None
        return Identity(Kind.USER, row.user, row.role)
