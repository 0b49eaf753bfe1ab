#!/usr/bin/env python3
"""Side-by-side TFTP benchmark: bootfleet, tftp-hpa (in.tftpd), dnsmasq and atftpd.

All four servers run in the same run, on loopback, each pinned to core 0 and
placed in its own cpuacct cgroup (so CPU is counted over every process and
thread a server has, forked children included); the client,
`bootfleet-loadtest tftp`, is pinned to core 1 and verifies every byte.

Usage (as root, from the repository):
    benches/tftp_compare.py [--quick] [--seconds S] [--out docs/benchmarks.md]

Every point is bounded: at most S seconds and a bounded number of transfers.
Transfers still running at the time limit are cut; their bytes count towards
goodput but not towards transfer times. Results: a JSON file and a Markdown
section written into docs/benchmarks.md between marker comments.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CGROOT = Path("/sys/fs/cgroup/cpuacct")
FILES = [("70k.bin", 70_000), ("10m.bin", 10_000_000), ("100m.bin", 100_000_000)]
CLIENTS = [1, 16, 128, 512, 2048]
OPTION_SETS = [
    ("plain", []),
    ("blksize 1468", ["--blksize", "1468"]),
    ("blksize 1468 + windowsize 8", ["--blksize", "1468", "--windowsize", "8"]),
]


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def installed(package: str) -> bool:
    """Whether the Debian package is installed (a file test is not enough:
    installing atftpd turns /usr/sbin/in.tftpd into a link to atftpd)."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.endswith("install ok installed")


def unpacked_atftpd(work: Path) -> str:
    """atftpd unpacked into `work`: as a package it conflicts with tftpd-hpa
    and would replace in.tftpd for every other benchmark."""
    atftpd = work / "atftpd-pkg/usr/sbin/atftpd"
    if not atftpd.exists():
        sh("apt-get", "download", "atftpd", cwd=work)
        deb = next(work.glob("atftpd_*.deb"))
        sh("dpkg", "-x", str(deb), str(work / "atftpd-pkg"))
    return str(atftpd)


