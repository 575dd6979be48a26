"""What live migration is for, through the center: `host maintenance`, `host health`, `drs`, `rule`."""

from __future__ import annotations

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from kvmotion.api import operations as ops
from kvmotion.api.center import Severity
from kvmotion.api.operations import (
    Automation,
    DrsApply,
    DrsConfig,
    HealthReport,
    HostHealth,
    MaintenanceAnswer,
    MaintenanceExit,
    MaintenanceRequest,
    Plan,
    RuleKind,
    RuleSpec,
    Strength,
)
from kvmotion.cli import centerops
from kvmotion.cli.centerops import when
from kvmotion.cli.common import console


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f} s"


def plan_table(plan: Plan) -> Table:
    t = Table("#", "VM", "from", "to", "predicted", "downtime", "why")
    for m in plan.moves:
        down = "-" if m.predicted_downtime_ms is None else f"{m.predicted_downtime_ms:.0f} ms"
        t.add_row(str(m.order), m.vm, m.source, m.destination, "re-homed" if m.powered_off else _seconds(m.predicted_s),
                  "-" if m.powered_off else down, m.why)
    return t


def _print_plan(answer: MaintenanceAnswer, json_out: bool, verb: str) -> None:
    if json_out:
        print(answer.model_dump_json(indent=2))
        return
    plan = answer.plan
    if plan.moves:
        console.print(plan_table(plan))
    for u in plan.unmovable:
        console.print(f"[yellow]cannot move[/] {u.vm}: {u.reason}")
    total = f", predicted {plan.predicted_s:.0f} s" if plan.predicted_s is not None and plan.moves else ""
    console.print(f"{plan.host}: {len(plan.moves)} move(s){total}; {verb}; host is "
                  f"{answer.mode.value.replace('_', ' ')}")
    for task in answer.tasks:
        console.print(f"  task {task.id}: migrate {task.target} {task.source} -> {task.destination}")


# ---- host maintenance ----
maintenance_app = typer.Typer(no_args_is_help=True, help="Maintenance mode: evacuate a host, and bring it back.")


