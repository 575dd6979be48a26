"""`kvmotion cluster init|cert|user|show`: the cluster CA, the certificates of hosts, datastores and users, settings;
`kvmotion cluster settings`: the center's cluster settings (shown, or changed by an admin)."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from cryptography import x509
from rich.console import Console

from kvmotion.api.config import ClusterConfig, load_config, save_config
from kvmotion.api.identity import Role, check_user_name, identity_of, parse_role
from kvmotion.api.inventory import cluster_dir
from kvmotion.api.pki import CA_CERT, CLIENT_CERT, SERVER_CERT, init_ca, issue_datastore_cert, issue_host_cert, issue_user_cert, load_ca
from kvmotion.api.tls import DEFAULT_USER
from kvmotion.core.errors import Conflict, InvalidInput
from kvmotion.qemu import confine

app = typer.Typer(no_args_is_help=True, help="The cluster: its CA, certificates of hosts, datastores and users, settings.")
users = typer.Typer(no_args_is_help=True, help="Users: each gets a certificate carrying a role (viewer, operator, admin).")
app.add_typer(users, name="user")
console = Console()

_CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _folder(folder: Path | None) -> Path:
    return folder if folder is not None else cluster_dir()


@app.command()
def init(
    folder: Path | None = typer.Option(None, "--dir", help="Cluster folder (default: $KVMOTION_CLUSTER_DIR or STATE/cluster)."),
    plain: bool = typer.Option(False, "--plain", help="No encryption: migrations and agent API in clear (trusted network only)."),
    cpu_baseline: str | None = typer.Option(None, "--cpu-baseline", help="CPU model every VM gets unless it names one (like EVC)."),
) -> None:
    """Create the cluster CA, its first user (admin) and the settings. Re-running keeps an existing
    CA and users and rewrites the settings."""
    if cpu_baseline is not None and not _CPU_MODEL_RE.fullmatch(cpu_baseline):
        raise InvalidInput(f"invalid CPU model {cpu_baseline!r}: use a QEMU model name such as Haswell-v4 or qemu64")
    d = _folder(folder)
    if not plain:
        existed = (d / "ca" / CA_CERT).exists()
        ca = init_ca(d / "ca")
        verb = "kept existing" if existed else "created"
        console.print(f"{verb} cluster CA {ca.subject} in {ca.dir}")
        console.print(f"  SHA-256 {ca.fingerprint}, valid until {ca.expires:%Y-%m-%d}")
        admin = d / "users" / DEFAULT_USER
        if not (admin / CLIENT_CERT).exists():
            issue_user_cert(d / "ca", DEFAULT_USER, Role.ADMIN, admin)
            console.print(f"created user {DEFAULT_USER} (role admin): its certificate is in {admin}")
    path = save_config(ClusterConfig(encrypted=not plain, cpu_baseline=cpu_baseline), d)
    mode = "PLAIN (unencrypted, trusted network only)" if plain else "encrypted (mutual TLS)"
    console.print(f"cluster settings in {path}: migrations {mode}" + (f", CPU baseline {cpu_baseline}" if cpu_baseline else ""))
    if not plain:
        console.print("next: `kvmotion cluster cert HOST --ip ADDRESS` for each host and datastore, "
                      "`kvmotion cluster user add NAME --role ROLE` for each user")


@app.command()
def cert(
    name: str = typer.Argument(..., help="Host (or datastore) name: the agent's name, also the TLS name peers check."),
    ip: list[str] | None = typer.Option(None, "--ip", help="An address peers reach it at (repeatable)."),
    datastore: bool = typer.Option(False, "--datastore", help="A datastore's certificate instead of a host's."),
    folder: Path | None = typer.Option(None, "--dir", help="Cluster folder (default: $KVMOTION_CLUSTER_DIR or STATE/cluster)."),
) -> None:
    """Issue a host's certificates (its agent's, and its QEMUs' in qemu/) into hosts/NAME, or a
    datastore's into datastores/NAME."""
    d = _folder(folder)
    if datastore:
        issued = issue_datastore_cert(d / "ca", name, ip or [], d / "datastores" / name)
        out, ips, expires = issued.dir, issued.ips, issued.expires
    else:
        creds = issue_host_cert(d / "ca", name, ip or [], d / "hosts" / name, qemu_key_gid=confine.qemu_gid())
        out, ips, expires = creds.dir, creds.ips, creds.expires
    names = ", ".join((name, *ips))
    kind = "datastore" if datastore else "host"
    console.print(f"issued {kind} {name}'s certificate for {names} in {out}, valid until {expires:%Y-%m-%d}")


