#!/usr/bin/env python3
"""Side-by-side HTTP benchmark: bootfleet (auto, sendfile and mmap bodies) and nginx.

Same run, same files, on loopback. Each server is pinned to core 0 in its own
cpuacct cgroup (CPU counted over all its processes and threads); the client,
wrk (Debian package), is pinned to core 1. nginx runs one worker with
sendfile on; bootfleet runs one worker thread.

Workloads, each at 1, 64 and 512 connections for S seconds:
  * full GETs of a 10 MB and a 100 MB file;
  * random 1 MiB ranges of the 100 MB file;
  * per-MAC iPXE scripts for 1,000 machines: rendered by bootfleet's router
    from the inventory, and for nginx the same scripts as static files (the
    classic per-MAC layout), so nginx's figure is the cost of a static file.

Before measuring, each server's answers are checked with curl (whole file and
a range compared byte for byte, a script for its kernel line).

All servers run at once; each point is measured for every server in turn,
for R rounds, and the table shows each figure's median: this VM's speed
drifts by up to 2x over minutes, which would otherwise fall on whichever
server happened to be measured then.

Usage (as root, from the repository):
    benches/http_compare.py [--seconds S] [--rounds R] [--out docs/benchmarks.md] [--only NAMES]
"""

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tftp_compare import CGROOT, REPO, Server, sh, write_section  # noqa: E402

FILES = [("10m.bin", 10_000_000), ("100m.bin", 100_000_000)]
CONNECTIONS = [1, 64, 512]
MACHINES = 1000
BOOTFLEET_PORT = 18081
NGINX_PORT = 18080

DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BFJSON {"requests":%d,"bytes":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"socket_errors":%d,"status_errors":%d}\n',
    summary.requests, summary.bytes, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""

RANGE_LUA = r"""
local size = tonumber(os.getenv("BF_SIZE"))
local path = os.getenv("BF_PATH")
local counter = 0
request = function()
  counter = counter + 1
  -- a fixed pseudo-random walk, the same for every server
  local start = (counter * 2654435761) % (size - 1048576)
  return wrk.format("GET", path, {["Range"] = "bytes=" .. start .. "-" .. (start + 1048575)})
end
"""

# The requests are built once per wrk thread in init(): formatting a request
# in Lua for every request cost wrk more CPU than the server spent answering
# it, so wrk, not the server, set the pace (about 55,000 requests/s).
SCRIPTS_LUA = r"""
local prefix = os.getenv("BF_PREFIX")
local suffix = os.getenv("BF_SUFFIX")
local machines = tonumber(os.getenv("BF_MACHINES"))
local requests = {}
local counter = 0
init = function(args)
  for n = 0, machines - 1 do
    local mac = string.format("52:54:00:00:%02x:%02x", math.floor(n / 256), n % 256)
    requests[n + 1] = wrk.format("GET", prefix .. mac .. suffix)
  end
end
request = function()
  counter = counter + 1
  return requests[counter % machines + 1]
end
"""


def mac(n: int) -> str:
    return f"52:54:00:00:{n // 256:02x}:{n % 256:02x}"