@maintenance_app.command("enter")
def maintenance_enter(host: str,
                      dry_run: bool = typer.Option(False, "--dry-run", help="Only print the plan."),
                      json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Evacuate HOST: its running VMs migrate away (in the plan's order), powered-off ones are re-homed;
    it stays "entering maintenance" until no VM runs there, and takes no new VMs."""
    with centerops.client() as center:
        answer = center.call(ops.enter_maintenance(host, MaintenanceRequest(dry_run=dry_run)))
    _print_plan(answer, json_out, "dry run, nothing changed" if dry_run else f"{len(answer.tasks)} migration(s) queued")


@maintenance_app.command("exit")
def maintenance_exit(host: str,
                     move_back: bool = typer.Option(False, "--move-back", help="The VMs it held go back, if they fit."),
                     dry_run: bool = typer.Option(False, "--dry-run", help="Only print the plan."),
                     json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """HOST takes VMs again; with --move-back the VMs it held when it entered maintenance return."""
    with centerops.client() as center:
        answer = center.call(ops.exit_maintenance(host, MaintenanceExit(move_back=move_back, dry_run=dry_run)))
    _print_plan(answer, json_out, "dry run, nothing changed" if dry_run else f"{len(answer.tasks)} migration(s) queued")


# ---- host health ----
class _ShowByDefault(TyperGroup):
    """`host health HOST` is `host health show HOST`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["show", *args]
        return super().parse_args(ctx, args)


health_app = typer.Typer(cls=_ShowByDefault, no_args_is_help=True,
                         help="Host health: what each provider says; report a component's state.")


def _print_health(h: HostHealth, json_out: bool) -> None:
    if json_out:
        print(h.model_dump_json(indent=2))
        return
    state = " (quarantined: new VMs only when no other host can take them)" if h.quarantined else ""
    console.print(f"{h.host}: {h.severity.value}{state}")
    if h.entries:
        t = Table("provider", "component", "severity", "reason", "since")
        for e in h.entries:
            t.add_row(e.provider, e.component, e.severity.value, e.reason, when(e.at))
        console.print(t)


@health_app.command("show")
def health_show(host: str, json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """What each health provider says of HOST."""
    with centerops.client() as center:
        _print_health(center.call(ops.health(host)), json_out)


@health_app.command("report")
def health_report(host: str,
                  severity: Severity = typer.Option(..., "--severity", help="ok clears it; moderate quarantines the "
                                                    "host; severe evacuates it."),
                  component: str = typer.Option(..., "--component", help="e.g. psu, fan, disk, nic."),
                  reason: str = typer.Option("", "--reason", help="One line for the event log."),
                  provider: str = typer.Option("external", "--provider", help="Who says so."),
                  json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Report a component of HOST as ok, moderate or severe (a vendor plug-in's word)."""
    report = HealthReport(provider=provider, component=component, severity=severity, reason=reason)
    with centerops.client() as center:
        _print_health(center.call(ops.report_health(host, report)), json_out)


# ---- DRS ----
drs_app = typer.Typer(no_args_is_help=True, help="DRS: keep the cluster's load balanced by migrating VMs.")


@drs_app.command("config")
def drs_config(automation: Automation | None = typer.Option(None, "--automation", help="manual: recommend only (vm "
                                                            "create needs --host); partial (default): also place new "
                                                            "VMs; full: also apply moves."),
               threshold: int | None = typer.Option(None, "--threshold", min=1, max=5,
                                                    help="1: mandatory moves only ... 5: the most aggressive."),
               interval: float | None = typer.Option(None, "--interval", help="Seconds between full automation's passes."),
               json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show DRS's configuration, or change what is given."""
    with centerops.client() as center:
        config = center.call(ops.drs()).config
        changes = {k: v for k, v in (("automation", automation), ("threshold", threshold), ("interval", interval))
                   if v is not None}
        if changes:
            config = center.call(ops.configure_drs(DrsConfig.model_validate({**config.model_dump(), **changes})))
    if json_out:
        print(config.model_dump_json(indent=2))
    else:
        console.print(f"DRS: automation {config.automation.value}, threshold {config.threshold}, "
                      f"every {config.interval:g} s")


@drs_app.command("recommend")
def drs_recommend(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The moves DRS recommends now, each with its gain, cost and why."""
    with centerops.client() as center:
        status = center.call(ops.drs())
    if json_out:
        print(status.model_dump_json(indent=2))
        return
    loads = ", ".join(f"{h} {load:.2f}" for h, load in status.loads)
    tolerated = "any: mandatory moves only" if status.target is None else f"{status.target:.3f}"
    console.print(f"imbalance {status.imbalance:.3f} (tolerated {tolerated}); load: {loads}")
    for note in status.notes:
        console.print(f"[yellow]note[/]: {note}")
    if not status.recommendations:
        console.print("no recommendation")
        return
    t = Table("id", "VM", "from", "to", "gain", "cost", "why")
    for r in status.recommendations:
        t.add_row(r.id, r.move.vm, r.move.source, r.move.destination, f"{r.gain:.1f}", f"{r.cost:.1f} s",
                  ("[bold]mandatory[/]: " if r.mandatory else "") + r.why)
    console.print(t)


@drs_app.command("apply")
def drs_apply(ids: list[str] = typer.Argument(None, help="Recommendation ids (from `drs recommend`)."),
              all_: bool = typer.Option(False, "--all", help="Every current recommendation."),
              json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Queue the migrations of the named recommendations (or of all of them)."""
    request = DrsApply(ids=tuple(ids or ()), all=all_)
    with centerops.client() as center:
        applied = center.call(ops.apply_drs(request))
    if json_out:
        print(applied.model_dump_json(indent=2))
        return
    for task in applied.tasks:
        console.print(f"task {task.id}: migrate {task.target} {task.source} -> {task.destination} ({task.why})")
    for why in applied.skipped:
        console.print(f"[yellow]skipped[/] {why}")


# ---- rules ----
rule_app = typer.Typer(no_args_is_help=True, help="Placement rules: keep VMs together, apart, or on a host.")
rule_add_app = typer.Typer(no_args_is_help=True, help="Add a rule: keep-together, keep-apart or vm-host.")
rule_app.add_typer(rule_add_app, name="add")


def _add(name: str | None, kind: RuleKind, vms: list[str], host: str | None, must: bool, should: bool) -> None:
    if must and should:
        raise typer.BadParameter("--must or --should, not both")
    rule = RuleSpec(name=name or f"{kind.value}-{'-'.join(vms)}"[:63], kind=kind, vms=tuple(vms), host=host,
                    strength=Strength.SHOULD if should else Strength.MUST)
    with centerops.client() as center:
        view = center.call(ops.add_rule(rule))
    broken = f"; violated now: {'; '.join(view.violations)}" if view.violations else ""
    console.print(f"rule {rule.name}: {kind.value} {', '.join(vms)}{' on ' + host if host else ''} "
                  f"({rule.strength.value}){broken}")


_NAME = typer.Option(None, "--name", help="The rule's name (default: from its kind and VMs).")
_MUST = typer.Option(False, "--must", help="Never broken by a move (the default).")
_SHOULD = typer.Option(False, "--should", help="Kept when DRS can.")


@rule_add_app.command("keep-together")
def rule_together(vms: list[str] = typer.Argument(..., help="Two VMs or more."), name: str | None = _NAME,
                  must: bool = _MUST, should: bool = _SHOULD) -> None:
    """The VMs run on one host."""
    _add(name, RuleKind.KEEP_TOGETHER, vms, None, must, should)


@rule_add_app.command("keep-apart")
def rule_apart(vms: list[str] = typer.Argument(..., help="Two VMs or more."), name: str | None = _NAME,
               must: bool = _MUST, should: bool = _SHOULD) -> None:
    """Each VM on a host of its own."""
    _add(name, RuleKind.KEEP_APART, vms, None, must, should)


@rule_add_app.command("vm-host")
def rule_vm_host(vm: str, host: str, name: str | None = _NAME, must: bool = _MUST, should: bool = _SHOULD) -> None:
    """VM runs on HOST."""
    _add(name, RuleKind.VM_HOST, [vm], host, must, should)


@rule_app.command("ls")
def rule_ls(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Rules, and what breaks them now."""
    with centerops.client() as center:
        rules = center.call(ops.rules())
    if json_out:
        print("[" + ",".join(r.model_dump_json() for r in rules) + "]")
        return
    t = Table("name", "kind", "VMs", "host", "strength", "violations")
    for r in rules:
        t.add_row(r.rule.name, r.rule.kind.value, ", ".join(r.rule.vms), r.rule.host or "-", r.rule.strength.value,
                  "; ".join(r.violations) or "none")
    console.print(t)


@rule_app.command("rm")
def rule_rm(name: str) -> None:
    """Remove a rule."""
    with centerops.client() as center:
        center.call(ops.remove_rule(name))
    console.print(f"rule {name} removed")