def ensure_peers(work: Path) -> dict:
    """Installs the peers (in.tftpd, dnsmasq) and unpacks atftpd."""
    need = [p for p in ["tftpd-hpa", "dnsmasq-base"] if not installed(p)]
    if need:
        sh("apt-get", "update", "-q")
        sh("apt-get", "install", "-y", "-q", "--no-install-recommends", *need, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return {"in.tftpd": "/usr/sbin/in.tftpd", "dnsmasq": "/usr/sbin/dnsmasq", "atftpd": unpacked_atftpd(work)}


def make_files(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    for name, size in FILES:
        path = root / name
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                f.write(os.urandom(size))


class Server:
    def __init__(self, name, argv, addr, cgroup):
        self.name, self.argv, self.addr = name, argv, addr
        self.cgroup = CGROOT / cgroup
        self.proc = None

    def start(self):
        self.cgroup.mkdir(exist_ok=True)
        # Enter the cgroup first, then exec the server pinned to core 0, so
        # that every process and thread it ever has is counted.
        script = f'echo $$ > {self.cgroup}/cgroup.procs && exec taskset -c 0 "$@"'
        self.proc = subprocess.Popen(["sh", "-c", script, "sh", *self.argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.7)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited at start: {self.argv}")

    def cpu_ns(self) -> int:
        return int((self.cgroup / "cpuacct.usage").read_text())

    def stop(self):
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Forked children (in.tftpd) may linger briefly.
        for _ in range(50):
            procs = (self.cgroup / "cgroup.procs").read_text().split()
            if not procs:
                break
            for pid in procs:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        try:
            self.cgroup.rmdir()
        except OSError:
            pass


def servers(peers, root: Path, work: Path, baseline: str = ""):
    def bootfleet(name, binary, port):
        config = work / f"{name}.toml"
        config.write_text(
            f'root = "{root}"\nworkers = 1\nengine = "io-uring"\n'
            f"[tftp]\nlisten = \"127.0.0.1:{port}\"\nmax_transfers = 100000\nmax_transfers_per_client = 100000\n"
            f'[inventory]\nstate_dir = "{work}/state-{name}"\n'
            "[log]\nlevel = \"warn\"\n"
        )
        return Server(name, [binary, "serve", "--panel-listen", "off", "--config", str(config)], f"127.0.0.1:{port}", f"bfbench_{name.replace('-', '_')}")

    # --baseline BINARY: an earlier build of bootfleet measured beside this
    # one, point by point, to show a change made nothing slower.
    extra = [bootfleet("bootfleet-baseline", baseline, 6905)] if baseline else []
    return extra + [
        bootfleet("bootfleet", str(REPO / "target/release/bootfleet"), 6903),
        Server("tftp-hpa", [peers["in.tftpd"], "-L", "-a", "127.0.0.1:6901", "-s", "-u", "root", "-B", "65464", str(root)], "127.0.0.1:6901", "bfbench_tftphpa"),
        # dnsmasq's TFTP port is fixed at 69, so it gets an address of its own.
        Server("dnsmasq", [peers["dnsmasq"], "-k", "--conf-file=/dev/null", "--port=0", "--enable-tftp", f"--tftp-root={root}",
                           "--listen-address=127.0.0.53", "--bind-interfaces", "--tftp-max=65535", "--user=root", "--pid-file="], "127.0.0.53:69", "bfbench_dnsmasq"),
        Server("atftpd", [peers["atftpd"], "--daemon", "--no-fork", "--port", "6902", "--bind-address", "127.0.0.1", "--maxthread", "4096",
                          "--user", "root", "--group", "root", "--logfile", "/dev/null", "--verbose=1", str(root)], "127.0.0.1:6902", "bfbench_atftpd"),
    ]


def run_point(server, loadtest, root, name, size, clients, opt_args, seconds, out: Path):
    per_client = 8 if size < 1_000_000 else (2 if size < 50_000_000 else 1)
    max_transfers = max(clients * per_client, 4)
    cpu_before = server.cpu_ns()
    result = subprocess.run(
        ["taskset", "-c", "1", loadtest, "tftp", "--server", server.addr, "--file", name, "--verify", str(root / name),
         "--clients", str(clients), "--max-transfers", str(max_transfers), "--seconds", str(seconds), "--label", server.name,
         "--json", str(out), *opt_args],
        capture_output=True, text=True,
    )
    cpu_s = (server.cpu_ns() - cpu_before) / 1e9
    report = json.loads(out.read_text())
    gb = report["bytes_received"] / 1e9
    report["server_cpu_s"] = round(cpu_s, 3)
    report["cpu_s_per_gb"] = round(cpu_s / gb, 2) if gb > 0 else None
    print(result.stdout.rstrip(), f"| server CPU {cpu_s:.2f} s, {report['cpu_s_per_gb']} CPU-s/GB", flush=True)
    return report


def markdown(results, command, seconds):
    lines = [
        "<!-- tftp-compare:begin -->",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}: server on core 0, client on core 1, "
        f"loopback, each point bounded to {seconds} s. Goodput counts every verified byte received; "
        "p50/p99 are over completed transfers; *cut* = transfers stopped by the time limit; "
        "*retried* = transfers whose first request had to be sent again.",
        "",
    ]
    for name, _ in FILES:
        for label, _ in OPTION_SETS:
            order = {server: i for i, server in enumerate(["bootfleet", "tftp-hpa", "dnsmasq", "atftpd"])}
            rows = sorted((r for r in results if r["file"] == name and r["options_label"] == label),
                          key=lambda r: (r["clients"], order.get(r["label"], 9)))
            if not rows:
                continue
            lines += [f"#### {name}, {label}", "",
                      "| clients | server | MB/s | xfer/s | p50 ms | p99 ms | CPU-s/GB | failed | cut | retried |",
                      "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                fmt = lambda v: "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))
                lines.append(f"| {r['clients']} | {r['label']} | {r['goodput_mb_s']:.1f} | {r['transfers_per_s']:.1f} | {fmt(r['p50_ms'])} | "
                             f"{fmt(r['p99_ms'])} | {fmt(r['cpu_s_per_gb'])} | {r['transfers_failed']} | {r['transfers_cut_by_time_limit']} | {r['first_requests_retried']} |")
            lines.append("")
    lines.append("<!-- tftp-compare:end -->")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1, 128 and 512 clients; 70k and 10m files")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    parser.add_argument("--only", default="", help="comma-separated server names, measured in that order")
    parser.add_argument("--from-json", help="rewrite the tables from a results.json of an earlier run")
    parser.add_argument("--baseline", default="", help="an earlier bootfleet binary, measured beside this one as bootfleet-baseline")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        command = "sudo benches/tftp_compare.py" + (" --quick" if args.quick else "") + f" --seconds {args.seconds:g}"
        write_section(Path(args.out), markdown(results, command, args.seconds))
        return
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark pins processes and makes cpuacct cgroups")
    if not CGROOT.exists():
        sys.exit(f"{CGROOT} is missing: a cpuacct cgroup hierarchy is needed to count server CPU")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sh("cargo", "build", "--release", "--workspace", cwd=REPO)
    work = Path(tempfile.gettempdir()) / "bootfleet-bench"
    work.mkdir(exist_ok=True)
    peers = ensure_peers(work)
    root = work / "root"
    make_files(root)
    loadtest = str(REPO / "target/release/bootfleet-loadtest")
    files = FILES[:2] if args.quick else FILES
    clients_list = [1, 128, 512] if args.quick else CLIENTS
    results = []
    chosen = servers(peers, root, work, args.baseline)
    if args.only:
        # In the order given, so that a comparison can be rerun with its
        # servers' order swapped (the first measured often gains a little).
        by_name = {s.name: s for s in chosen}
        chosen = [by_name[name] for name in args.only.split(",") if name in by_name]
    for server in chosen:
        server.start()
        try:
            for name, size in files:
                for label, opt_args in OPTION_SETS:
                    for clients in clients_list:
                        report = run_point(server, loadtest, root, name, size, clients, opt_args, args.seconds, work / "point.json")
                        report["options_label"] = label
                        results.append(report)
        finally:
            server.stop()
    (work / "results.json").write_text(json.dumps(results, indent=1))
    command = "sudo benches/tftp_compare.py" + (" --quick" if args.quick else "") + f" --seconds {args.seconds:g}"
    write_section(Path(args.out), markdown(results, command, args.seconds))
    print(f"results: {work / 'results.json'}; table written into {args.out}")


def remove_cgroup(cgroup: Path):
    """Removes a cpuacct cgroup once its processes are gone (waiting up to
    5 s for them to leave; a cgroup still in use is left)."""
    for _ in range(50):
        if not cgroup.exists() or not (cgroup / "cgroup.procs").read_text().split():
            break
        time.sleep(0.1)
    try:
        cgroup.rmdir()
    except OSError:
        pass


def write_section(out: Path, section: str, name: str = "tftp-compare"):
    """Replaces the generated section `name` of `out` (between its
    `<!-- name:begin -->` and `<!-- name:end -->` markers), or appends it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = out.read_text() if out.exists() else ""
    if begin in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text += "\n" + section + "\n"
    out.write_text(text)


if __name__ == "__main__":
    main()
