"""The buddy ring on a real multi-node Ray cluster on this machine: what a put costs, what node
deaths lose, how fast runs resume elsewhere, and batch throughput on 1, 2 and 4 nodes.

    .venv/bin/python benchmarks/ring.py [--quick] [--sections puts,chaos,failover,throughput]

A run of some sections keeps the other sections' latest figures in the result file (each
section's provenance is under `sections_meta`).

- puts: a writer (this process, a Ray driver) puts checkpoints of 1 KiB to 10 MiB through
  `RingCheckpointStore` on a head and three worker nodes, for k = 0, 1, 2 (write quorum k+1);
  the local `SQLiteCheckpointStore` in the same run is the anchor. Bytes sent per checkpoint: the
  checkpoint's bytes times the k+1 replicas it must reach.
- chaos: three writer threads put continuously to 24 runs (k = 2, quorum 3) on a head and five
  workers while the main thread injects faults: at random moments it SIGKILLs one worker, or two
  at once (k of the k+1 replicas); the dead nodes' disks are deleted; fresh nodes join in their
  place and a repair pass runs. A history of every put is checked at the end: every acknowledged
  checkpoint must read back with its exact checksum. Goal: 0 lost over at least 200 kills, and 0
  with k simultaneous kills.
- failover: `pyagent run --ray` runs a batch of the example (replayed from one recorded run of
  the embedded model, each completion delayed as the model would be) while workers that run
  runs are killed; the time from a kill to each affected run's resumed span starting (trace
  store). Goal: p95 under 5 s. Every run must end as the straight run did, with no acknowledged
  checkpoint lost and no completed step repeated.
- throughput: the same batch (no kills) on 1, 2 and 4 worker nodes; all nodes share this
  machine's cores.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from pyagent.bench.provenance import provenance, write_result
from pyagent.cluster.connect import FAST_FAILURE_DETECTION
from pyagent.cluster.membership import RayMembership
from pyagent.resilience.checkpoint import CheckpointError
from pyagent.resilience.history import HistoryLog, check_history, read_history
from pyagent.resilience.repair import repair
from pyagent.resilience.ring_store import RingCheckpointStore
from pyagent.resilience.sqlite_store import SQLiteCheckpointStore

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "examples" / "bugfix"
PACKAGES = ("ray",)
SIZES = (1 << 10, 64 << 10, 1 << 20, 10 << 20)
TASK = (EXAMPLE / "task.txt").read_text().strip()


@contextmanager
def cluster(workers: int, cpus: int = 1, connect: bool = True) -> Iterator[Cluster]:
    """A head (no CPUs) and `workers` nodes on this machine, Ray noticing deaths in ~1 s."""
    made = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": FAST_FAILURE_DETECTION})
    for _ in range(workers):
        made.add_node(num_cpus=cpus)
    made.wait_for_nodes()
    if connect:
        ray.init(address=made.address, namespace="pyagent", log_to_driver=False,
                 logging_level="WARNING")
    try:
        yield made
    finally:
        if ray.is_initialized():
            ray.shutdown()
        made.shutdown()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def payload(size: int, rng: random.Random) -> dict[str, Any]:
    return {"blob": "".join(rng.choices(string.ascii_letters, k=size - 12))}


# --- puts -----------------------------------------------------------------------------------

def puts(quick: bool) -> list[dict[str, Any]]:
    counts = {1 << 10: 100, 64 << 10: 60, 1 << 20: 20, 10 << 20: 5}
    if quick:
        counts = {size: max(2, n // 5) for size, n in counts.items()}
    rng = random.Random(1)
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="ring-puts-"))
    with cluster(3):
        membership = RayMembership(str(folder / "ring"))
        membership.ensure_hosts()
        for size in SIZES:
            states = [payload(size, rng) for _ in range(min(counts[size], 5))]
            local = SQLiteCheckpointStore(folder / f"local-{size}.db")
            rows.append(_time_puts("sqlite (local)", None, size, counts[size], local, states))
            local.close()
            for k in (0, 1, 2):
                store = RingCheckpointStore(membership, k=k)
                rows.append(_time_puts(f"ring k={k}", k, size, counts[size], store, states))
                print(rows[-1], flush=True)
    shutil.rmtree(folder)
    return rows


def _time_puts(store_name: str, k: int | None, size: int, count: int, store: Any,
               states: list[dict[str, Any]]) -> dict[str, Any]:
    run = f"puts-{store_name.replace(' ', '')}-{size}"
    store.put(run, 0, states[0])  # first put claims the run
    times = []
    began = time.perf_counter()
    for seq in range(1, count + 1):
        start = time.perf_counter()
        store.put(run, seq, states[seq % len(states)])
        times.append(time.perf_counter() - start)
    wall = time.perf_counter() - began
    replicas = 1 if k is None else k + 1
    return {"store": store_name, "k": k, "size_bytes": size, "puts": count,
            "p50_ms": statistics.median(times) * 1e3, "p95_ms": percentile(times, 0.95) * 1e3,
            "puts_per_s": count / wall, "mib_per_s": count * size / wall / (1 << 20),
            "bytes_sent_per_put": size * replicas if k is not None else 0}


# --- chaos ----------------------------------------------------------------------------------

def chaos(kills_wanted: int) -> dict[str, Any]:
    rng = random.Random(7)
    folder = Path(tempfile.mkdtemp(prefix="ring-chaos-"))
    ring_dir = folder / "ring"
    history = HistoryLog(folder / "history.jsonl")
    stop = threading.Event()
    refused = Counter()

    def writer(index: int) -> None:
        store = RingCheckpointStore(RayMembership(str(ring_dir)), k=2, timeout_s=20.0,
                                    quorum_wait_s=20.0, history=history)
        seqs: Counter = Counter()
        local = random.Random(index)
        while not stop.is_set():
            run = f"chaos-{index}-{local.randrange(8)}"
            try:
                store.put(run, seqs[run], payload(local.choice((1 << 10, 16 << 10)), local))
                seqs[run] += 1
            except CheckpointError as exc:
                refused[type(exc).__name__] += 1
                seqs[run] += 1  # an unacknowledged put may still have landed: never reuse seq
            time.sleep(0.01)  # a busy fleet, not a tight loop starving the nodes' processes

    kills = simultaneous = 0
    began = time.monotonic()
    with cluster(5) as made:
        membership = RayMembership(str(ring_dir))
        membership.ensure_hosts()
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        while kills < kills_wanted:
            time.sleep(rng.uniform(0.0, 0.8))  # a random moment, puts in flight
            count = 2 if rng.random() < 0.25 else 1
            victims = rng.sample(list(made.worker_nodes), count)
            disks = [p for p in membership.call([v.node_id for v in victims], "where").values()
                     if isinstance(p, str)]
            for node in victims:
                made.remove_node(node, allow_graceful=False)
            kills += count
            simultaneous += count == 2
            for disk in disks:  # the dead nodes' disks are lost with them
                for path in Path(disk).parent.glob(Path(disk).name + "*"):
                    path.unlink(missing_ok=True)
            for _ in victims:
                made.add_node(num_cpus=1)
            membership.ensure_hosts()
            repair(membership, k=2, timeout_s=20.0)
            print(f"kills {kills}, acknowledged "
                  f"{sum(op['phase'] == 'ok' for op in read_history(history.path))}", flush=True)
        stop.set()
        for thread in threads:
            thread.join()
        membership.ensure_hosts()
        repair(membership, k=2, timeout_s=20.0)
        reader = RingCheckpointStore(RayMembership(str(ring_dir)), k=2)
        report = check_history(*chains(reader, read_history(history.path)))
    history.close()
    shutil.rmtree(folder)
    return {"kills": kills, "simultaneous_k_kills": simultaneous, "k": 2, "write_quorum": 3,
            "seconds": time.monotonic() - began, "acknowledged": report.acknowledged,
            "refused": report.failed, "indeterminate": report.indeterminate,
            "refused_by_kind": dict(refused), "lost": len(report.violations),
            "violations": report.violations[:20]}


def chains(store: RingCheckpointStore, operations: list[dict]) -> tuple[list[dict], Any]:
    """The operations and a reader for the checker that reads each run's chain once
    (`list`: for each seq, the checkpoint `get` returns), not one read per operation."""
    found = {run: {c.seq: c for c in store.list(run)} for run in {op["run"] for op in operations}}
    return operations, lambda run, seq: found[run].get(seq)


# --- failover and throughput ----------------------------------------------------------------

def record(folder: Path) -> Path:
    """One straight run of the example on the embedded model, recorded."""
    recording = folder / "recording.jsonl"
    workspace = folder / "workspace"
    shutil.copytree(EXAMPLE / "project", workspace)
    subprocess.run([sys.executable, "-m", "pyagent", "run", str(EXAMPLE / "manifest.yaml"),
                    "--task", TASK, "--workspace", str(workspace), "--data",
                    str(folder / "straight"), "--run-id", "straight", "--record",
                    str(recording)], check=False, timeout=1800)
    return recording


def batch(address: str, recording: Path, data: Path, runs: int, delay: float,
          history: Path | None = None) -> subprocess.Popen:
    tasks = data.parent / f"{data.name}-tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"r{i}", "task": TASK}) + "\n"
                             for i in range(runs)))
    extra = ["--history", str(history)] if history else []
    return subprocess.Popen(
        [sys.executable, "-m", "pyagent", "run", str(EXAMPLE / "manifest.yaml"), "--tasks",
         str(tasks), "--workspace", str(EXAMPLE / "project"), "--backend", "replay",
         "--recording", str(recording), "--replay-delay", str(delay), "--data", str(data),
         "--ray", address, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def failover(recording: Path, folder: Path, kills_wanted: int) -> dict[str, Any]:
    from pyagent.observe.traces import TraceStore

    rng = random.Random(3)
    data, history = folder / "failover", folder / "failover-history.jsonl"
    kills: list[float] = []
    with cluster(3, cpus=2, connect=False) as made:
        process = batch(made.address, recording, data, runs=8, delay=0.5, history=history)
        time.sleep(8)
        while len(kills) < kills_wanted and process.poll() is None:
            victim = rng.choice(list(made.worker_nodes))
            made.remove_node(victim, allow_graceful=False)
            kills.append(time.time())
            made.add_node(num_cpus=2)
            time.sleep(rng.uniform(4, 7))
        stdout, stderr = process.communicate(timeout=1800)
        ray.init(address=made.address, namespace="pyagent", log_to_driver=False,
                 logging_level="WARNING")
        reader = RingCheckpointStore(RayMembership(str((data / "ring").resolve())), k=1)
        report = check_history(read_history(history), reader.get)
        ray.shutdown()
    delays, repeated = [], 0
    with TraceStore(data / "traces.db") as traces:
        for run in traces.runs():
            spans = traces.spans(run.run_id)
            for span in spans:
                if span.kind == "run" and span.attributes.get("pyagent.resumed") and span.start:
                    before = [k for k in kills if k <= span.start]
                    if before:
                        delays.append(span.start - before[-1])
            steps = [(s.attributes["pyagent.step.id"], s.attributes["pyagent.loop.iteration"])
                     for s in spans if s.kind == "step" and s.status == "ok"]
            repeated += len(steps) - len(set(steps))
    return {"kills": len(kills), "resumes": len(delays), "exit_code": process.returncode,
            "failovers_reported": stderr.count("failover "),
            "resume_p50_s": statistics.median(delays) if delays else None,
            "resume_p95_s": percentile(delays, 0.95) if delays else None,
            "resume_max_s": max(delays) if delays else None,
            "acknowledged": report.acknowledged, "lost": len(report.violations),
            "repeated_steps": repeated, "outcomes": stdout.count("goal not met"),
            "stdout_tail": stdout[-1500:]}


def throughput(recording: Path, folder: Path, runs: int) -> list[dict[str, Any]]:
    rows = []
    for workers in (1, 2, 4):
        with cluster(workers, cpus=2, connect=False) as made:
            data = folder / f"throughput-{workers}"
            began = time.monotonic()
            process = batch(made.address, recording, data, runs=runs, delay=0.5)
            stdout, _ = process.communicate(timeout=1800)
            seconds = time.monotonic() - began
        rows.append({"workers": workers, "runs": runs, "seconds": seconds,
                     "runs_per_min": runs / seconds * 60, "exit_code": process.returncode,
                     "finished": stdout.count("goal not met") + stdout.count("succeeded")})
        print(rows[-1], flush=True)
    return rows


# --- report ---------------------------------------------------------------------------------

def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def size_label(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def table(result: dict[str, Any]) -> list[str]:
    lines = ["# Buddy ring on Ray", ""]
    if "puts" in result:
        anchor = {r["size_bytes"]: r for r in result["puts"] if r["k"] is None}
        lines += ["## Put latency and throughput (head + 3 workers on this machine)", ""]
        lines += markdown(
            ["store", "checkpoint", "p50 ms", "p95 ms", "puts/s", "MiB/s", "x local p50",
             "bytes sent per put"],
            [[r["store"], size_label(r["size_bytes"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}",
              f"{r['puts_per_s']:.1f}", f"{r['mib_per_s']:.1f}",
              f"{r['p50_ms'] / anchor[r['size_bytes']]['p50_ms']:.1f}",
              f"{r['bytes_sent_per_put']:,}" if r["k"] is not None else "0 (local disk)"]
             for r in result["puts"]])
    if "chaos" in result:
        c = result["chaos"]
        lines += ["## Random node kills with writers running (k=2, write quorum 3)", ""]
        lines += markdown(["node kills", "of them k at once", "acknowledged puts",
                           "refused (never claimed saved)", "indeterminate", "acknowledged lost"],
                          [[str(c["kills"]), f"{c['simultaneous_k_kills']} x 2",
                            str(c["acknowledged"]), str(c["refused"]), str(c["indeterminate"]),
                            str(c["lost"])]])
    if "failover" in result:
        f = result["failover"]
        lines += ["## Failover of runs whose node died (k=1)", ""]
        lines += markdown(["kills", "runs resumed", "resume p50 s", "resume p95 s", "max s",
                           "acknowledged lost", "completed steps repeated"],
                          [[str(f["kills"]), str(f["resumes"]), _num(f["resume_p50_s"]),
                            _num(f["resume_p95_s"]), _num(f["resume_max_s"]), str(f["lost"]),
                            str(f["repeated_steps"])]])
    if "throughput" in result:
        lines += ["## Batch throughput (all nodes share this machine's 2 cores)", ""]
        lines += markdown(["worker nodes", "runs", "seconds", "runs/min"],
                          [[str(r["workers"]), str(r["runs"]), f"{r['seconds']:.1f}",
                            f"{r['runs_per_min']:.1f}"] for r in result["throughput"]])
    lines += ["## Targets", ""]
    lines += markdown(["target", "measured", "met"],
                      [[t["target"], t["measured"], "yes" if t["met"] else "no"]
                       for t in result["targets"]])
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    if "chaos" in result:
        c = result["chaos"]
        found.append({"target": "0 acknowledged checkpoints lost over >= 200 node kills",
                      "measured": f"{c['lost']} lost over {c['kills']} kills",
                      "met": c["lost"] == 0 and c["kills"] >= 200})
        found.append({"target": "0 lost with k simultaneous kills of k+1 replicas",
                      "measured": f"{c['lost']} lost, {c['simultaneous_k_kills']} double kills",
                      "met": c["lost"] == 0 and c["simultaneous_k_kills"] > 0})
    if "failover" in result and result["failover"]["resume_p95_s"] is not None:
        f = result["failover"]
        found.append({"target": "node death -> runs resumed elsewhere, p95 under 5 s",
                      "measured": f"{f['resume_p95_s']:.2f} s", "met": f["resume_p95_s"] < 5})
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer puts, kills and runs")
    parser.add_argument("--sections", default="puts,chaos,failover,throughput")
    parser.add_argument("--recording", type=Path, help="reuse a recording of the example")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    result: dict[str, Any] = {"benchmark": "ring", "quick": args.quick,
                              "meta": provenance(ROOT, PACKAGES)}
    if "puts" in sections:
        result["puts"] = puts(args.quick)
    if "chaos" in sections:
        result["chaos"] = chaos(20 if args.quick else 200)
    if sections & {"failover", "throughput"}:
        folder = Path(tempfile.mkdtemp(prefix="ring-bench-"))
        recording = args.recording or record(folder)
        if "failover" in sections:
            result["failover"] = failover(recording, folder, 3 if args.quick else 10)
        if "throughput" in sections:
            result["throughput"] = throughput(recording, folder, 4 if args.quick else 12)
        shutil.rmtree(folder)
    stem = "ring-quick" if args.quick else "ring"
    result["sections_meta"] = {name: result["meta"] for name in sections}
    earlier = RESULTS / f"{stem}.json"
    if earlier.exists():  # a run of some sections keeps the others' latest figures
        kept = json.loads(earlier.read_text())
        result = {**kept, **result,
                  "sections_meta": {**kept.get("sections_meta", {}), **result["sections_meta"]}}
    result["targets"] = targets(result)
    write_result(RESULTS, stem, result, table(result))


if __name__ == "__main__":
    main()
