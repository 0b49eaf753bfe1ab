#!/usr/bin/env python3
"""Side-by-side DHCP benchmark: bootfleet (full mode), Kea (memfile) and dnsmasq.

`bootfleet-postgres` is bootfleet with its lease table shared through a
PostgreSQL server (`[database] url`; a throwaway cluster started by
tests/postgres.sh inside the server's namespace, pinned to the server's
core, its CPU counted in its own cgroup and added to the server's): the
cost of writing every batch's leases through to the database before the
ACKs go, which is what several servers on one LAN pay.

Kea's perfdhcp (Debian package kea-admin) runs in relay mode over a veth pair
between two network namespaces the script creates and removes. Each server is
pinned to core 0 in its own cpuacct cgroup (joined before entering the
namespace, since `ip netns exec` remounts /sys); perfdhcp is pinned to core 1.
Every server persists its leases to a file in the same directory on the same
disk (bootfleet: journal with fdatasync per batch; Kea: memfile; dnsmasq:
its lease file).

For each rate R (DORA exchanges per second), perfdhcp runs S seconds with new
clients (random MACs) and the script records the exchanges completed, the
drops of each half (DISCOVER-OFFER, REQUEST-ACK) and the server's CPU.

Usage (as root, from the repository):
    benches/dhcp_compare.py [--seconds S] [--rates 1000,3000,...] [--only NAMES]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tftp_compare import CGROOT, REPO, remove_cgroup, sh, write_section  # noqa: E402

SERVER_NS, CLIENT_NS = "bfdhcpb_s", "bfdhcpb_c"
SERVER_DEV, CLIENT_DEV = "bfdb_s", "bfdb_c"
SERVER_IP, CLIENT_IP = "10.66.0.1", "10.66.0.2"
RATES = [1000, 2000, 3000, 5000, 8000]
# After its last request perfdhcp waits this long for answers still in flight,
# so that a "drop" is a request never answered, not one cut off by the stop.
EXIT_WAIT_US = 1_000_000
# A receive buffer deep enough that perfdhcp, one socket standing for
# thousands of clients, can take a burst of answers (a server that batches
# sends them together); the system default (208 KiB) overflows.
RMEM_DEFAULT = 4 << 20
RMEM_SYSCTL = Path("/proc/sys/net/core/rmem_default")


def lab_up():
    lab_down()
    for ns in (SERVER_NS, CLIENT_NS):
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", SERVER_DEV, "type", "veth", "peer", "name", CLIENT_DEV)
    sh("ip", "link", "set", SERVER_DEV, "netns", SERVER_NS)
    sh("ip", "link", "set", CLIENT_DEV, "netns", CLIENT_NS)
    sh("ip", "-n", SERVER_NS, "addr", "add", f"{SERVER_IP}/10", "dev", SERVER_DEV)
    sh("ip", "-n", CLIENT_NS, "addr", "add", f"{CLIENT_IP}/10", "dev", CLIENT_DEV)
    for ns, dev in ((SERVER_NS, SERVER_DEV), (CLIENT_NS, CLIENT_DEV)):
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def lab_down():
    for ns in (SERVER_NS, CLIENT_NS):
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


class PostgresInNamespace:
    """A throwaway PostgreSQL cluster in the server's namespace, on core 0,
    in a cpuacct cgroup of its own."""

    def __init__(self, work: Path):
        self.dir, self.cgroup = work / "postgres", CGROOT / "bfbench_dhcp_postgres"

    def start(self) -> str:
        self.cgroup.mkdir(exist_ok=True)
        script = (f'echo $$ > {self.cgroup}/cgroup.procs && exec taskset -c 0 '
                  f'ip netns exec {SERVER_NS} {REPO}/tests/postgres.sh start {self.dir}')
        started = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
        if started.returncode != 0:
            raise RuntimeError(f"tests/postgres.sh could not start a cluster: {started.stderr}")
        return started.stdout.strip()

    def cpu_ns(self):
        return int((self.cgroup / "cpuacct.usage").read_text())

    def stop(self):
        subprocess.run(["ip", "netns", "exec", SERVER_NS, f"{REPO}/tests/postgres.sh", "stop", str(self.dir)], capture_output=True)
        remove_cgroup(self.cgroup)


class NsServer:
    def __init__(self, name, argv, cgroup, database=None):
        self.name, self.argv, self.cgroup = name, argv, CGROOT / cgroup
        self.proc = None
        # A PostgresInNamespace the server needs (its CPU is counted too).
        self.database = database

    def start(self):
        if self.database:
            url = self.database.start()
            config = Path(self.argv[self.argv.index("--config") + 1])
            config.write_text(config.read_text() + f'[database]\nurl = "{url}"\n')
        self.cgroup.mkdir(exist_ok=True)
        script = f'echo $$ > {self.cgroup}/cgroup.procs && exec ip netns exec {SERVER_NS} taskset -c 0 "$@"'
        log = open(Path(tempfile.gettempdir()) / f"dhcp-compare-{self.name}.log", "w")
        self.proc = subprocess.Popen(["sh", "-c", script, "sh", *self.argv], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(1.5)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited at start: {self.argv}")

    def cpu_ns(self):
        return int((self.cgroup / "cpuacct.usage").read_text())

    def database_cpu_ns(self):
        return self.database.cpu_ns() if self.database else 0

    def stop(self):
        if self.database:
            self.database.stop()
        if self.proc:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        remove_cgroup(self.cgroup)


def servers(work: Path):
    root = work / "boot"
    root.mkdir(exist_ok=True)
    kea_conf = work / "kea.json"
    kea_conf.write_text(json.dumps({"Dhcp4": {
        "interfaces-config": {"interfaces": [SERVER_DEV], "dhcp-socket-type": "udp"},
        "lease-database": {"type": "memfile", "persist": True, "name": str(work / "kea-leases.csv"), "lfc-interval": 0},
        "valid-lifetime": 3600,
        "subnet4": [{"id": 1, "subnet": "10.64.0.0/10", "pools": [{"pool": "10.65.0.0 - 10.127.255.254"}]}],
        "loggers": [{"name": "kea-dhcp4", "severity": "ERROR", "output_options": [{"output": "stderr"}]}],
    }}))
    nosync = work / "bootfleet-nosync.toml"
    nosync.write_text("[dhcp]\nsync_leases = false\n")
    shared = work / "bootfleet-postgres.toml"
    shared.write_text("")
    return [
        NsServer("bootfleet-postgres", [str(REPO / "target/release/bootfleet"), "serve", "--panel-listen", "off", "--config", str(shared), "--root", str(root),
                                        "--state-dir", str(work / "bootfleet-postgres-state"),
                                        "--tftp-listen", f"{SERVER_IP}:69", "--http-listen", f"{SERVER_IP}:80", "--workers", "1",
                                        "--dhcp-mode", "full", "--dhcp-interface", SERVER_DEV, "--dhcp-range", "10.65.0.0-10.127.255.254",
                                        "--log-level", "warn"], "bfbench_dhcp_bootfleet_postgres", PostgresInNamespace(work)),
        NsServer("bootfleet-nosync", [str(REPO / "target/release/bootfleet"), "serve", "--panel-listen", "off", "--config", str(nosync), "--root", str(root),
                                      "--state-dir", str(work / "bootfleet-nosync-state"),
                                      "--tftp-listen", f"{SERVER_IP}:69", "--http-listen", f"{SERVER_IP}:80", "--workers", "1",
                                      "--dhcp-mode", "full", "--dhcp-interface", SERVER_DEV, "--dhcp-range", "10.65.0.0-10.127.255.254",
                                      "--log-level", "warn"], "bfbench_dhcp_bootfleet_nosync"),
        NsServer("bootfleet", [str(REPO / "target/release/bootfleet"), "serve", "--panel-listen", "off", "--root", str(root), "--state-dir", str(work / "bootfleet-state"),
                               "--tftp-listen", f"{SERVER_IP}:69", "--http-listen", f"{SERVER_IP}:80", "--workers", "1",
                               "--dhcp-mode", "full", "--dhcp-interface", SERVER_DEV, "--dhcp-range", "10.65.0.0-10.127.255.254",
                               "--log-level", "warn"], "bfbench_dhcp_bootfleet"),
        NsServer("kea-dhcp4", ["kea-dhcp4", "-c", str(kea_conf)], "bfbench_dhcp_kea"),
        NsServer("dnsmasq", ["dnsmasq", "-k", "--conf-file=/dev/null", "--port=0", f"--interface={SERVER_DEV}", "--bind-interfaces",
                             "--dhcp-range=10.65.0.0,10.127.255.254,255.192.0.0,1h", "--dhcp-lease-max=1000000",
                             f"--dhcp-leasefile={work / 'dnsmasq.leases'}", "--user=root", "--pid-file="], "bfbench_dhcp_dnsmasq"),
    ]


def stat(text: str, section: str, key: str) -> float:
    part = text.split(f"***Statistics for: {section}***", 1)
    if len(part) < 2:
        return 0.0
    match = re.search(rf"^{re.escape(key)}: ([0-9.]+)", part[1], re.M)
    return float(match.group(1)) if match else 0.0


def client_overflows() -> int:
    """Answers the client's own socket had no room for (UdpRcvbufErrors in its namespace)."""
    out = subprocess.run(["ip", "netns", "exec", CLIENT_NS, "nstat", "-az", "UdpRcvbufErrors"], capture_output=True, text=True).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("UdpRcvbufErrors"))