def make_root(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    for name, size in FILES:
        path = root / name
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                f.write(os.urandom(size))
    (root / "images").mkdir(exist_ok=True)
    inventory = ['[images.bench]\nkernel = "images/vmlinuz"\ninitrds = ["images/initrd.img"]\ncmdline = "console=ttyS0 ip=dhcp"\n']
    classic = root / "classic"
    classic.mkdir(exist_ok=True)
    for n in range(MACHINES):
        inventory.append(f'[machines."{mac(n)}"]\nimage = "bench"\nhostname = "node{n:04}"\ncmdline_append = "node={n}"\n')
        # The same script as a static file for nginx (classic layout).
        (classic / f"{mac(n)}.ipxe").write_text(
            f"#!ipxe\n# bootfleet: {mac(n)} (node{n:04}) boots image bench\n"
            f"kernel http://127.0.0.1/images/vmlinuz initrd=initrd.img console=ttyS0 ip=dhcp node={n}\n"
            "initrd --name initrd.img http://127.0.0.1/images/initrd.img\nboot\n"
        )
    (root / "inventory.toml").write_text("\n".join(inventory))


def servers(root: Path, work: Path, baseline: str = ""):
    out = []
    # --baseline BINARY: an earlier build measured beside this one (auto
    # bodies), in the same rounds, to show a change made nothing slower.
    if baseline:
        config = work / "bootfleet-baseline.toml"
        config.write_text(
            f'root = "{root}"\nworkers = 1\n'
            f'[tftp]\nlisten = "127.0.0.1:6909"\n'
            f'[http]\nlisten = "127.0.0.1:{BOOTFLEET_PORT + 9}"\nbody = "auto"\n'
            f'[inventory]\nstate_dir = "{work}/state-baseline"\n'
            '[log]\nlevel = "warn"\n'
        )
        out.append(Server("bootfleet-baseline", [baseline, "serve", "--panel-listen", "off", "--config", str(config)],
                          f"127.0.0.1:{BOOTFLEET_PORT + 9}", "bfbench_http_baseline"))
    # All servers run at once (each idle while another is measured), so
    # each needs its own ports and state directory.
    for offset, body in enumerate(["auto", "sendfile", "mmap"]):
        port = BOOTFLEET_PORT + offset
        config = work / f"bootfleet-{body}.toml"
        config.write_text(
            f'root = "{root}"\nworkers = 1\n'
            f'[tftp]\nlisten = "127.0.0.1:{6904 + offset}"\n'
            f'[http]\nlisten = "127.0.0.1:{port}"\nbody = "{body}"\n'
            f'[inventory]\nstate_dir = "{work}/state-{body}"\n'
            '[log]\nlevel = "warn"\n'
        )
        out.append(Server(f"bootfleet-{body}", [str(REPO / "target/release/bootfleet"), "serve", "--panel-listen", "off", "--config", str(config)],
                          f"127.0.0.1:{port}", f"bfbench_http_{body}"))
    nginx_conf = work / "nginx.conf"
    nginx_conf.write_text(
        f"""user root;
worker_processes 1;
daemon off;
error_log /dev/null crit;
pid {work}/nginx.pid;
events {{ worker_connections 8192; use epoll; }}
http {{
  sendfile on; tcp_nopush on; tcp_nodelay on; access_log off;
  keepalive_requests 10000000; keepalive_timeout 65;
  default_type application/octet-stream;
  types {{ text/plain ipxe; }}
  server {{ listen 127.0.0.1:{NGINX_PORT} backlog=4096; root {root}; location / {{ }} }}
}}
"""
    )
    out.append(Server("nginx", ["/usr/sbin/nginx", "-c", str(nginx_conf), "-p", str(work)], f"127.0.0.1:{NGINX_PORT}", "bfbench_http_nginx"))
    return out


def check(server: Server, root: Path, work: Path):
    """The server answers correctly before it is measured."""
    base = f"http://{server.addr}"
    body = work / "check.bin"
    sh("curl", "-sSf", "-o", str(body), f"{base}/10m.bin")
    assert hashlib.sha256(body.read_bytes()).digest() == hashlib.sha256((root / "10m.bin").read_bytes()).digest(), server.name
    sh("curl", "-sSf", "-r", "5000000-5999999", "-o", str(body), f"{base}/100m.bin")
    with open(root / "100m.bin", "rb") as f:
        f.seek(5_000_000)
        assert body.read_bytes() == f.read(1_000_000), server.name
    script = subprocess.run(["curl", "-sSf", f"{base}{script_path(server, 7)}"], check=True, capture_output=True, text=True).stdout
    assert "initrd=initrd.img console=ttyS0 ip=dhcp node=7" in script, (server.name, script)


def script_path(server: Server, n: int) -> str:
    return f"/boot/{mac(n)}.ipxe" if server.name.startswith("bootfleet") else f"/classic/{mac(n)}.ipxe"


def run_point(server: Server, workload: str, connections: int, seconds: float, work: Path) -> dict:
    env = dict(os.environ)
    lua = DONE_LUA
    path = "/"
    if workload.startswith("full "):
        path = "/" + workload.split()[1]
    elif workload == "range 1 MiB":
        lua = RANGE_LUA + lua
        env.update(BF_SIZE="100000000", BF_PATH="/100m.bin")
    elif workload == "scripts":
        lua = SCRIPTS_LUA + lua
        prefix = "/boot/" if server.name.startswith("bootfleet") else "/classic/"
        env.update(BF_PREFIX=prefix, BF_SUFFIX=".ipxe", BF_MACHINES=str(MACHINES))
    script = work / "wrk.lua"
    script.write_text(lua)
    # One wrk thread: wrk is pinned to one core, where a second thread only
    # time-slices with the first and adds its waits to every latency.
    threads = 1
    cpu_before = server.cpu_ns()
    started = time.monotonic()
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s",
         "--latency", "-s", str(script), f"http://{server.addr}{path}"],
        env=env, capture_output=True, text=True, timeout=seconds + 60,
    )
    elapsed = time.monotonic() - started
    cpu = (server.cpu_ns() - cpu_before) / 1e9
    match = re.search(r"BFJSON (\{.*\})", out.stdout)
    if not match:
        raise RuntimeError(f"wrk failed for {server.name} {workload} c{connections}:\n{out.stdout}\n{out.stderr}")
    report = json.loads(match.group(1))
    duration = report["duration_us"] / 1e6
    gigabytes = report["bytes"] / 1e9
    report.update(
        server=server.name, workload=workload, connections=connections,
        gb_per_s=gigabytes / duration, requests_per_s=report["requests"] / duration,
        server_cpu_s=cpu, cpu_s_per_gb=cpu / gigabytes if gigabytes else None,
        cpu_us_per_request=cpu * 1e6 / report["requests"] if report["requests"] else None,
        wall_s=elapsed,
    )
    print(f"{server.name:18} {workload:14} c={connections:<4} {report['gb_per_s']:.2f} GB/s "
          f"{report['requests_per_s']:>9.0f} req/s p99 {report['p99_us'] / 1000:.2f} ms cpu {cpu:.2f} s "
          f"errors {report['socket_errors']}+{report['status_errors']}", flush=True)
    return report


