#!/usr/bin/env python3
"""Power-on to the last check-in: bootfleet powering a fleet on through its
BMCs, all at once, in fixed waves, and in adaptive waves, side by side.

Each run: a fresh bootfleet (DHCP full mode through a relay, TFTP, HTTP,
the panel) in a network namespace the script creates and removes,
`bootfleet-loadtest storm --power-via redfish` gives every simulated
machine a simulated Redfish BMC on the namespace's loopback and registers
it in the panel, then asks bootfleet (`POST /api/v1/power`) to power them
all on; each machine boots when its BMC is told to (DHCP, TFTP loader,
iPXE scripts, kernel, initrd, every byte checked) and checks in with the
token on its kernel command line. Time is counted from the power-on
request to each machine's check-in.

Two servers:
* roomy: the default limits, where the server is not the bottleneck;
* bounded: `[tftp] max_transfers` and `[http] max_connections` set low
  (--bounded-limit), so that all at once overruns them: refused machines
  start over (--retries), as real firmware does.

Usage (as root, from the repository):
    benches/power_storm.py [--machines 1000] [--kernel-mb 10] [--initrd-mb 50]
                           [--fixed 100/5] [--bounded-limit 64] [--time-limit 300]
                           [--servers roomy,bounded] [--pacings all,fixed,adaptive]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from storm_compare import LOADTEST, BOOTFLEET, p99_cell, RELAY_RANGE, NS, Stack, make_root, ns_down, ns_up, wait_http  # noqa: E402
from tftp_compare import REPO, sh, write_section  # noqa: E402

PANEL = "http://127.0.0.1:9090"


def start_bootfleet(work: Path, root: Path, limit: int | None) -> tuple[Stack, str]:
    state = work / "bootfleet-state"
    subprocess.run(["rm", "-rf", str(state)])
    config = work / "bootfleet.toml"
    limits = ""
    if limit:
        limits = f"[tftp]\nmax_transfers = {limit}\n[http]\nmax_connections = {limit}\n"
    config.write_text("[dhcp]\nmax_requests_per_second_per_source = 10000000\n[log]\nlevel = \"warn\"\n"
                      f"[power]\ncheckin_url = \"{PANEL}\"\nconcurrency = 64\n" + limits)
    stack = Stack("bootfleet")
    stack.spawn([BOOTFLEET, "serve", "--config", config, "--root", root, "--state-dir", state,
                 "--tftp-listen", "127.0.0.1:69", "--http-listen", "127.0.0.1:80", "--panel-listen", "127.0.0.1:9090",
                 "--dhcp-mode", "full", "--dhcp-interface", "lo", "--dhcp-range", RELAY_RANGE], work / "bootfleet.log")
    wait_http("http://127.0.0.1/boot.ipxe")
    wait_http(f"{PANEL}/healthz")
    token = subprocess.run([BOOTFLEET, "tokens", "add", "bench", "--scope", "admin", "--state-dir", state],
                           capture_output=True, text=True, check=True).stdout.strip()
    return stack, token


def run(work: Path, root: Path, server: str, limit: int | None, pacing: str, args) -> dict:
    stack, token = start_bootfleet(work, root, limit)
    name = f"{server}-{pacing.replace('/', '-')}"
    json_path = work / f"{name}.json"
    try:
        cpu0 = stack.cpu_s()
        out = subprocess.run(["ip", "netns", "exec", NS, LOADTEST, "storm", "--server", "127.0.0.1",
                              "--machines", str(args.machines), "--root", root, "--threads", "2",
                              "--time-limit", str(args.time_limit), "--retries", str(args.retries),
                              "--power-via", "redfish", "--panel", PANEL, "--power-waves", pacing,
                              "--label", name, "--json", json_path, "--chart", work / f"{name}.html"],
                             capture_output=True, text=True, env={**os.environ, "BOOTFLEET_TOKEN": token})
        cpu = stack.cpu_s() - cpu0
    finally:
        stack.stop()
    print(out.stdout, out.stderr, flush=True)
    report = json.loads(json_path.read_text())
    report.update(server=server, pacing=pacing, server_cpu_s=cpu)
    return report


def markdown(results, command) -> str:
    lines = ["<!-- power-storm:begin -->", "## Power-on through BMCs to the last check-in (issue 22)", "",
             f"Command: `{command}` (generated; do not edit by hand).", "",
             "Simulated machines with simulated Redfish BMCs (`bootfleet-loadtest storm --power-via redfish`, 2 threads), "
             "powered on by bootfleet (`POST /api/v1/power`) in a namespace's loopback; each boots the whole chain "
             "(every byte checked) and checks in with its per-boot token. Times from the power-on request; phase "
             "columns are p99 ms; `retried` counts machines that had to start over after a refusal or a timeout.", "",
             "| server | pacing | machines | checked in | failed / cut | retried | last check-in s | p99 power | p99 DHCP | p99 loader | p99 kernel | p99 initrd | p99 check-in | p99 total | server CPU s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        p = r["phases"]
        def cell(phase, p=p):
            return p99_cell(p, phase)
        last = p["total"]["max_ms"] / 1000 if "total" in p else float("nan")
        lines.append(f"| {r['server']} | {r['pacing']} | {r['machines']} | {r['booted']} | {r['failed']} / {r['cut']} | "
                     f"{r['retried']} | {last:.1f} | {cell('power')} | {cell('dhcp')} | {cell('loader')} | {cell('kernel')} | "
                     f"{cell('initrd')} | {cell('checkin')} | {cell('total')} | {r['server_cpu_s']:.1f} |")
    lines.append("<!-- power-storm:end -->")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--kernel-mb", type=int, default=10)
    parser.add_argument("--initrd-mb", type=int, default=50)
    parser.add_argument("--fixed", default="100/5", help="fixed waves: SIZE/SECONDS")
    parser.add_argument("--bounded-limit", type=int, default=64)
    parser.add_argument("--retries", type=int, default=20)
    parser.add_argument("--time-limit", type=int, default=300)
    parser.add_argument("--servers", default="roomy,bounded")
    parser.add_argument("--pacings", default="all,fixed,adaptive")
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark makes a network namespace and cgroups")
    sh("cargo", "build", "--release", "--workspace", cwd=REPO)
    work = Path(tempfile.mkdtemp(prefix="bootfleet-power-bench-", dir="/var/tmp"))
    root = make_root(work, args.machines, args.kernel_mb, args.initrd_mb)
    pacings = {"all": "all", "fixed": args.fixed, "adaptive": "adaptive"}
    results = []
    ns_up()
    try:
        for server in args.servers.split(","):
            limit = args.bounded_limit if server == "bounded" else None
            for pacing in args.pacings.split(","):
                results.append(run(work, root, server, limit, pacings[pacing], args))
    finally:
        ns_down()
    command = "sudo env \"PATH=$PATH\" benches/power_storm.py " + " ".join(sys.argv[1:])
    section = markdown(results, command.strip())
    print(section)
    write_section(Path(args.out), section, "power-storm")
    print(f"reports and charts in {work}")


if __name__ == "__main__":
    main()
