#!/usr/bin/env python3
"""Multicast TFTP (RFC 2090) side by side: N clients fetch one file at once.

For 4, 16 and 64 clients (atftp, each in its own network namespace on one
bridge, as machines on a boot LAN) fetching a --size-mb file at the same
moment, measured in one run:

* bootfleet multicast (`atftp --option multicast`),
* bootfleet unicast (the same clients without the option),
* atftpd multicast (Debian's atftpd, unpacked so as not to replace tftpd-hpa, `--mcast-addr`),

and, as the yardstick of the issue's target, one unicast transfer of the file
to a single client. Reported: the bytes the server sent (its bridge's
transmit counter: a multicast datagram counts once however many ports it is
flooded to) and the time until every client holds the whole file (each
checked against the source with cmp).

The bridge and its links run a 9000-byte MTU and the clients ask for
8,192-byte blocks: atftp 0.8, client and server, cannot continue a multicast
transfer past block 65,535 (with 1,428-byte blocks a 100 MB file has 70,029).

Usage (as root, from the repository, after `cargo build --release`):
    benches/multicast_compare.py [--clients 4,16,64] [--size-mb 100] [--blksize 8192]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tftp_compare import REPO, installed, unpacked_atftpd, write_section  # noqa: E402

SERVER_NS = "bfmcb-s"
# A jumbo-frame boot LAN: atftp 0.8 (client and server) cannot continue a
# multicast transfer past block 65,535, so a 100 MB file needs blocks larger
# than a 1500-byte MTU allows (8,192-byte blocks: 12,208 of them).
MTU = 9000
SERVER_IP = "10.96.0.1"
BOOTFLEET = REPO / "target/release/bootfleet"


def sh(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, **kw)


def client_ns(i: int) -> str:
    return f"bfmcb-c{i}"


def lab_down(clients: int):
    for ns in [SERVER_NS] + [client_ns(i) for i in range(clients)]:
        subprocess.run(f"ip netns pids {ns} 2>/dev/null | xargs -r kill -9", shell=True)
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def lab_up(clients: int):
    lab_down(clients)
    sh("ip", "netns", "add", SERVER_NS)
    sh("ip", "-n", SERVER_NS, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
    sh("ip", "-n", SERVER_NS, "link", "set", "br0", "mtu", str(MTU))
    sh("ip", "-n", SERVER_NS, "addr", "add", f"{SERVER_IP}/16", "dev", "br0")
    sh("ip", "-n", SERVER_NS, "link", "set", "br0", "up")
    sh("ip", "-n", SERVER_NS, "link", "set", "lo", "up")
    sh("ip", "-n", SERVER_NS, "route", "add", "224.0.0.0/4", "dev", "br0")
    for i in range(clients):
        ns, port, nic = client_ns(i), f"bfmcbp{i}", f"bfmcbn{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", port, "mtu", str(MTU), "type", "veth", "peer", "name", nic, "mtu", str(MTU))
        sh("ip", "link", "set", port, "netns", SERVER_NS)
        sh("ip", "link", "set", nic, "netns", ns)
        sh("ip", "-n", SERVER_NS, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"10.96.1.{10 + i}/16", "dev", nic)
        sh("ip", "-n", ns, "link", "set", nic, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", nic)


def tx_bytes() -> int:
    out = subprocess.run(["ip", "netns", "exec", SERVER_NS, "cat", "/sys/class/net/br0/statistics/tx_bytes"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


class Server:
    def __init__(self, name: str, argv: list, work: Path):
        self.name = name
        self.log = open(work / f"{name.replace(' ', '_')}.log", "w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", SERVER_NS, *map(str, argv)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(1.0)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{name} did not start; see {self.log.name}")

    def stop(self):
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()


def fetch(clients: int, multicast: bool, source: Path, out_dir: Path, blksize: int, time_limit: int) -> dict:
    """All clients at once; returns wall time, bytes sent, failures."""
    for f in out_dir.glob("*"):
        f.unlink()
    options = ["--option", f"blksize {blksize}"] + (["--option", "multicast"] if multicast else [])
    before = tx_bytes()
    start = time.monotonic()
    procs = []
    for i in range(clients):
        out = out_dir / f"c{i}.bin"
        procs.append((out, subprocess.Popen(
            ["timeout", str(time_limit), "ip", "netns", "exec", client_ns(i), "atftp", *options, "-g", "-r",
             source.name, "-l", str(out), SERVER_IP], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    finished = []
    for out, proc in procs:
        proc.wait()
        finished.append(time.monotonic() - start)
    wall = max(finished)
    sent = tx_bytes() - before
    failed = 0
    for out, proc in procs:
        ok = proc.returncode == 0 and out.exists() and \
            subprocess.run(["cmp", "-s", str(source), str(out)]).returncode == 0
        failed += 0 if ok else 1
        if out.exists():
            out.unlink()
    return {"clients": clients, "seconds": wall, "bytes_sent": sent, "failed": failed}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", default="4,16,64")
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--blksize", type=int, default=8192)
    parser.add_argument("--time-limit", type=int, default=600)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if not installed("atftp"):
        sh("apt-get", "install", "-y", "-q", "atftp", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})

    work = Path(tempfile.mkdtemp(prefix="bfmcb-"))
    atftpd = unpacked_atftpd(work)
    root = work / "boot"
    root.mkdir()
    source = root / "image.bin"
    with open(source, "wb") as f:
        f.write(os.urandom(args.size_mb * 1_000_000))
    # Client files on tmpfs: up to 64 copies of the file at once.
    out_dir = Path(tempfile.mkdtemp(prefix="bfmcb-out-", dir="/dev/shm"))
    config = work / "bootfleet.toml"
    config.write_text('[tftp]\nmax_blksize = 65464\nmulticast_groups = "239.255.98.1-239.255.98.16"\nmulticast_port = 1758\n'
                      '[log]\nlevel = "warn"\n')
    stacks = [
        ("bootfleet multicast", True,
         [BOOTFLEET, "serve", "--panel-listen", "off", "--config", config, "--root", root, "--state-dir",
          work / "state", "--tftp-listen", f"{SERVER_IP}:69", "--http-listen", "127.0.0.1:8099"]),
        ("bootfleet unicast", False,
         [BOOTFLEET, "serve", "--panel-listen", "off", "--config", config, "--root", root, "--state-dir",
          work / "state", "--tftp-listen", f"{SERVER_IP}:69", "--http-listen", "127.0.0.1:8099"]),
        ("atftpd multicast", True,
         [atftpd, "--daemon", "--no-fork", "--logfile", "-", "--user", "root.root", "--bind-address", SERVER_IP,
          "--port", "69", "--mcast-addr", "239.255.99.1-16", "--mcast-port", "1758", "--mcast-ttl", "1",
          "--maxthread", "256", root]),
    ]
    results = {}
    lab_up(max(counts))
    try:
        # The yardstick: one unicast transfer, from bootfleet.
        server = Server("bootfleet single", stacks[1][2], work)
        try:
            results["single"] = fetch(1, False, source, out_dir, args.blksize, args.time_limit)
        finally:
            server.stop()
        print("one unicast transfer:", results["single"], flush=True)
        for name, multicast, argv in stacks:
            server = Server(name, argv, work)
            try:
                for n in counts:
                    r = fetch(n, multicast, source, out_dir, args.blksize, args.time_limit)
                    results[(name, n)] = r
                    print(name, r, flush=True)
            finally:
                server.stop()
    finally:
        lab_down(max(counts))
        shutil.rmtree(out_dir, ignore_errors=True)
    write(results, args, counts, source.stat().st_size)


def write(results: dict, args, counts, size: int):
    single = results["single"]
    lines = [
        "<!-- multicast-compare:begin -->",
        "## Multicast TFTP: bootfleet against atftpd (issue 8)",
        "",
        f"Command: `sudo benches/multicast_compare.py --clients {args.clients} --size-mb {args.size_mb} "
        f"--blksize {args.blksize}` (run of {time.strftime('%Y-%m-%d')}, 2 cores). Clients: atftp 0.8, each in its "
        f"own network namespace on one bridge (MTU {MTU}: atftp cannot go past block 65,535 in multicast, so the "
        "file goes in 8,192-byte blocks), all started at once; every copy checked with cmp. Bytes sent: the "
        "server's bridge transmit counter (a multicast datagram counts once). One unicast transfer of the file "
        f"to a single client took {single['seconds']:.2f} s.",
        "",
        "| clients | server | time until all done | × one unicast transfer | bytes sent | × file size | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in counts:
        for name in ["bootfleet multicast", "atftpd multicast", "bootfleet unicast"]:
            r = results.get((name, n))
            if not r:
                continue
            lines.append(f"| {n} | {name} | {r['seconds']:.2f} s | {r['seconds'] / single['seconds']:.2f} | "
                         f"{r['bytes_sent'] / 1e6:,.0f} MB | {r['bytes_sent'] / size:.2f} | {r['failed']} |")
    lines.append("<!-- multicast-compare:end -->")
    write_section(REPO / "docs/benchmarks.md", "\n".join(lines), "multicast-compare")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
