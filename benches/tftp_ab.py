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
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/bootfleet-bench")


def run_round(name: str, binary: str, port: int, args, extra) -> float:
    config = WORK / f"ab-{name}.toml"
    config.write_text(
        f'root = "{WORK}/root"\nworkers = 1\nengine = "io-uring"\n'
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
        subprocess.run(["taskset", "-c", "1", str(REPO / "target/release/bootfleet-loadtest"), "tftp",
                        "--server", f"127.0.0.1:{port}", "--file", args.file, "--verify", str(WORK / "root" / args.file),
                        "--clients", str(args.clients), "--max-transfers", str(args.clients * 2),
                        "--seconds", str(args.seconds), "--label", name, "--json", str(report), *extra],
                       check=True, capture_output=True)
        return json.loads(report.read_text())["goodput_mb_s"]
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
    print(f"{args.file}, {args.clients} clients, {' '.join(args.extra) or 'plain'}; MB/s over {args.rounds} alternating rounds")
    for name, values in results.items():
        print(f"  {name:10} median {statistics.median(values):7.1f}  range {min(values):.1f}-{max(values):.1f}  {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    main()
