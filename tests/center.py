"""A center as `kvmotion center serve` builds it (kvmotion.center.serve.prepare), in a thread of the
test process on a TLS listener, and the ways machines get their identities from it: hosts and
datastores join with its first-start token (their keys made locally, CSRs signed), users log in
with a password. For tests that need one agent or one datastore, not a whole lab."""

from __future__ import annotations

from pathlib import Path

from kvmotion.api.center import CenterClient, Credentials, DatastoreSpec, LoginRequest, UserAdd, pinned_ca, trusting
from kvmotion.api.identity import Role
from kvmotion.api.joined import StateRoot
from kvmotion.api.pki import new_key_and_csr, write_credentials
from kvmotion.api.tls import client_context
from kvmotion.center.app import create_app
from kvmotion.center.dispatcher import Dispatcher, HttpAgents
from kvmotion.center.serve import Listen, prepare
from kvmotion.cli.login import save_credentials
from kvmotion.core.listen import listening_socket
from kvmotion.host.join import join as join_host
from kvmotion.qemu import confine
from kvmotion.storage.join import DatastoreRoot
from kvmotion.storage.join import join as join_datastore
from tests.served import ServedApp

PASSWORD_COST = 10  # scrypt log2(N) for the admin's password: a test's login costs milliseconds


class CenterInThread(ServedApp):
    """The center on `ip` (an address of this namespace), a free port."""

    __test__ = False

    def __init__(self, data: Path, ip: str = "127.0.0.1", dispatch: bool = False) -> None:
        """`dispatch`: run tasks (create, start, stop VMs; migrate) on the agents, as `center serve` does."""
        sock = listening_socket(ip, 0, "the center")
        self.prepared = prepare(data, Listen(ip, sock.getsockname()[1]), insecure=False, password_cost=PASSWORD_COST)
        center = self.prepared.center
        dispatcher = Dispatcher(center.store, HttpAgents(client_context(data / "tls")), clock=center.clock) if dispatch else None
        super().__init__(create_app(center, dispatcher=dispatcher), self.prepared.security, "center", lifespan="on",
                         sock=sock)
        self.url = f"https://{ip}:{self.port}"
        self._passwords: dict[str, str] = {}

    def _line(self, starts: str) -> str:
        return next(line for line in self.prepared.lines if line.startswith(starts)).rsplit(" ", 1)[1]

    @property
    def token(self) -> str:
        return self._line("join token")

    def login(self, user: str = "admin", role: Role = Role.ADMIN) -> Credentials:
        """`user` logged in: admin with the first start's password, another user added by admin first
        (with `role`). A certificate for a key made here."""
        ca = pinned_ca(self.url, self.prepared.center.ca_sha256).ca_cert
        password = self._line("user admin's password")
        if user != "admin":
            if user not in self._passwords:
                with self.login().client() as admin:
                    added = admin.add_user(UserAdd(name=user, role=role))
                assert added.password is not None
                self._passwords[user] = added.password
            password = self._passwords[user]
        key, csr = new_key_and_csr()
        with CenterClient(self.url, trusting(ca)) as anonymous:
            answer = anonymous.login(LoginRequest(user=user, password=password, csr=csr))
        assert answer.role is role
        return Credentials(center=self.url, user=user, ca_cert=answer.ca_cert, cert=answer.cert, key=key.decode())

    def login_config(self, path: Path) -> Path:
        """`kvmotion login` as admin, saved to `path` (what KVMOTION_CONFIG names)."""
        save_credentials(self.login(), path)
        return path

    def user_dir(self, out: Path, user: str = "admin", role: Role = Role.ADMIN) -> Path:
        """A user's login as a credentials folder (ca-cert.pem, client-cert.pem, client-key.pem)."""
        creds = self.login(user, role)
        write_credentials(out, creds.ca_cert.encode(), creds.cert.encode(), creds.key.encode(), server=False)
        return out

    def join_host(self, name: str, address: str, root: Path, agent_port: int = 7701) -> StateRoot:
        state = StateRoot(root)
        join_host(self.url, self.token, name, address, state, agent_port=agent_port, qemu_key_gid=confine.qemu_gid())
        return state

    def join_datastore(self, name: str, addresses: tuple[str, ...], port: int, root: Path) -> DatastoreRoot:
        state = DatastoreRoot(root)
        join_datastore(self.url, self.token, name, addresses[0], state, nbd_port=port, more_addresses=addresses[1:])
        return state

    def add_datastore(self, name: str, nbd_url: str, control_url: str) -> None:
        with self.login().client() as admin:
            admin.add_datastore(DatastoreSpec(name=name, nbd_url=nbd_url, control_url=control_url))

    def close(self) -> None:
        super().close()  # the lifespan ends first: the heartbeat loop stops before the store closes
        self.prepared.center.store.close()
