#!/usr/bin/env python3
"""DRS on generated clusters: plan time and quality against a ProxLB-style greedy and a solver's optimum.

    .venv/bin/python bench/drs.py [--seeds 3] [--threshold 3 --threshold 5] [--solver-seconds 60] [--out FILE]

Clusters from 4 hosts x 20 VMs to 64 hosts x 2,000 VMs (kvmotion.center.drs.recommend, pure, no I/O:
no lab, no lock). Each generated cluster is skewed: VMs land on hosts with a bias towards the first
ones, memory never overcommitted. Per size, seed and threshold: DRS's plan time (best of --repeat
calls), its moves, bytes they send (the default cost model) and the imbalance after; the same for a
ProxLB-style greedy (move the VM with the most load from the most to the least loaded host that
takes it, while that lowers the imbalance, until it is under the same tolerance).

On instances small enough for OR-Tools CP-SAT to prove optimal (identical hosts; "status" says
whether it did within --solver-seconds): the fewest moves that bring the imbalance under each
threshold's tolerance (against DRS's and the greedy's moves), and the least imbalance any placement
reaches (against DRS at threshold 5, which stops once under its tolerance, 0.02, by design).
Ratios are DRS (or greedy) / other.
Needs the `bench` extra (ortools); without it the solver part is skipped and says so. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmotion.api.center import HostState
from kvmotion.center.cluster import (
    EVEN,
    GIB,
    Host,
    Snapshot,
    Vm,
    apply,
    default_cost,
    imbalance,
    loads,
    overcommitted,
)
from kvmotion.center.drs import TOLERANCE, DrsConfig, recommend

SIZES = ((4, 20), (8, 100), (16, 300), (32, 1000), (64, 2000))
TARGETS = {"plan_s_at_64x2000": 1.0}
SCALE = 10_000  # loads as integers for the solver


def generate(hosts: int, vms: int, seed: int, uniform: bool = False) -> Snapshot:
    """A skewed cluster: host i draws VMs with weight 1/(1 + i/4); memory fills about 55 %."""
    rnd = random.Random(seed)
    hs = []
    for i in range(hosts):
        size = 1 if uniform else rnd.choice((1, 2, 2, 4))
        hs.append(Host(f"host-{i:02d}", HostState.CONNECTED, cpus=16.0 * size, memory=64 * GIB * size))
    # VM memory sized so the VMs take about 55 % of the cluster's memory.
    budget = 0.55 * sum(h.memory for h in hs) / vms
    sizes = [s for s in (GIB // 2, GIB, 2 * GIB, 4 * GIB, 8 * GIB, 16 * GIB) if s <= 2 * budget] or [GIB // 2]
    free = [h.memory for h in hs]
    weights = [1 / (1 + i / 4) for i in range(hosts)]
    out = []
    for j in range(vms):
        memory = rnd.choice(sizes)
        vcpus = rnd.choice((1, 2, 2, 4, 4, 8))
        demand = round(vcpus * rnd.betavariate(2, 3), 3)
        at = rnd.choices(range(hosts), weights)[0]
        for k in range(hosts):
            if free[(at + k) % hosts] >= memory:
                at = (at + k) % hosts
                break
        else:
            continue
        free[at] -= memory
        out.append(Vm(f"vm-{j:04d}", hs[at].name, memory=memory, vcpus=vcpus, cpu_demand=demand,
                      dirty_rate=rnd.choice((0.0, 1e6, 1e7, 5e7))))
    return Snapshot(hosts=tuple(hs), vms=tuple(out), now=1e6)


def greedy(snapshot: Snapshot, tolerance: float) -> tuple[Snapshot, int, int]:
    """ProxLB-style: from the most loaded host to the least loaded one, the VM with the most load first
    (the next one if it does not fit or would not lower the imbalance), until the imbalance is under
    `tolerance` or no such move is left. Returns the cluster after, moves, bytes sent."""
    where = {v.name: v.host for v in snapshot.vms}
    moved: set[str] = set()
    cpu = {h.name: 0.0 for h in snapshot.hosts}
    mem = {h.name: 0 for h in snapshot.hosts}
    for v in snapshot.vms:
        cpu[v.host] += v.cpu_demand
        mem[v.host] += v.memory
    hosts = snapshot.host

    def load(h: str) -> float:
        return EVEN.cpu * cpu[h] / hosts[h].cpus + EVEN.memory * mem[h] / hosts[h].memory

    moves = sent = 0
    while True:
        values = {h: load(h) for h in hosts}
        imb = statistics.pstdev(values.values())
        if imb <= tolerance:
            break
        src = max(values, key=lambda h: (values[h], h))
        dst = min(values, key=lambda h: (values[h], h))
        mine = sorted((v for v in snapshot.vms if where[v.name] == src and v.name not in moved),
                      key=lambda v: -(EVEN.cpu * v.cpu_demand / hosts[src].cpus + EVEN.memory * v.memory / hosts[src].memory))
        chosen = None
        for v in mine:
            if mem[dst] + v.memory > hosts[dst].memory:
                continue
            a = values[src] - (EVEN.cpu * v.cpu_demand / hosts[src].cpus + EVEN.memory * v.memory / hosts[src].memory)
            b = values[dst] + (EVEN.cpu * v.cpu_demand / hosts[dst].cpus + EVEN.memory * v.memory / hosts[dst].memory)
            if statistics.pstdev({**values, src: a, dst: b}.values()) < imb:
                chosen = v
                break
        if chosen is None:
            break
        where[chosen.name] = dst
        moved.add(chosen.name)
        cpu[src] -= chosen.cpu_demand
        cpu[dst] += chosen.cpu_demand
        mem[src] -= chosen.memory
        mem[dst] += chosen.memory
        moves += 1
        sent += default_cost(chosen, hosts[src], hosts[dst], snapshot.link_rate).bytes
    after = replace(snapshot, vms=tuple(replace(v, host=where[v.name]) for v in snapshot.vms))
    return after, moves, sent


def solve(snapshot: Snapshot, tolerance: float | None, seconds: float) -> dict[str, Any]:
    """CP-SAT on identical hosts: with `tolerance`, the fewest moves that bring the imbalance under it;
    without, the least imbalance reachable (any number of moves)."""
    from ortools.sat.python import cp_model

    hosts = [h.name for h in snapshot.hosts]
    h0 = snapshot.hosts[0]
    n = len(hosts)
    size = [round(SCALE * (EVEN.cpu * v.cpu_demand / h0.cpus + EVEN.memory * v.memory / h0.memory)) for v in snapshot.vms]
    total = sum(size)
    m = cp_model.CpModel()
    x = {(i, k): m.NewBoolVar(f"x{i}_{k}") for i in range(len(snapshot.vms)) for k in range(n)}
    for i in range(len(snapshot.vms)):
        m.AddExactlyOne(x[i, k] for k in range(n))
    squares = []
    for k in range(n):
        m.Add(sum(snapshot.vms[i].memory // (1 << 20) * x[i, k] for i in range(len(snapshot.vms)))
              <= h0.memory // (1 << 20))
        load = m.NewIntVar(0, total, f"l{k}")
        m.Add(load == sum(size[i] * x[i, k] for i in range(len(snapshot.vms))))
        sq = m.NewIntVar(0, total * total, f"s{k}")
        m.AddMultiplicationEquality(sq, [load, load])
        squares.append(sq)
    stay = [x[i, hosts.index(v.host)] for i, v in enumerate(snapshot.vms)]
    if tolerance is None:
        m.Minimize(sum(squares))
    else:
        # pstdev <= tol  <=>  n * sum(L^2) <= n^2 tol^2 + (sum L)^2, in scaled units.
        m.Add(n * sum(squares) <= math.floor(n * n * (tolerance * SCALE) ** 2 + total * total))
        m.Minimize(len(stay) - sum(stay))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = seconds
    solver.parameters.num_workers = 1
    t = time.perf_counter()
    status = solver.Solve(m)
    out: dict[str, Any] = {"status": solver.StatusName(status), "solve_s": round(time.perf_counter() - t, 2)}
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        where = {v.name: hosts[next(k for k in range(n) if solver.Value(x[i, k]))] for i, v in enumerate(snapshot.vms)}
        after = replace(snapshot, vms=tuple(replace(v, host=where[v.name]) for v in snapshot.vms))
        out["imbalance_after"] = round(imbalance(after), 5)
        out["moves"] = sum(1 for v in snapshot.vms if where[v.name] != v.host)
        out["bytes"] = sum(default_cost(v, snapshot.host[v.host], snapshot.host[where[v.name]], snapshot.link_rate).bytes
                           for v in snapshot.vms if where[v.name] != v.host)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else round(a / b, 3)


def run_drs(snapshot: Snapshot, threshold: int, repeat: int) -> dict[str, Any]:
    config = DrsConfig(threshold=threshold)
    times = []
    plan = None
    for _ in range(repeat):
        t = time.perf_counter()
        plan = recommend(snapshot, config)
        times.append(time.perf_counter() - t)
    assert plan is not None
    after = apply(snapshot, plan.moves)
    assert not overcommitted(after)
    return {"plan_s": round(min(times), 4), "moves": len(plan.moves), "bytes": plan.bytes,
            "imbalance_after": round(plan.imbalance_after, 5), "predicted_s": round(plan.seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threshold", type=int, action="append", choices=sorted(TOLERANCE)[1:])
    p.add_argument("--repeat", type=int, default=3, help="DRS plans per cluster (the fastest counts)")
    p.add_argument("--solver-seconds", type=float, default=60.0, help="CP-SAT limit per instance")
    p.add_argument("--solver-sizes", default="4x20,8x50,8x100,16x100",
                   help="HOSTSxVMS of the instances for the fewest moves to each threshold (solver)")
    p.add_argument("--least-sizes", default="4x12,4x16,4x20", help="HOSTSxVMS for the least imbalance (solver)")
    p.add_argument("--max-size", type=int, default=len(SIZES), help="only the first N sizes")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    thresholds = args.threshold or [3, 5]
    result: dict[str, Any] = {"thresholds": {t: TOLERANCE[t] for t in thresholds}, "sizes": [], "least_imbalance": [], "fewest_moves": [],
                              "targets": TARGETS, "load_average_before": os.getloadavg()[0]}
    for hosts, vms in SIZES[:args.max_size]:
        for seed in range(args.seeds):
            s = generate(hosts, vms, seed)
            row: dict[str, Any] = {"hosts": hosts, "vms": len(s.vms), "seed": seed,
                                   "imbalance_before": round(imbalance(s), 5),
                                   "max_cpu_load": round(max(x.cpu for x in loads(s).values()), 3)}
            for t in thresholds:
                d = run_drs(s, t, args.repeat)
                t0 = time.perf_counter()
                g_snap, gm, gb = greedy(s, TOLERANCE[t])
                g_time = time.perf_counter() - t0
                g_after = imbalance(g_snap)
                g = {"plan_s": round(g_time, 4), "moves": gm, "bytes": gb, "imbalance_after": round(g_after, 5)}
                row[f"t{t}"] = {"drs": d, "greedy": g,
                                "ratio_moves": ratio(d["moves"], g["moves"]), "ratio_bytes": ratio(d["bytes"], g["bytes"])}
            result["sizes"].append(row)
            print(json.dumps(row), file=sys.stderr)
    big = [r for r in result["sizes"] if (r["hosts"], r["vms"]) >= (64, 1900)]
    if big:
        worst = max(r[f"t{t}"]["drs"]["plan_s"] for r in big for t in thresholds)
        result["met"] = {"plan_s_at_64x2000": worst < TARGETS["plan_s_at_64x2000"]}
    try:
        import ortools  # noqa: F401
    except ImportError:
        result["fewest_moves"] = "skipped: ortools is not installed (pip install -c requirements.lock -e '.[bench]')"
    else:
        for spec in args.least_sizes.split(","):
            hosts, vms = (int(x) for x in spec.split("x"))
            for seed in range(args.seeds):
                s = generate(hosts, vms, 100 + seed, uniform=True)
                best = solve(s, None, args.solver_seconds)
                d5 = run_drs(s, 5, 1)
                row = {"hosts": hosts, "vms": len(s.vms), "seed": 100 + seed, "imbalance_before": round(imbalance(s), 5),
                       "solver": best, "drs_t5": d5,
                       "gap": None if "imbalance_after" not in best else round(d5["imbalance_after"] - best["imbalance_after"], 5)}
                result["least_imbalance"].append(row)
                print(json.dumps(row), file=sys.stderr)
        for spec in args.solver_sizes.split(","):
            hosts, vms = (int(x) for x in spec.split("x"))
            for seed in range(args.seeds):
                s = generate(hosts, vms, 100 + seed, uniform=True)
                row = {"hosts": hosts, "vms": len(s.vms), "seed": 100 + seed, "imbalance_before": round(imbalance(s), 5)}
                for t in thresholds:
                    fewest = solve(s, TOLERANCE[t], args.solver_seconds)
                    d = run_drs(s, t, 1)
                    g_after, gm, gb = greedy(s, TOLERANCE[t])
                    row[f"t{t}"] = {"solver": fewest, "drs": d,
                                    "greedy": {"moves": gm, "bytes": gb, "imbalance_after": round(imbalance(g_after), 5)},
                                    "ratio_moves_drs": ratio(d["moves"], fewest.get("moves")),
                                    "ratio_moves_greedy": ratio(gm, fewest.get("moves")),
                                    "ratio_bytes_drs": ratio(d["bytes"], fewest.get("bytes"))}
                result["fewest_moves"].append(row)
                print(json.dumps(row), file=sys.stderr)
    result["load_average_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