def median_report(reports: list) -> dict:
    """One row from the rounds of a point: the median of each figure, and
    the sum of errors (an error in any round shows)."""
    row = dict(reports[0])
    for key in ["gb_per_s", "requests_per_s", "p99_us", "cpu_s_per_gb", "cpu_us_per_request"]:
        values = [r[key] for r in reports if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    for key in ["socket_errors", "status_errors"]:
        row[key] = sum(r[key] for r in reports)
    row["rounds"] = len(reports)
    return row


def markdown(results, command) -> str:
    lines = [
        "<!-- http-compare:begin -->",
        "## HTTP: bootfleet against nginx",
        "",
        f"Command: `{command}` (generated; do not edit by hand).",
        "",
        "Server on core 0 (one worker; CPU from its cpuacct cgroup), wrk on core 1, loopback. "
        "`bootfleet-auto` (the default), `bootfleet-sendfile` and `bootfleet-mmap` differ only in `http.body`. GB/s counts every byte wrk read. "
        "All servers run at once; every point is run once per round for each server in turn, and each figure "
        "is the median over the rounds (errors are summed).",
        "",
        "| workload | conns | server | GB/s | req/s | p99 ms | server CPU-s/GB | CPU µs/req | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        per_gb = f"{r['cpu_s_per_gb']:.3f}" if r["cpu_s_per_gb"] else "-"
        per_req = f"{r['cpu_us_per_request']:.1f}" if r["cpu_us_per_request"] else "-"
        lines.append(
            f"| {r['workload']} | {r['connections']} | {r['server']} | {r['gb_per_s']:.2f} | {r['requests_per_s']:.0f} | "
            f"{r['p99_us'] / 1000:.2f} | {per_gb} | {per_req} | {r['socket_errors'] + r['status_errors']} |"
        )
    lines.append("<!-- http-compare:end -->")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    parser.add_argument("--only", default="", help="comma-separated server names")
    parser.add_argument("--workloads", default="", help="comma-separated subset, e.g. 'scripts,full 10m.bin'")
    parser.add_argument("--connections", default="", help="comma-separated subset of 1,64,512")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every point; the table shows medians")
    parser.add_argument("--baseline", default="", help="an earlier bootfleet binary, measured beside this one as bootfleet-baseline")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark pins processes and makes cpuacct cgroups")
    if not CGROOT.exists():
        sys.exit(f"{CGROOT} is missing: a cpuacct cgroup hierarchy is needed to count server CPU")
    for tool, package in [("wrk", "wrk"), ("/usr/sbin/nginx", "nginx-light"), ("curl", "curl")]:
        if not (Path(tool).exists() or subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode == 0):
            sh("apt-get", "install", "-y", "-q", "--no-install-recommends", package, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sh("cargo", "build", "--release", "-p", "bootfleet", cwd=REPO)
    work = Path(tempfile.gettempdir()) / "bootfleet-bench-http"
    work.mkdir(exist_ok=True)
    root = work / "root"
    make_root(root)
    workloads = [f"full {name}" for name, _ in FILES] + ["range 1 MiB", "scripts"]
    if args.workloads:
        workloads = [w for w in workloads if w in args.workloads.split(",")]
    connections = [int(c) for c in args.connections.split(",")] if args.connections else CONNECTIONS
    chosen = servers(root, work, args.baseline)
    if args.only:
        chosen = [s for s in chosen if s.name in args.only.split(",")]
    # Point by point, the servers one after another (in a rotated order each
    # round), so that the VM's drift over minutes falls on every server
    # alike; each figure is the median of its rounds.
    runs = {}
    try:
        for server in chosen:
            server.start()
            check(server, root, work)
        for round_index in range(args.rounds):
            order = chosen[round_index % len(chosen):] + chosen[:round_index % len(chosen)]
            for workload in workloads:
                for conns in connections:
                    for server in order:
                        report = run_point(server, workload, conns, args.seconds, work)
                        runs.setdefault((workload, conns, server.name), []).append(report)
    finally:
        for server in chosen:
            server.stop()
    results = [median_report(reports) for reports in runs.values()]
    results.sort(key=lambda r: (workloads.index(r["workload"]), r["connections"], r["server"]))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    command = f"sudo benches/http_compare.py --seconds {args.seconds:g} --rounds {args.rounds}"
    write_section(Path(args.out), markdown(results, command), "http-compare")
    print(f"results: {work / 'results.json'}; table written into {args.out}")


if __name__ == "__main__":
    main()
