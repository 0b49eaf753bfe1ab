#!/usr/bin/env python3
"""Power-on storm through one bootfleet server against several on one
PostgreSQL, in the same run.

For each server count (default 1 and 3): a bridge (the boot LAN) and one
network namespace per server on it, a throwaway PostgreSQL cluster
listening on the bridge (tests/postgres.sh), the servers with a shared
lease table (`[database] url`), an image assigned to every machine through
the first server's API, then `bootfleet-loadtest storm --dhcp-via
broadcast` powers on every machine at once: real broadcasts that every
server hears. Each server and PostgreSQL run in a cpuacct cgroup of their
own; the table gives the storm's time, phase latencies and the CPU of the
servers and of the database. Everything the script makes is removed, and
the host's neighbour-table limits it raises are put back.

    sudo env "PATH=$PATH" benches/scale_out_storm.py --machines 1000 --servers 1,3
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tftp_compare import CGROOT, REPO, remove_cgroup, sh, write_section  # noqa: E402

BRIDGE, BRIDGE_IP = "bfscb0", "10.89.15.254"
RANGE = "10.89.0.10-10.89.15.200"
BINARY = REPO / "target/release/bootfleet"
LOADTEST = REPO / "target/release/bootfleet-loadtest"
NEIGHBOUR = [("gc_thresh1", 4096), ("gc_thresh2", 8192), ("gc_thresh3", 16384)]


def server_ip(n: int) -> str:
    return f"10.89.0.{n + 1}"


def lan_up(servers: int):
    lan_down(8)
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{BRIDGE_IP}/20", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for n in range(servers):
        ns, outer, inner = f"bfsc{n}", f"bfsc{n}a", f"bfsc{n}b"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", outer, "master", BRIDGE, "up")
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", inner, "name", "lan0")
        sh("ip", "-n", ns, "addr", "add", f"{server_ip(n)}/20", "dev", "lan0")
        sh("ip", "-n", ns, "link", "set", "lan0", "up")


def lan_down(servers: int):
    for n in range(servers):
        subprocess.run(["ip", "netns", "del", f"bfsc{n}"], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "link", "del", BRIDGE], stderr=subprocess.DEVNULL)


def in_cgroup(name: str, argv, **kw) -> subprocess.Popen:
    cgroup = CGROOT / name
    cgroup.mkdir(exist_ok=True)
    script = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
    return subprocess.Popen(["sh", "-c", script, "sh", *map(str, argv)], start_new_session=True, **kw)


def cpu_s(name: str) -> float:
    return int((CGROOT / name / "cpuacct.usage").read_text()) / 1e9


def make_root(root: Path, kernel_kb: int, initrd_kb: int):
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name, size in [("undionly.kpxe", 70_000), ("img/vmlinuz", kernel_kb * 1000), ("img/initrd.gz", initrd_kb * 1000)]:
        path = root / name
        if not path.exists() or path.stat().st_size != size:
            path.write_bytes(os.urandom(size))
    (root / "inventory.toml").write_text("")


def api(url: str, token: str, method: str, path: str, body: dict):
    request = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=30).read()


def storm(servers: int, machines: int, root: Path, work: Path, time_limit: int) -> dict:
    """One storm through `servers` servers; everything is made and removed here."""
    label = f"{servers} server{'s' if servers > 1 else ''}"
    lan_up(servers)
    pg_dir = work / f"pg-{servers}"
    pg_cgroup = f"bfscale_pg{servers}"
    procs = []
    try:
        pg = in_cgroup(pg_cgroup, [REPO / "tests/postgres.sh", "start", pg_dir], stdout=subprocess.PIPE, text=True,
                       env={**os.environ, "BOOTFLEET_PG_ALSO_LISTEN": BRIDGE_IP})
        url = pg.communicate(timeout=120)[0].strip().replace("127.0.0.1", BRIDGE_IP)
        if pg.returncode != 0 or not url:
            raise RuntimeError("tests/postgres.sh could not start a cluster (see above)")
        token = subprocess.run([BINARY, "tokens", "add", "bench", "--scope", "admin", "--database", url],
                               check=True, capture_output=True, text=True).stdout.strip()
        for n in range(servers):
            config = work / f"server-{servers}-{n}.toml"
            config.write_text(
                f'root = "{root}"\n[tftp]\nlisten = "{server_ip(n)}:69"\n[http]\nlisten = "{server_ip(n)}:80"\n'
                f'[dhcp]\nmode = "full"\ninterfaces = ["lan0"]\nranges = ["{RANGE}"]\n'
                f'[inventory]\nstate_dir = "{work}/state-{servers}-{n}"\n'
                f'[panel]\nlisten = "{server_ip(n)}:9090"\nserver_name = "boot-{n}"\n'
                f'[database]\nurl = "{url}"\n[log]\nlevel = "warn"\n')
            procs.append(in_cgroup(f"bfscale_{servers}_{n}", ["ip", "netns", "exec", f"bfsc{n}", BINARY, "serve", "--config", config],
                                   stdout=open(work / f"server-{servers}-{n}.log", "w"), stderr=subprocess.STDOUT))
        panel = f"http://{server_ip(0)}:9090"
        for _ in range(100):
            try:
                urllib.request.urlopen(urllib.request.Request(panel + "/healthz"), timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        # The panel listens in the first server's namespace: ask from there.
        sh("ip", "netns", "exec", "bfsc0", "curl", "-sf", "-o", "/dev/null", "-H", f"Authorization: Bearer {token}",
           "-H", "Content-Type: application/json", "-d",
           json.dumps({"name": "node", "kernel": "img/vmlinuz", "initrds": ["img/initrd.gz"], "cmdline": "console=ttyS0"}),
           f"{panel}/api/v1/images")
        macs = [f"02:bf:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}" for i in range(machines)]
        for start in range(0, machines, 500):
            sh("ip", "netns", "exec", "bfsc0", "curl", "-sf", "-o", "/dev/null", "-H", f"Authorization: Bearer {token}",
               "-H", "Content-Type: application/json", "-d", json.dumps({"image": "node", "macs": macs[start:start + 500]}),
               f"{panel}/api/v1/machines/assign")
        for n in range(servers):
            probe = f"http://{server_ip(n)}/boot/{macs[0]}.ipxe"
            for _ in range(150):
                out = subprocess.run(["ip", "netns", "exec", f"bfsc{n}", "curl", "-sf", probe], capture_output=True, text=True).stdout
                if "img/vmlinuz" in out:
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError(f"server {n} never served the assignment; see {work}/server-{servers}-{n}.log")
        cpu0 = [cpu_s(f"bfscale_{servers}_{n}") for n in range(servers)] + [cpu_s(pg_cgroup)]
        report_path = work / f"storm-{servers}.json"
        sh(LOADTEST, "storm", "--server", server_ip(0), "--machines", str(machines), "--root", str(root),
           "--dhcp-via", "broadcast", "--attach", BRIDGE, "--retries", "5", "--threads", "2",
           "--time-limit", str(time_limit), "--label", label, "--json", str(report_path),
           env={**os.environ, "BOOTFLEET_LOADTEST_NAMESPACE": "1"})
        cpu1 = [cpu_s(f"bfscale_{servers}_{n}") for n in range(servers)] + [cpu_s(pg_cgroup)]
        report = json.loads(report_path.read_text())
        used = [b - a for a, b in zip(cpu0, cpu1)]
        report["servers"] = servers
        report["server_cpu_s"] = sum(used[:-1])
        report["database_cpu_s"] = used[-1]
        addresses = {}
        for mac, given in report["leases"].items():
            for address in given:
                if addresses.setdefault(address, mac) != mac:
                    raise RuntimeError(f"{address} was given to {addresses[address]} and {mac}")
        print(f"{label}: {report['booted']}/{machines} booted in {report['seconds']:.2f} s, servers' CPU {report['server_cpu_s']:.2f} s, "
              f"database {report['database_cpu_s']:.2f} s, no address twice", flush=True)
        return report
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 15)
            except ProcessLookupError:
                pass
            proc.wait()
        subprocess.run([REPO / "tests/postgres.sh", "stop", pg_dir], capture_output=True)
        for n in range(servers):
            remove_cgroup(CGROOT / f"bfscale_{servers}_{n}")
        remove_cgroup(CGROOT / pg_cgroup)
        lan_down(servers)


def markdown(results, command) -> str:
    lines = ["<!-- scale-out-storm:begin -->", "## Power-on storm: one server against several on one PostgreSQL", "",
             f"Command: `{command}` (generated; do not edit by hand).", "",
             "Every machine powered on at once by `bootfleet-loadtest storm --dhcp-via broadcast` on a bridge, the servers each in a namespace of their own on it "
             "with one shared lease table in PostgreSQL (on the bridge); a machine whose boot breaks starts over (`--retries 5`). "
             "CPU from each process's cgroup; every lease checked: no address went to two machines.", "",
             "| servers | machines | booted | retried | storm s | p50 total ms | p99 total ms | p99 DHCP ms | servers' CPU s | database CPU s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        phases = r["phases"]
        lines.append(f"| {r['servers']} | {r['machines']} | {r['booted']} | {r['retried']} | {r['seconds']:.2f} | "
                     f"{phases['total']['p50_ms']:.0f} | {phases['total']['p99_ms']:.0f} | {phases['dhcp']['p99_ms']:.0f} | "
                     f"{r['server_cpu_s']:.2f} | {r['database_cpu_s']:.2f} |")
    lines.append("<!-- scale-out-storm:end -->")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--servers", default="1,3")
    parser.add_argument("--kernel-kb", type=int, default=2000)
    parser.add_argument("--initrd-kb", type=int, default=8000)
    parser.add_argument("--time-limit", type=int, default=120)
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark makes a bridge, namespaces and cgroups")
    counts = [int(n) for n in args.servers.split(",")]
    if max(counts) > 8:
        sys.exit("at most 8 servers")
    sh("cargo", "build", "--release", "--workspace", cwd=REPO)
    work = Path(tempfile.mkdtemp(prefix="bootfleet-scale-out-bench-", dir="/var/tmp"))
    work.chmod(0o755)  # PostgreSQL runs as its own user below it
    root = work / "boot"
    make_root(root, args.kernel_kb, args.initrd_kb)
    limits = []
    for key, wanted in NEIGHBOUR:
        path = Path(f"/proc/sys/net/ipv4/neigh/default/{key}")
        before = path.read_text().strip()
        if int(before) < wanted:
            path.write_text(str(wanted))
            limits.append((path, before))
    try:
        results = [storm(n, args.machines, root, work, args.time_limit) for n in counts]
    finally:
        for path, before in limits:
            path.write_text(before)
    command = "sudo env \"PATH=$PATH\" benches/scale_out_storm.py " + " ".join(sys.argv[1:])
    section = markdown(results, command.strip())
    print(section)
    write_section(Path(args.out), section, "scale-out-storm")
    print(f"logs and reports in {work}")


if __name__ == "__main__":
    main()
