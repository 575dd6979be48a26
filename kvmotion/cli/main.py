"""kvmotion's command line: one typer app, a sub-app per noun (vm, host, migrate, center, ...) and `login`."""

from __future__ import annotations

import importlib
import sys

import typer

from kvmotion.core.errors import KvmotionError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Live migration of running QEMU/KVM VMs.")

# Each sub-app lives in kvmotion/cli/<module>.py and exposes `app`.
_SUBAPPS = ("vm", "host", "migrate", "lab", "datastore", "disk", "cluster", "center", "login", "demo", "task", "events")
for _mod in _SUBAPPS:
    try:
        _sub = importlib.import_module(f"kvmotion.cli.{_mod}")
    except ModuleNotFoundError as exc:
        if exc.name != f"kvmotion.cli.{_mod}":
            raise
        continue
    if isinstance(_sub.app, typer.Typer):
        app.add_typer(_sub.app, name=_mod)
    else:  # a single command (e.g. demo)
        app.command(name=_mod)(_sub.app)

# `host ls` goes through the center (kvmotion.cli.centerops); the host sub-app keeps its own commands.
_host = importlib.import_module("kvmotion.cli.host").app
_host.command("ls")(importlib.import_module("kvmotion.cli.centerops").host_ls)
# Maintenance, health, DRS and rules: through the center (kvmotion.cli.ops).
_ops = importlib.import_module("kvmotion.cli.ops")
_host.add_typer(_ops.maintenance_app, name="maintenance")
_host.add_typer(_ops.health_app, name="health")
app.add_typer(_ops.drs_app, name="drs")
app.add_typer(_ops.rule_app, name="rule")


def main() -> None:
    # Not click's standalone mode: a wrong flag or value is one line too, like every other error.
    try:
        code = app(standalone_mode=False)
    except KvmotionError as exc:
        print(f"kvmotion: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # a wrong flag, value or command (typer's click: usage errors)
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if getattr(ctx, "command_path", None) else ""
        print(f"kvmotion: error: {exc.format_message()}{where}", file=sys.stderr)
        sys.exit(2 if exc.exit_code == 1 else exc.exit_code)
    except typer.Abort:
        print("kvmotion: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