@users.command("add")
def user_add(
    name: str = typer.Argument(..., help="User name (lowercase letters, digits, '.', '_', '-')."),
    role: str = typer.Option(..., "--role", help="viewer (reads), operator (VMs, migrations, disks) or admin (everything)."),
    out: Path | None = typer.Option(None, "--out", help="Where to write the certificate (default: the cluster folder's users/NAME)."),
    replace: bool = typer.Option(False, "--replace", help="Issue a new certificate for an existing user (e.g. a new role)."),
    folder: Path | None = typer.Option(None, "--dir", help="Cluster folder (default: $KVMOTION_CLUSTER_DIR or STATE/cluster)."),
) -> None:
    """Issue a user's certificate (ca-cert.pem, client-cert.pem, client-key.pem): the CLI uses it
    with KVMOTION_USER=NAME (from the cluster folder) or KVMOTION_CREDENTIALS=FOLDER."""
    d = _folder(folder)
    check_user_name(name)
    the_role = parse_role(role)
    target = out or d / "users" / name
    if (target / CLIENT_CERT).exists() and not replace:
        raise Conflict(f"user {name} already has a certificate in {target}: use --replace to issue a new one")
    issued = issue_user_cert(d / "ca", name, the_role, target)
    console.print(f"issued user {name}'s certificate (role {the_role.value}) in {issued.dir}, valid until {issued.expires:%Y-%m-%d}")


@users.command("list")
def user_list(
    folder: Path | None = typer.Option(None, "--dir", help="Cluster folder (default: $KVMOTION_CLUSTER_DIR or STATE/cluster)."),
) -> None:
    """The users whose certificates are in the cluster folder, with their roles."""
    d = _folder(folder)
    for user_dir in sorted((d / "users").glob("*")):
        path = user_dir / CLIENT_CERT
        if path.exists():
            c = x509.load_pem_x509_certificate(path.read_bytes())
            who = identity_of(c)
            console.print(f"{who.name}: {who.role.value if who.role else '-'}; valid until {c.not_valid_after_utc:%Y-%m-%d}")


@app.command()
def show(
    folder: Path | None = typer.Option(None, "--dir", help="Cluster folder (default: $KVMOTION_CLUSTER_DIR or STATE/cluster)."),
) -> None:
    """The cluster's settings, CA, and host and datastore certificates (users: `cluster user list`)."""
    d = _folder(folder)
    config = load_config(d)
    console.print(f"cluster folder {d}: migrations {'encrypted' if config.encrypted else 'PLAIN'}"
                  + (f", CPU baseline {config.cpu_baseline}" if config.cpu_baseline else ""))
    if not (d / "ca" / CA_CERT).exists():
        console.print("no cluster CA (run `kvmotion cluster init`)")
        return
    ca = load_ca(d / "ca")
    console.print(f"CA {ca.subject}, SHA-256 {ca.fingerprint}, valid until {ca.expires:%Y-%m-%d}")
    for kind in ("hosts", "datastores"):
        for cert_dir in sorted((d / kind).glob("*")):
            path = cert_dir / SERVER_CERT
            if not path.exists():
                continue
            c = x509.load_pem_x509_certificate(path.read_bytes())
            san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(n.value) for n in san]
            console.print(f"  {kind[:-1]} {cert_dir.name}: {', '.join(names)}; valid until {c.not_valid_after_utc:%Y-%m-%d}")


@app.command()
def settings(
    migration_budget_slow: int | None = typer.Option(
        None, "--migration-budget-slow", help="Migrations a host on a link under 10 Gbit/s takes at once."),
    migration_budget_fast: int | None = typer.Option(
        None, "--migration-budget-fast", help="Migrations a host on a link of 10 Gbit/s or more takes at once."),
    cluster_migrations: int | None = typer.Option(None, "--cluster-migrations", help="Migrations running at once in the whole cluster."),
    link_bps: int | None = typer.Option(None, "--link-bps", help="A host's migration link speed (bit/s) unless it reports its own."),
    heartbeat_interval: str | None = typer.Option(None, "--heartbeat-interval", help="Between an agent's heartbeats, e.g. 2s."),
    report_interval: str | None = typer.Option(
        None, "--report-interval", help="Between an agent's full reports when nothing changed, e.g. 20s."),
    not_responding_after: str | None = typer.Option(
        None, "--not-responding-after", help="Silence after which a host is not responding, e.g. 10s."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The center's cluster settings; with options, change them (as an admin logged in with
    `kvmotion login`; the dispatcher uses new budgets and limits at its next pass)."""
    from kvmotion.api.center import SettingsUpdate
    from kvmotion.cli import centerops
    from kvmotion.core.units import parse_duration

    def seconds(text: str | None) -> float | None:
        return None if text is None else parse_duration(text)

    update = SettingsUpdate(migration_budget_slow=migration_budget_slow, migration_budget_fast=migration_budget_fast,
                            cluster_migrations=cluster_migrations, link_bps=link_bps,
                            heartbeat_interval=seconds(heartbeat_interval), report_interval=seconds(report_interval),
                            not_responding_after=seconds(not_responding_after))
    with centerops.client() as client:
        current = client.update_settings(update) if update.changes() else client.settings()
    if json_out:
        print(current.model_dump_json(indent=2))
        return
    for key, value in current.model_dump().items():
        console.print(f"{key}: {value}", highlight=False)