def run_rate(server: NsServer, rate: int, seconds: int) -> dict:
    overflows0 = client_overflows()
    cpu0, database_cpu0 = server.cpu_ns(), server.database_cpu_ns()
    out = subprocess.run(["taskset", "-c", "1", "ip", "netns", "exec", CLIENT_NS, "perfdhcp", "-4", "-l", CLIENT_DEV,
                          "-r", str(rate), "-R", "1000000", "-p", str(seconds), "-W", str(EXIT_WAIT_US), SERVER_IP],
                         capture_output=True, text=True, timeout=seconds + 61)
    database_cpu = (server.database_cpu_ns() - database_cpu0) / 1e9
    cpu = (server.cpu_ns() - cpu0) / 1e9 + database_cpu
    text = out.stdout
    acks = stat(text, "REQUEST-ACK", "received packets")
    report = {
        "server": server.name, "rate": rate, "seconds": seconds,
        "discovers": stat(text, "DISCOVER-OFFER", "sent packets"),
        "offers": stat(text, "DISCOVER-OFFER", "received packets"),
        "offer_drops": stat(text, "DISCOVER-OFFER", "drops"),
        "requests": stat(text, "REQUEST-ACK", "sent packets"),
        "acks": acks,
        "ack_drops": stat(text, "REQUEST-ACK", "drops"),
        "dora_per_s": acks / seconds,
        "server_cpu_s": cpu,
        "database_cpu_s": database_cpu,
        "cpu_us_per_dora": cpu * 1e6 / acks if acks else None,
        "avg_ack_delay_ms": stat(text, "REQUEST-ACK", "avg delay"),
        "client_overflows": client_overflows() - overflows0,
    }
    print(f"{server.name:10} rate {rate:>5}/s: {report['dora_per_s']:>7.0f} DORA/s, drops {report['offer_drops']:.0f}+{report['ack_drops']:.0f}, "
          f"cpu {cpu:.2f} s ({report['cpu_us_per_dora'] or 0:.0f} µs/DORA), client overflows {report['client_overflows']}", flush=True)
    return report


