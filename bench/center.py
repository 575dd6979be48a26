#!/usr/bin/env python3
"""The center under a cluster's load: 50 hosts, 5,000 VMs, heartbeats, `vm ls`, task submissions.

    .venv/bin/python bench/center.py [--hosts 50] [--vms 5000] [--phase 15] [--rate 100] [--out FILE]

The real center (`kvmotion.center.serve`: TLS, the SQLite store, the heartbeat controller and the
dispatcher) runs in its own process, so its CPU time (utime + stime from /proc, over wall time) is
its own. This process plays the rest over TLS with certificates of the center's CA: the hosts'
heartbeats (host:NAME each), a user (admin), and the agents (one in-process fake answering the
agent API the dispatcher calls: facts, POST /v1/migrations, GET /v1/migrations/ID; a migration
there ends `--migration-time` after it starts). No QEMU, no lab: no lock needed.

Phases, each --phase seconds: idle (the baseline: the center with nothing to do but its loops),
heartbeats (every host every 2 s as the agent beats: small `Alive` beats, a full report of its VMs
and their load every 20 s; measured over whole report intervals), then `vm ls` latency
(GET /v1/vms, all VMs, sequential, the answer's bytes read; and decoded into models, as the CLI
does, apart) with the heartbeats going on, GET /v1/settings beside it as the baseline of a request
that does no work, then migrate submissions at --rate per second (POST
/v1/migrations, placement choosing the destination) with the heartbeats going on. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn
from fastapi import FastAPI, Request

from kvmotion.api.agent import VmState, VmStatus
from kvmotion.api.center import (
    AsyncCenterClient,
    ClusterSettings,
    Heartbeat,
    HostFacts,
    HostState,
    MigrateRequest,
    ObservedState,
    PowerState,
    TaskKind,
    TaskState,
    TaskView,
)
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.pki import issue_cert
from kvmotion.api.spec import DiskSpec, NicSpec, VmSpec
from kvmotion.api.tls import client_context
from kvmotion.center.serve import Listen, prepare
from kvmotion.center.store import HostRow, SqliteStore, VmRow
from kvmotion.core.errors import KvmotionError
from kvmotion.host.heartbeat import Cadence, LoadSampler, beat, build_heartbeat, vm_reports
from kvmotion.host.resources import MemInfo
from kvmotion.host.schedstat import SchedStat

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
TARGETS = {"vm_ls_p99_ms": 100.0, "heartbeat_cpu_share": 0.05}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- setup: the data folder, hosts and VMs written before the center starts --------------------------------------
def setup(data: Path, port: int, agent_port: int, hosts: int, vms: int) -> list[str]:
    prepare(data, Listen("127.0.0.1", port), insecure=False, password_cost=10).center.store.close()
    store = SqliteStore(data / "center.db")
    names = [f"host-{i:02d}" for i in range(hosts)]
    facts = HostFacts(accel="tcg", cpu_models=("qemu64",), portgroups=("vm-net",), datastores=("ds1",),
                      updated=time.time() + 86400)  # not refreshed during the run
    now = time.time()
    for name in names:
        store.join("none", lambda _t: None, HostRow(name=name, address="127.0.0.1",
                                                    agent_url=f"https://127.0.0.1:{agent_port}",
                                                    state=HostState.NOT_RESPONDING, joined=now), "bench")
        store.set_host_facts(name, facts)
    for i in range(vms):
        host = names[i % hosts]
        spec = VmSpec(name=f"vm-{i:05d}", memory=256 << 20, disks=(DiskSpec(datastore="ds1", source=f"vm-{i:05d}.img"),),
                      nics=(NicSpec(mac=f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                                    portgroup="vm-net"),))
        task = TaskView(id=secrets.token_hex(8), kind=TaskKind.CREATE, target=spec.name, state=TaskState.QUEUED,
                        created=now, requested_by="bench")
        # Unknown on its host, as after a restart of the center: no drift for the reconcile pass to
        # report (5,000 events) while the idle baseline is measured.
        store.create_vm(VmRow(name=spec.name, observed_state=ObservedState.UNKNOWN, observed_host=host, updated=now,
                              spec=spec.dumps(), desired_host=host, desired_power=PowerState.ON), task, "bench")
        store.end_task(task.id, TaskState.DONE, now)
    store.close()
    return names


def issue(data: Path, who: Identity, ips: tuple[str, ...] = (), server: bool = False) -> Path:
    out = data.parent / "creds" / f"{who.kind.value}-{who.name}"
    issue_cert(data / "ca", who, ips, out, server=server)
    return out


# ---- the fake agents ------------------------------------------------------------------------------------------
def agents_app(duration: float) -> FastAPI:
    """The agent API the dispatcher calls, answered from memory for every host (they share one URL)."""
    app = FastAPI()
    records: dict[str, dict[str, Any]] = {}

    def record(mid: str) -> dict[str, Any]:
        rec = records[mid]
        if rec["phase"] != "done" and time.time() - rec["started_at"] >= duration:
            rec.update(phase="done", ended_at=time.time(),
                       summary={"total_ms": duration * 1000, "downtime_ms": 30.0, "pause_ms": 35.0, "setup_ms": 1.0,
                                "rounds": 2, "bytes": 1 << 28, "zero_pages": 0, "normal_pages": 65536,
                                "mean_link_rate": 1.2e8, "peak_dirty_rate": 0.0, "throttle_max": 0.0,
                                "encrypted": True, "converged": True, "postcopy": False})
        elif rec["phase"] == "check":
            rec["phase"] = "precopy"
        return rec

    @app.get("/v1/migration/facts")
    def facts() -> dict[str, Any]:
        return {"accel": "tcg", "portgroups": ["vm-net"], "datastores": ["ds1"], "cpu_unavailable": {"qemu64": []}}

    @app.post("/v1/migrations", status_code=201)
    async def start(request: Request) -> dict[str, Any]:
        body = await request.json()
        mid = secrets.token_hex(6)
        records[mid] = {"id": mid, "vm": body["vm"], "source": "?", "destination": body["destination"],
                        "options": body["options"] | {"allow_postcopy": False}, "phase": "check",
                        "started_at": time.time()}
        return records[mid]

    @app.get("/v1/migrations/{mid}")
    def get(mid: str) -> dict[str, Any]:
        return record(mid)

    @app.get("/v1/migrations")
    def history() -> list[dict[str, Any]]:
        return [record(m) for m in records]

    return app


# ---- load -------------------------------------------------------------------------------------------------------
class Beats:
    """Every host's heartbeat every `interval` seconds, spread over the interval, as the agent sends
    them (kvmotion.host.heartbeat.beat: `Alive`, and the full report when due, its per-VM CPU
    demand and ready time from the agent's own LoadSampler over counters that grow like /proc's:
    each vCPU thread runs 1 % of a core and waits 0.1 %)."""

    def __init__(self, clients: dict[str, AsyncCenterClient], vms: dict[str, list[str]], interval: float,
                 report_interval: float) -> None:
        self.clients, self.interval, self.report_interval = clients, interval, report_interval
        self.sent = 0
        self.full = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.started = time.monotonic()
        self.status = {h: [VmStatus(name=vm, state=VmState.RUNNING, host=h, memory=256 << 20, vcpus=1, pid=1000 + i,
                                    started_at=0.0, ready=True, spec=VmSpec(name=vm, memory=256 << 20))
                           for i, vm in enumerate(names)] for h, names in vms.items()}
        self.samplers = {h: LoadSampler(read=self.schedstat, rss=lambda _pid: 256 << 20) for h in vms}
        self.cadences = {h: Cadence() for h in vms}

    def schedstat(self, pid: int) -> dict[int, SchedStat]:
        busy = time.monotonic() - self.started
        return {pid: SchedStat(run_ns=int(busy * 1e7), wait_ns=int(busy * 1e6), slices=int(busy * 100))}

    async def one(self, host: str) -> bool:
        vms = self.status[host]
        reports = vm_reports(vms)

        async def full() -> Heartbeat:
            sampler = self.samplers[host]
            memory = MemInfo(total=256 * GIB, available=200 * GIB)
            return build_heartbeat(reports, sampler.loads(sampler.observe(vms)), memory, 32, ())

        _, was_full = await beat(self.clients[host], host, self.cadences[host], reports, (), full,
                                 self.report_interval, time.monotonic())
        return was_full

    async def host(self, name: str, offset: float, stop: asyncio.Event) -> None:
        await asyncio.sleep(offset)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                self.full += await self.one(name)
                self.sent += 1
                self.latencies.append(time.perf_counter() - t0)
            except KvmotionError:
                self.errors += 1
            await asyncio.sleep(max(0.0, self.interval - (time.perf_counter() - t0)))

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            for i, name in enumerate(self.clients):
                group.create_task(self.host(name, i * self.interval / len(self.clients), stop))


async def measure_cpu(pid: int, seconds: float) -> dict[str, float]:
    """The center's CPU share over `seconds`, and this process's (the simulated hosts and users) beside it."""
    c0, b0, t0 = cpu_seconds(pid), time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    c1, b1, t1 = cpu_seconds(pid), time.process_time(), time.monotonic()
    return {"cpu_s": round(c1 - c0, 3), "wall_s": round(t1 - t0, 3), "share": round((c1 - c0) / (t1 - t0), 4),
            "bench_share": round((b1 - b0) / (t1 - t0), 4)}


async def raw_get(client: AsyncCenterClient, path: str) -> bytes:
    response = await client._http.get(path)  # the bytes, not decoded: what the center costs
    response.raise_for_status()
    return response.content


async def latencies(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def summary_ms(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(statistics.median(values), 2), "p99_ms": round(pct(values, 0.99), 2),
            "max_ms": round(max(values), 2)}


async def submissions(admin: AsyncCenterClient, vms: list[str], rate: float, seconds: float) -> dict[str, Any]:
    """POST /v1/migrations at `rate` per second (open loop: each on its own schedule)."""
    lat: list[float] = []
    refused: dict[str, int] = {}
    todo = iter(vms)

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            await admin.migrate(MigrateRequest(vm=next(todo)))
            lat.append((time.perf_counter() - t0) * 1000)
        except KvmotionError as exc:
            refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1

    start = time.perf_counter()
    n = int(rate * seconds)
    async with asyncio.TaskGroup() as group:
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            group.create_task(one())
    took = time.perf_counter() - start
    return {"submitted": n, "accepted": len(lat), "refused": refused, "seconds": round(took, 2),
            "achieved_per_s": round(len(lat) / took, 1), **(summary_ms(lat) if lat else {})}


def start_center(root: Path, data: Path, port: int) -> subprocess.Popen[bytes]:
    """`kvmotion center serve` on loopback, in its own process (its log in root/center.log)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = (f"from pathlib import Path; from kvmotion.center.serve import serve; "
            f"serve('127.0.0.1:{port}', Path({str(data)!r}), False)")
    with open(root / "center.log", "w") as log:
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=log)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kvbench-center-"))
    data = root / "data"
    port, agent_port = free_port(), free_port()
    t0 = time.perf_counter()
    names = await asyncio.to_thread(setup, data, port, agent_port, args.hosts, args.vms)
    setup_s = time.perf_counter() - t0
    print(f"set up {args.hosts} hosts and {args.vms} VMs in {setup_s:.0f} s", file=sys.stderr)
    admin_dir = issue(data, Identity(Kind.USER, "admin", Role.ADMIN))
    agent_dir = issue(data, Identity(Kind.HOST, "agents"), ("127.0.0.1",), server=True)
    host_dirs = {n: issue(data, Identity(Kind.HOST, n)) for n in names}

    config = uvicorn.Config(agents_app(args.migration_time), host="127.0.0.1", port=agent_port, log_level="warning",
                            ssl_certfile=str(agent_dir / "server-cert.pem"), ssl_keyfile=str(agent_dir / "server-key.pem"))
    agents = uvicorn.Server(config)
    center = await asyncio.to_thread(start_center, root, data, port)
    url = f"https://127.0.0.1:{port}"
    # The center allows 32 connections per client address: each host from its own loopback address.
    admin = AsyncCenterClient(url, client_context(admin_dir), timeout=60, max_connections=16)
    clients = {n: AsyncCenterClient(url, client_context(d), timeout=30, local_address=f"127.0.1.{i + 1}",
                                    max_connections=2) for i, (n, d) in enumerate(host_dirs.items())}
    vms_of = {n: [f"vm-{i:05d}" for i in range(j, args.vms, args.hosts)] for j, n in enumerate(names)}
    result: dict[str, Any] = {"hosts": args.hosts, "vms": args.vms, "phase_s": args.phase, "setup_s": round(setup_s, 1),
                              "cores": os.cpu_count(), "load_average_before": os.getloadavg()[0]}
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(agents.serve())
            async with asyncio.timeout(60):
                while True:
                    try:
                        await admin.settings()
                        break
                    except KvmotionError:
                        await asyncio.sleep(0.2)
            await asyncio.sleep(2)  # start-up work settles
            result["idle"] = await measure_cpu(center.pid, args.phase)
            stop = asyncio.Event()
            settings = ClusterSettings()  # the center's defaults (this bench changes none)
            beats = Beats(clients, vms_of, settings.heartbeat_interval, settings.report_interval)
            beat_task = group.create_task(beats.run(stop))
            await asyncio.sleep(4)  # the first beats insert every VM's observation: not the steady state
            sent0, full0 = beats.sent, beats.full
            # Whole report intervals: each host's full report falls once in every one of them.
            window = math.ceil(args.phase / settings.report_interval) * settings.report_interval
            result["heartbeats"] = await measure_cpu(center.pid, window)
            result["heartbeats"]["beats_per_s"] = round((beats.sent - sent0) / result["heartbeats"]["wall_s"], 1)
            result["heartbeats"]["full_reports"] = beats.full - full0
            result["heartbeats"]["errors"] = beats.errors
            result["heartbeats"]["latency"] = summary_ms([x * 1000 for x in beats.latencies[sent0:]])
            result["heartbeat_cpu_share"] = round(result["heartbeats"]["share"] - result["idle"]["share"], 4)
            result["settings_latency"] = summary_ms(await latencies(admin.settings, 100))
            # The center's side: the whole answer received; the client's decoding into models apart.
            result["vm_ls"] = summary_ms(await latencies(lambda: raw_get(admin, "/v1/vms"), args.vm_ls))
            result["vm_ls"]["bytes"] = len(await raw_get(admin, "/v1/vms"))
            result["vm_ls_decoded"] = summary_ms(await latencies(admin.vms, max(args.vm_ls // 5, 1)))
            assert len(await admin.vms()) == args.vms
            cpu = asyncio.create_task(measure_cpu(center.pid, args.phase))
            result["submissions"] = await submissions(admin, sorted(v for vs in vms_of.values() for v in vs),
                                                      args.rate, args.phase)
            result["submissions"]["center_cpu"] = await cpu
            await asyncio.sleep(2)
            tasks = await admin.tasks(limit=1000)
            states: dict[str, int] = {}
            for t in tasks:
                if t.kind is TaskKind.MIGRATE:
                    states[t.state.value] = states.get(t.state.value, 0) + 1
            result["submissions"]["task_states_after_2s"] = states
            stop.set()
            await beat_task
            # Idle keep-alive TLS connections hold a stopping uvicorn up to asyncio's 30 s SSL shutdown
            # timeout (the peer never answers close_notify): close them first.
            await admin.aclose()
            for c in clients.values():
                await c.aclose()
            t_stop = time.perf_counter()
            center.terminate()  # SIGTERM: uvicorn's graceful shutdown, the controllers stopped
            await asyncio.to_thread(center.wait, 60)
            result["center_stop_s"] = round(time.perf_counter() - t_stop, 2)
            agents.should_exit = True
    finally:
        if center.poll() is None:
            center.kill()
            center.wait()
        await admin.aclose()
        for c in clients.values():
            await c.aclose()
    result["targets"] = TARGETS
    result["met"] = {"vm_ls_p99": result["vm_ls"]["p99_ms"] < TARGETS["vm_ls_p99_ms"],
                     "heartbeat_cpu": result["heartbeat_cpu_share"] < TARGETS["heartbeat_cpu_share"]}
    result["load_average_after"] = os.getloadavg()[0]
    await asyncio.to_thread(shutil.rmtree, root, True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=50)
    p.add_argument("--vms", type=int, default=5000)
    p.add_argument("--phase", type=float, default=15.0, help="seconds of each measured phase")
    p.add_argument("--rate", type=float, default=100.0, help="migrate submissions per second")
    p.add_argument("--vm-ls", type=int, default=100, help="how many `vm ls` calls to time")
    p.add_argument("--migration-time", type=float, default=1.0, help="seconds a fake migration takes")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    if args.vms < args.rate * args.phase:
        p.error("--vms must cover --rate x --phase submissions (each VM migrates once)")
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
