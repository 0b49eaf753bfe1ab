#!/usr/bin/env python3
"""Side-by-side power-on storm: bootfleet against the stack most sites run.

The same storm of simulated machines (bootfleet-loadtest storm: DHCP as PXE
firmware and as iPXE through a relay agent, the loader over TFTP, the chain
script and the machine's script over HTTP, kernel and initrd, every byte
checked) is run against

* bootfleet (DHCP full mode, TFTP, HTTP, rendered scripts), and
* dnsmasq (DHCP with the same boot answers), tftp-hpa (in.tftpd) and nginx
  serving the same per-MAC scripts as static files (rendered by bootfleet
  beforehand, as an operator keeps them in the classic layout),

inside one network namespace the script creates and removes (everything on
its loopback). Each stack's CPU is counted in its own cpuacct cgroup.

Workloads (all machines powered on at once):
* boot:   --machines machines, 70 KB loader, --kernel-mb kernel, --initrd-mb initrd;
* script: --script-machines machines, 70 KB loader and their script only;
* dhcp:   --dhcp-machines machines, the firmware's DHCP exchange only.

Usage (as root, from the repository):
    benches/storm_compare.py [--machines 1000] [--kernel-mb 10] [--initrd-mb 50]
                             [--script-machines 5000] [--dhcp-machines 10000]
                             [--time-limit 300] [--only boot,script,dhcp]
                             [--stacks bootfleet,reference] [--baseline EARLIER_BINARY]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tftp_compare import CGROOT, REPO, installed, remove_cgroup, sh, write_section  # noqa: E402

NS = "bfstormb"
RELAY_RANGE = "127.1.0.10-127.1.255.250/16"
LOADTEST = REPO / "target/release/bootfleet-loadtest"
BOOTFLEET = REPO / "target/release/bootfleet"


def mac(i: int) -> str:
    n = i.to_bytes(4, "big")
    return "02:bf:" + ":".join(f"{b:02x}" for b in n)


def ns_up():
    ns_down()
    sh("ip", "netns", "add", NS)
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    # tftp-hpa resolves its listen address with AI_ADDRCONFIG, which finds
    # nothing in a namespace whose only address is loopback: a veth pair
    # inside the namespace with a link-local address (nothing is ever sent
    # to it) satisfies it.
    sh("ip", "-n", NS, "link", "add", "bfsb0", "type", "veth", "peer", "name", "bfsb1")
    sh("ip", "-n", NS, "addr", "add", "169.254.99.1/32", "dev", "bfsb0")
    sh("ip", "-n", NS, "link", "set", "bfsb0", "up")


def ns_down():
    subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL)


class Stack:
    """Processes started in the namespace, in one cgroup."""

    def __init__(self, name: str):
        self.name = name
        self.cgroup = CGROOT / f"bfbench_storm_{name.replace(' ', '_').replace('+', '')}"
        self.procs = []

    def spawn(self, argv, log: Path):
        self.cgroup.mkdir(exist_ok=True)
        script = f'echo $$ > {self.cgroup}/cgroup.procs && exec ip netns exec {NS} "$@"'
        with open(log, "w") as out:
            self.procs.append(subprocess.Popen(["sh", "-c", script, "sh", *map(str, argv)], stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True))

    def cpu_s(self) -> float:
        return int((self.cgroup / "cpuacct.usage").read_text()) / 1e9

    def stop(self):
        for proc in self.procs:
            try:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)
                proc.wait()
        self.procs = []
        remove_cgroup(self.cgroup)


def wait_http(url: str):
    for _ in range(100):
        if subprocess.run(["ip", "netns", "exec", NS, "curl", "-sf", "-o", "/dev/null", url]).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


def make_root(work: Path, machines: int, kernel_mb: int, initrd_mb: int) -> Path:
    root = work / "boot"
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name, size in [("undionly.kpxe", 70_000), ("ipxe.efi", 70_000),
                       ("img/vmlinuz", kernel_mb * 1_000_000), ("img/initrd.gz", initrd_mb * 1_000_000)]:
        path = root / name
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                f.write(os.urandom(size))
    lines = ['[images.node]', 'kernel = "img/vmlinuz"', 'initrds = ["img/initrd.gz"]', 'cmdline = "console=ttyS0"', ""]
    for i in range(machines):
        lines += [f'[machines."{mac(i)}"]', 'image = "node"']
    (root / "inventory.toml").write_text("\n".join(lines) + "\n")
    return root


def start_bootfleet(work: Path, root: Path, binary: Path = BOOTFLEET, name: str = "bootfleet") -> Stack:
    config = work / "bootfleet.toml"
    # One relay carries every simulated machine, as a real relay carries a
    # rack: the per-source limit guards against one host, not one relay.
    config.write_text("[dhcp]\nmax_requests_per_second_per_source = 10000000\n[log]\nlevel = \"warn\"\n")
    stack = Stack(name)
    stack.spawn([binary, "serve", "--panel-listen", "off", "--config", config, "--root", root, "--state-dir", work / "bootfleet-state",
                 "--tftp-listen", "127.0.0.1:69", "--http-listen", "127.0.0.1:80",
                 "--dhcp-mode", "full", "--dhcp-interface", "lo", "--dhcp-range", RELAY_RANGE], work / f"{name}.log")
    wait_http("http://127.0.0.1/boot.ipxe")
    return stack


def render_scripts(work: Path, root: Path, machines: int) -> Path:
    """The scripts bootfleet renders, saved as static files for nginx."""
    web = work / "web"
    (web / "boot").mkdir(parents=True, exist_ok=True)
    for name in ["img", "undionly.kpxe", "ipxe.efi"]:
        link = web / name
        if not link.exists():
            link.symlink_to(root / name)
    code = (
        "import sys, urllib.request\n"
        "web, n = sys.argv[1], int(sys.argv[2])\n"
        "open(web + '/boot.ipxe', 'wb').write(urllib.request.urlopen('http://127.0.0.1/boot.ipxe').read())\n"
        "for i in range(n):\n"
        "    m = '02:bf:' + ':'.join('%02x' % b for b in i.to_bytes(4, 'big'))\n"
        "    open(web + '/boot/' + m + '.ipxe', 'wb').write(urllib.request.urlopen('http://127.0.0.1/boot/' + m + '.ipxe').read())\n"
    )
    sh("ip", "netns", "exec", NS, "python3", "-c", code, str(web), str(machines))
    return web


def start_reference(work: Path, root: Path, web: Path) -> Stack:
    stack = Stack("dnsmasq + tftp-hpa + nginx")
    conf = work / "nginx.conf"
    conf.write_text(
        f"user root;\nworker_processes 1;\nmaster_process off;\ndaemon off;\nerror_log stderr;\npid {work}/nginx.pid;\n"
        "events { worker_connections 16384; }\n"
        "http { sendfile on; tcp_nopush on; access_log off; default_type application/octet-stream;\n"
        "  types { text/plain ipxe; }\n"
        f"  server {{ listen 127.0.0.1:80 backlog=4096; root {web}; location / {{ }} }} }}\n")
    stack.spawn(["/usr/sbin/nginx", "-c", conf, "-p", work], work / "nginx.log")
    stack.spawn(["/usr/sbin/in.tftpd", "-L", "-a", "127.0.0.1:69", "-s", "-u", "root", "-B", "65464", root], work / "tftpd.log")
    stack.spawn(["dnsmasq", "-k", "--conf-file=/dev/null", "--port=0", "--interface=lo", "--bind-interfaces",
                 "--dhcp-range=127.1.0.10,127.1.255.250,255.255.0.0,1h", "--dhcp-lease-max=10000000",
                 f"--dhcp-leasefile={work / 'dnsmasq.leases'}", "--dhcp-userclass=set:ipxe,iPXE",
                 "--dhcp-match=set:efi64,option:client-arch,7", "--dhcp-boot=tag:ipxe,http://127.0.0.1/boot.ipxe",
                 "--dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi", "--dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe",
                 # On loopback every 127/8 address answers a ping, so dnsmasq's ping
                 # check would find every address taken.
                 "--no-ping", "--user=root", "--pid-file="], work / "dnsmasq.log")
    wait_http("http://127.0.0.1/boot.ipxe")
    time.sleep(0.5)
    return stack


def storm(stack: Stack, work: Path, root: Path, workload: str, machines: int, time_limit: int) -> dict:
    json_path = work / f"{workload}-{stack.name.split()[0]}.json"
    stop_after = {"boot": "initrd", "script": "script", "dhcp": "dhcp"}[workload]
    cpu0 = stack.cpu_s()
    out = subprocess.run(["ip", "netns", "exec", NS, LOADTEST, "storm", "--server", "127.0.0.1", "--machines", str(machines),
                          "--root", root, "--stop-after", stop_after, "--threads", "2", "--time-limit", str(time_limit),
                          "--label", stack.name, "--json", json_path, "--chart", work / f"{workload}-{stack.name.split()[0]}.html"],
                         capture_output=True, text=True)
    cpu = stack.cpu_s() - cpu0
    print(out.stdout, out.stderr, flush=True)
    report = json.loads(json_path.read_text())
    report["server_cpu_s"] = cpu
    report["workload"] = workload
    return report


def p99_cell(phases: dict, phase: str) -> str:
    """A phase's p99 in ms for a results table, or "-" where it was not seen."""
    return f"{phases[phase]['p99_ms']:.0f}" if phase in phases else "-"