def markdown(results, command):
    lines = ["<!-- dhcp-compare:begin -->", "## DHCP: bootfleet against Kea and dnsmasq", "",
             f"Command: `{command}` (generated; do not edit by hand).", "",
             "perfdhcp in relay mode over a veth pair, new clients at a fixed rate, a /10 pool (4 million addresses, never near full); servers on core 0 (CPU from their cgroups), "
             "perfdhcp on core 1; every server persists leases to disk (`bootfleet` with an fdatasync per batch, `bootfleet-nosync` with `sync_leases = false`, written but not synced, as Kea's memfile and dnsmasq do). "
             f"perfdhcp waits {EXIT_WAIT_US // 1000} ms for answers after its last request; sockets get a {RMEM_DEFAULT >> 20} MiB receive buffer (`net.core.rmem_default`, restored afterwards) so that perfdhcp's own socket does not drop answers that arrive in a burst; "
             "*client overflows* counts those it dropped anyway (UdpRcvbufErrors in its namespace), which perfdhcp reports as drops.", "",
             "`bootfleet-postgres` writes its leases through to a PostgreSQL server on the same core (the shared lease table of several servers); its CPU includes PostgreSQL's, shown apart too.", "",
             "| offered rate /s | server | DORA/s completed | DISCOVER drops | REQUEST drops | client overflows | server CPU µs per DORA | of which database | avg ACK delay ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        per = f"{r['cpu_us_per_dora']:.0f}" if r["cpu_us_per_dora"] else "-"
        database = r.get("database_cpu_s", 0)
        of_which = f"{database * 1e6 / r['acks']:.0f}" if database and r["acks"] else "-"
        lines.append(f"| {r['rate']} | {r['server']} | {r['dora_per_s']:.0f} | {r['offer_drops']:.0f} | {r['ack_drops']:.0f} | {r['client_overflows']} | {per} | {of_which} | {r['avg_ack_delay_ms']:.2f} |")
    lines.append("<!-- dhcp-compare:end -->")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    parser.add_argument("--only", default="")
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark makes network namespaces and cgroups")
    for tool, package in [("perfdhcp", "kea-admin"), ("kea-dhcp4", "kea-dhcp4-server"), ("dnsmasq", "dnsmasq-base")]:
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            sh("apt-get", "install", "-y", "-q", "--no-install-recommends", package, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    subprocess.run(["systemctl", "stop", "kea-dhcp4-server"], stderr=subprocess.DEVNULL)
    Path("/run/kea").mkdir(exist_ok=True)  # Kea's PID file and logger lock live here
    sh("cargo", "build", "--release", "-p", "bootfleet", cwd=REPO)
    rates = [int(r) for r in args.rates.split(",")]
    results = []
    rmem_default = RMEM_SYSCTL.read_text().strip()
    RMEM_SYSCTL.write_text(str(max(RMEM_DEFAULT, int(rmem_default))))
    try:
        lab_up()
        work = Path(tempfile.mkdtemp(prefix="bootfleet-dhcp-bench-", dir="/var/tmp"))
        work.chmod(0o755)  # PostgreSQL (bootfleet-postgres) runs as its own user below it
        for server in servers(work):
            if args.only and server.name not in args.only.split(","):
                continue
            server.start()
            try:
                for rate in rates:
                    results.append(run_rate(server, rate, args.seconds))
            finally:
                server.stop()
    finally:
        lab_down()
        RMEM_SYSCTL.write_text(rmem_default)
    results.sort(key=lambda r: (r["rate"], r["server"]))
    command = f"sudo benches/dhcp_compare.py --seconds {args.seconds} --rates {args.rates}"
    write_section(Path(args.out), markdown(results, command), "dhcp-compare")
    print(f"table written into {args.out}")


if __name__ == "__main__":
    main()
