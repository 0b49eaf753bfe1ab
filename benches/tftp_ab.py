#!/usr/bin/env python3
"""One TFTP point, two bootfleet builds, alternating rounds.

`tftp_compare.py` measures its servers one after the other, so a build
measured first or last carries whatever the machine was doing then; on
this VM that moved single points by 5-10%. This script starts each build
afresh for every round, alternates which goes first, and prints each
build's median and range, so that "is this point slower?" is answered
by paired rounds rather than by one pass:

    sudo benches/tftp_ab.py --baseline /tmp/bootfleet-2fb4815 --clients 512 --rounds 6 -- --blksize 1468 --windowsize 8

Server on core 0 with one worker, client on core 1, as in
`tftp_compare.py`; files and state under /tmp/bootfleet-bench (made by
`tftp_compare.py`, or here when missing). Arguments after `--` go to
`bootfleet-loadtest tftp`.

Each round also reports the server's CPU-seconds per GB delivered (its
process's user + system time over the bytes the clients received and
checked). On loopback that CPU includes the receiving sockets' delivery,
which the kernel runs in the sender's context (about a third of it at the
windowed 70 KB point, by `perf`); on a LAN it runs on the clients.
`--engine epoll` measures the fallback engine; `--per-client N` lets each
client fetch the file N times (the default 2 is short for a 70 KB file).
With `--section NAME`, the result is also written as a table into
docs/benchmarks.md (or `--out`) under the heading `### NAME`.
"""
import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/bootfleet-bench")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_round(name: str, binary: str, port: int, args, extra):
    """One round: (MB/s, server CPU-s per GB)."""
    config = WORK / f"ab-{name}.toml"
    config.write_text(
        f'root = "{WORK}/root"\nworkers = 1\nengine = "{args.engine}"\n'
        f'[tftp]\nlisten = "127.0.0.1:{port}"\nmax_transfers = 100000\nmax_transfers_per_client = 100000\n'
        f'[inventory]\nstate_dir = "{WORK}/ab-state-{name}"\n[log]\nlevel = "warn"\n'
    )
    server = subprocess.Popen(["taskset", "-c", "0", binary, "serve", "--panel-listen", "off", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.7)
        if server.poll() is not None:
            sys.exit(f"{binary} exited at start; run it by hand with --config {config} to see why")
        report = WORK / "ab-point.json"
        cpu_before = cpu_seconds(server.pid)
        subprocess.run(["taskset", "-c", "1", str(REPO / "target/release/bootfleet-loadtest"), "tftp",
                        "--server", f"127.0.0.1:{port}", "--file", args.file, "--verify", str(WORK / "root" / args.file),
                        "--clients", str(args.clients), "--max-transfers", str(args.clients * args.per_client),
                        "--seconds", str(args.seconds), "--label", name, "--json", str(report), *extra],
                       check=True, capture_output=True)
        cpu = cpu_seconds(server.pid) - cpu_before
        point = json.loads(report.read_text())
        if point["transfers_failed"]:
            sys.exit(f"{name}: {point['transfers_failed']} transfers failed: {point['failures'][:3]}")
        return point["goodput_mb_s"], cpu / (point["bytes_received"] / 1e9)
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        server.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the earlier bootfleet binary")
    parser.add_argument("--clients", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--file", default="10m.bin", help="70k.bin or 10m.bin")
    parser.add_argument("--engine", default="io-uring", choices=["io-uring", "epoll"])
    parser.add_argument("--per-client", type=int, default=2, help="transfers per client (bounds the load)")
    parser.add_argument("--section", default="", help="also write the table under this heading of --out")
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    parser.add_argument("extra", nargs="*", help="bootfleet-loadtest tftp options (after --)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (as tftp_compare.py): the servers are pinned and need the file limit raised")
    subprocess.run(["cargo", "build", "--release", "--workspace"], cwd=REPO, check=True)
    if not (WORK / "root" / args.file).exists():
        sys.exit(f"{WORK / 'root' / args.file} is missing: run benches/tftp_compare.py --quick once first")
    builds = {"this build": (str(REPO / "target/release/bootfleet"), 6903), "baseline": (args.baseline, 6905)}
    results = {name: [] for name in builds}
    for round_number in range(args.rounds):
        order = list(builds) if round_number % 2 == 0 else list(reversed(builds))
        for name in order:
            binary, port = builds[name]
            results[name].append(run_round(name.replace(" ", "-"), binary, port, args, args.extra))
    title = (f"{args.file}, {args.clients} clients x {args.per_client}, {' '.join(args.extra) or 'plain'}, "
             f"{args.engine} engine; {args.rounds} alternating rounds")
    rows = []
    for name, rounds in results.items():
        rates = [r[0] for r in rounds]
        cpus = [r[1] for r in rounds]
        rows.append((name, statistics.median(rates), min(rates), max(rates),
                     statistics.median(cpus), min(cpus), max(cpus)))
    print(title)
    for name, rate, rate_lo, rate_hi, cpu, cpu_lo, cpu_hi in rows:
        print(f"  {name:10} MB/s median {rate:7.1f} ({rate_lo:.1f}-{rate_hi:.1f})   "
              f"CPU-s/GB median {cpu:.2f} ({cpu_lo:.2f}-{cpu_hi:.2f})")
    if args.section:
        command = "sudo benches/tftp_ab.py " + shlex.join(sys.argv[1:])
        table = [f"### {args.section}", "", f"Command: `{command}`", "", title + ":", "",
                 "| build | MB/s, median (range) | server CPU-s/GB, median (range) |", "|---|---:|---:|"]
        for name, rate, rate_lo, rate_hi, cpu, cpu_lo, cpu_hi in rows:
            label = "this build" if name == "this build" else f"baseline `{Path(args.baseline).name}`"
            table.append(f"| {label} | {rate:.1f} ({rate_lo:.1f}-{rate_hi:.1f}) | {cpu:.2f} ({cpu_lo:.2f}-{cpu_hi:.2f}) |")
        replace_section(Path(args.out), f"### {args.section}", "\n".join(table) + "\n")


def replace_section(path: Path, heading: str, text: str):
    """Puts `text` in place of the section that starts with `heading`
    (up to the next heading of the same or a higher level), or at the end."""
    lines = path.read_text().splitlines(keepends=True)
    level = heading.split(" ")[0]
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        path.write_text("".join(lines).rstrip("\n") + "\n\n" + text)
        return
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i].split(" ")[0]) <= len(level)), len(lines))
    path.write_text("".join(lines[:start]) + text + "\n" + "".join(lines[end:]))


if __name__ == "__main__":
    main()
