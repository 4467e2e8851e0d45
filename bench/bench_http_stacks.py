"""Which HTTP server and client the queen should proxy with, by measurement.

Runs bench/passthrough.py with the four pairings of server (aiohttp, raw
httptools) and client (aiohttp, rbee's UpstreamPool) in front of the same
fake upstream as bench/bench_proxy.py, and reports for each what it adds
over going direct: p50 latency at concurrency 1, its CPU per request at
concurrency 1 and 32, and its throughput at 32 as a share of direct. Rounds
alternate the targets; figures are medians over rounds. docs/benchmarks.md
("Choosing the HTTP stack") records a run.

With --rust it also builds (cargo) and measures bench/rust_passthrough, the
same pass-through in Rust with hyper: what forwarding would cost were it
moved out of Python.

    python bench/bench_http_stacks.py [--rounds 3] [--scale 1.0] [--rust] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_proxy import HERE, Service, free_port, run_load, start_upstream, wait_ready

PAIRINGS = (("aiohttp", "aiohttp"), ("aiohttp", "raw"), ("raw", "aiohttp"), ("raw", "raw"))
PHASES = (("latency", 1, False, 1500, 8.0), ("throughput", 32, False, 4000, 7.0))


def start_passthrough(workdir: Path, server: str, client: str, upstream: str) -> tuple[Service,
                                                                                         str]:
    name = f"{server}-server+{client}-client"
    return _ready(Service(name, [sys.executable, str(HERE / "passthrough.py"), "--server",
                                 server, "--client", client, "--port", str(free_port()),
                                 "--upstream", upstream], workdir / f"{name}.log"))


def _ready(service: Service) -> tuple[Service, str]:
    """Waits for the `READY <url>` line of a pass-through and one answer."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in service.log_path.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                url = line.split()[1]
                wait_ready(service, url + "/chat/completions", 10)
                return service, url
        time.sleep(0.1)
    service.stop()
    raise RuntimeError(f"{service.name} did not start:\n{service.tail()}")


def build_rust() -> Path:
    """Builds bench/rust_passthrough in release mode; answers the binary."""
    crate = HERE / "rust_passthrough"
    print("  building the Rust pass-through (cargo build --release)", file=sys.stderr,
          flush=True)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path",
                    str(crate / "Cargo.toml")], check=True)
    return crate / "target" / "release" / "rust-passthrough"


def start_rust(workdir: Path, binary: Path, upstream: str) -> tuple[Service, str]:
    return _ready(Service("rust-hyper", [str(binary), "--port", str(free_port()),
                                         "--upstream", upstream], workdir / "rust-hyper.log"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--rust", action="store_true",
                        help="also build and measure the Rust (hyper) pass-through")
    args = parser.parse_args()
    rust = build_rust() if args.rust else None
    phases = [[n, c, s, max(20, int(count * args.scale)), cap] for n, c, s, count, cap in PHASES]
    workdir = Path(tempfile.mkdtemp(prefix="rbee-stacks-"))
    upstream, upstream_url = start_upstream(workdir)
    services: dict[str, tuple[Service | None, str]] = {"direct": (None, upstream_url)}
    try:
        for server, client in PAIRINGS:
            service, url = start_passthrough(workdir, server, client, upstream_url)
            services[service.name] = (service, url)
        if rust is not None:
            service, url = start_rust(workdir, rust, upstream_url)
            services[service.name] = (service, url)
        for name, (service, url) in services.items():
            print(f"  {name}: warming up", file=sys.stderr, flush=True)
            run_load(url + "/chat/completions", upstream.pid,
                     service.pid if service else None, phases)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in services}
        for number in range(args.rounds):
            for name, (service, url) in services.items():
                print(f"  round {number + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                measured = run_load(url + "/chat/completions", upstream.pid,
                                    service.pid if service else None, phases)
                rounds[name].append({p["name"]: p for p in measured})
    finally:
        for service, _ in services.values():
            if service is not None:
                service.stop()
        upstream.stop()
    rows = {}
    for name, per_round in rounds.items():
        cells = []
        for phases_of, direct in zip(per_round, rounds["direct"]):
            lat, thr = phases_of["latency"], phases_of["throughput"]
            cells.append({
                "added_p50_ms": lat["latency_ms"]["p50"] - direct["latency"]["latency_ms"]["p50"],
                "cpu_ms_per_req_c1": lat["proxy_cpu_ms_per_req"],
                "cpu_ms_per_req_c32": thr["proxy_cpu_ms_per_req"],
                "rps_vs_direct": thr["rps"] / direct["throughput"]["rps"],
            })
        rows[name] = {key: (None if any(c[key] is None for c in cells)
                            else statistics.median(c[key] for c in cells)) for key in cells[0]}
    print(f"{'pairing':32} {'+p50 ms':>8} {'cpu c1':>8} {'cpu c32':>8} {'vs direct':>10}")
    for name, row in rows.items():
        if name == "direct":
            continue
        print(f"{name:32} {row['added_p50_ms']:8.3f} {row['cpu_ms_per_req_c1']:8.3f} "
              f"{row['cpu_ms_per_req_c32']:8.3f} {100 * row['rps_vs_direct']:9.1f}%")
    print("(ms; medians of rounds; cpu: the pass-through process per request)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