def markdown(results, command) -> str:
    lines = ["<!-- storm-compare:begin -->", "## Power-on storm: bootfleet against dnsmasq + tftp-hpa + nginx", "",
             f"Command: `{command}` (generated; do not edit by hand).", "",
             "All machines powered on at once by `bootfleet-loadtest storm` (2 threads) in a namespace's loopback, "
             "every byte checked; the stack's CPU from its cgroup. Times are seconds from power-on; phase columns are p99.", "",
             "| workload | stack | machines | booted | failed / cut | storm s | p99 DHCP ms | p99 loader ms | p99 script ms | p99 total ms | server CPU s | storm vs reference |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_workload = {}
    for r in results:
        by_workload.setdefault(r["workload"], []).append(r)
    for workload, rows in by_workload.items():
        reference = next((r for r in rows if r["label"].startswith("dnsmasq")), None)
        for r in rows:
            p = r["phases"]
            def cell(phase, p=p):
                return p99_cell(p, phase)
            ratio = f"{reference['seconds'] / r['seconds']:.2f}× faster" if reference and r is not reference else "-"
            lines.append(f"| {workload} | {r['label']} | {r['machines']} | {r['booted']} | {r['failed']} / {r['cut']} | "
                         f"{r['seconds']:.2f} | {cell('dhcp')} | {cell('loader')} | {cell('script')} | {cell('total')} | "
                         f"{r['server_cpu_s']:.1f} | {ratio} |")
    lines.append("<!-- storm-compare:end -->")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--kernel-mb", type=int, default=10)
    parser.add_argument("--initrd-mb", type=int, default=50)
    parser.add_argument("--script-machines", type=int, default=5000)
    parser.add_argument("--dhcp-machines", type=int, default=10000)
    parser.add_argument("--time-limit", type=int, default=300)
    parser.add_argument("--only", default="boot,script,dhcp")
    parser.add_argument("--stacks", default="bootfleet,reference",
                        help="which stacks to run (a trial run of one side; the ratio needs both)")
    parser.add_argument("--baseline", default="",
                        help="an earlier bootfleet binary, stormed beside this one as bootfleet-baseline")
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark makes a network namespace and cgroups")
    for package in ["nginx-light", "tftpd-hpa", "dnsmasq-base", "curl"]:
        if not installed(package):
            sh("apt-get", "install", "-y", "-q", "--no-install-recommends", package,
               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    subprocess.run(["systemctl", "stop", "tftpd-hpa", "nginx"], stderr=subprocess.DEVNULL)
    sh("cargo", "build", "--release", "--workspace", cwd=REPO)
    work = Path(tempfile.mkdtemp(prefix="bootfleet-storm-bench-", dir="/var/tmp"))
    workloads = [w for w in ["boot", "script", "dhcp"] if w in args.only.split(",")]
    stacks = args.stacks.split(",")
    counts = {"boot": args.machines, "script": args.script_machines, "dhcp": args.dhcp_machines}
    most = max(counts[w] for w in workloads)
    root = make_root(work, most, args.kernel_mb, args.initrd_mb)
    results = []
    ns_up()
    try:
        for workload in workloads:
            # A fresh lease database per run: every stack starts empty.
            subprocess.run(["rm", "-rf", str(work / "bootfleet-state"), str(work / "dnsmasq.leases")])
            stack = start_bootfleet(work, root)
            try:
                if "bootfleet" in stacks:
                    results.append(storm(stack, work, root, workload, counts[workload], args.time_limit))
                web = render_scripts(work, root, counts[workload]) if workload != "dhcp" and "reference" in stacks else work / "web"
            finally:
                stack.stop()
            if args.baseline:
                # The same storm on a fresh lease database, against the
                # earlier build.
                subprocess.run(["rm", "-rf", str(work / "bootfleet-state")])
                stack = start_bootfleet(work, root, Path(args.baseline), "bootfleet-baseline")
                try:
                    results.append(storm(stack, work, root, workload, counts[workload], args.time_limit))
                finally:
                    stack.stop()
            if "reference" not in stacks:
                continue
            (work / "web").mkdir(exist_ok=True)
            stack = start_reference(work, root, web)
            try:
                results.append(storm(stack, work, root, workload, counts[workload], args.time_limit))
            finally:
                stack.stop()
    finally:
        ns_down()
    command = "sudo env \"PATH=$PATH\" benches/storm_compare.py " + " ".join(sys.argv[1:])
    section = markdown(results, command.strip())
    print(section)
    write_section(Path(args.out), section, "storm-compare")
    print(f"reports and charts in {work}")


if __name__ == "__main__":
    main()
