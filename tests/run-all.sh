#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine and runs
# all of it: the fuzz targets (briefly), the systemd unit check, then every
# unit and integration test over both engine backends, the Debian package.
# It needs root (apt, network namespaces, dpkg --root): run it as root, or
# as a user with sudo, where it re-runs itself under sudo keeping PATH (for
# cargo). CI (.ci/run) calls exactly this. The first run on a fresh machine
# takes about 25 minutes (packages, crates, the fuzz targets' build); later
# runs about 12.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
        echo "== not root: running again under sudo (keeping PATH for cargo)"
        exec sudo env "PATH=$PATH" "$0" "$@"
    fi
    echo "tests/run-all.sh needs root (apt-get, network namespaces, dpkg --root) and there is no sudo: run it as root" >&2
    exit 1
fi
# Every step up to the test run stops the script on failure; the test run
# itself is summarised truthfully whatever happens (see the end).
set -e
started=$(date +%s)

# Real peers the tests run: tftp-hpa's and atftp's clients, curl; ip and nft
# for the lossy network-namespace link; busybox (udhcpc; the static build,
# which also goes into the test machines' initramfs), isc-dhcp-client
# (dhclient), dnsmasq-base and ndisc6 (rdisc6) for the DHCP tests;
# systemd-analyze for the unit; g++ for libFuzzer. The machines that boot
# end to end: QEMU, SeaBIOS's iPXE ROMs (ipxe-qemu), UEFI (ovmf), Debian's
# ipxe.efi (ipxe), and the kernel they boot (linux-image-amd64, with kmod,
# cpio, xz-utils and zstd to build their initramfs). The control panel:
# headless Chromium driven through chromium-driver (WebDriver), openssl for
# the TLS test's certificate.
# The package test: lintian, and dpkg (already there on Debian). strace: the
# test that io_uring workers make no file-system call watches them with it.
# postgresql: the store tests run on a throwaway cluster (tests/postgres.sh).
# BMCs: OpenIPMI's ipmi_sim (openipmi) with ipmitool, which bootfleet runs
# for IPMI; libvirt (its daemon and QEMU driver, and libvirt-dev to build
# the Python binding) under sushy-tools' Redfish emulator (PyPI, below).
# make, binutils, perl, liblzma-dev, mtools: building the multicast-fixed
# iPXE (tests/ipxe/build.sh) where ../shared/ipxe/bin does not hold it.
APT_PACKAGES=(tftp-hpa atftp curl iproute2 nftables systemd g++ pkg-config busybox-static isc-dhcp-client
    dnsmasq-base ndisc6 procps qemu-system-x86 ipxe-qemu ipxe ovmf linux-image-amd64 kmod cpio xz-utils zstd
    openssl chromium chromium-driver lintian strace postgresql openipmi ipmitool libvirt-daemon-system
    libvirt-daemon-driver-qemu libvirt-dev make binutils perl liblzma-dev mtools)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    apt-get update -q
    env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || {
    echo "cargo is not on PATH: install Rust with rustup, and under sudo keep your PATH:" >&2
    echo "    sudo env \"PATH=\$PATH\" tests/run-all.sh" >&2
    exit 1
}
# The Redfish test runs sushy-tools' emulator on its own libvirtd inside its
# namespace; a system libvirtd would hold the same socket.
python3 -c "import sushy_tools, libvirt, bcrypt" 2>/dev/null || {
    echo "== installing sushy-tools, libvirt-python, bcrypt (PyPI)"; python3 -m pip install -q sushy-tools libvirt-python bcrypt; }
systemctl stop libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket virtlogd.socket 2>/dev/null || true
pkill -x libvirtd 2>/dev/null || true
# The multicast boot test needs an iPXE with the multicast fix: the
# prebuilt one beside the repository, one set by BOOTFLEET_IPXE_BIN, or
# built here once from the pinned upstream source (checked, then patched).
if [ -z "${BOOTFLEET_IPXE_BIN:-}" ] && [ ! -f ../shared/ipxe/bin/SHA256SUMS ] && [ ! -f target/ipxe/bin/SHA256SUMS ]; then
    echo "== building the multicast-fixed iPXE (tests/ipxe/build.sh; 2-5 minutes, once)"
    tests/ipxe/build.sh
fi
# The method 2 and 4 tests build iPXE with an embedded script by
# `bootfleet ipxe build`, from the same checked upstream source tree.
tests/ipxe/build.sh --source-only >/dev/null
# The Secure Boot test boots Debian's signed shim and GRUB: fetched with
# apt and unpacked into target/secureboot, not installed.
tests/secureboot/fetch.sh >/dev/null
command -v cargo-fuzz >/dev/null || { echo "== installing cargo-fuzz (a few minutes, once)"; cargo install cargo-fuzz --locked; }
command -v cargo-deb >/dev/null || { echo "== installing cargo-deb (a few minutes, once)"; cargo install cargo-deb --locked; }

echo "== format check"
cargo fmt --all -- --check

echo "== build"
cargo build --release --workspace --all-targets

echo "== systemd unit: systemd-analyze verify"
unit_dir=$(mktemp -d)
trap 'rm -rf "$unit_dir"' EXIT
sed "s#/usr/local/bin/bootfleet#$PWD/target/release/bootfleet#" systemd/bootfleet.service > "$unit_dir/bootfleet.service"
cp systemd/bootfleet.socket "$unit_dir/"
systemd-analyze verify "$unit_dir/bootfleet.service" "$unit_dir/bootfleet.socket"
# The sandbox must not weaken: exposure at most 1.9 ("OK"), as shipped.
systemd-analyze security --offline=true --threshold=19 "$unit_dir/bootfleet.service" > /dev/null \
    || { echo "systemd-analyze security rates bootfleet.service above 1.9; see: systemd-analyze security --offline=true systemd/bootfleet.service"; exit 1; }
mkdir -p "$unit_dir/srv"
sed "s#\"/srv/bootfleet\"#\"$unit_dir/srv\"#" systemd/bootfleet.toml > "$unit_dir/bootfleet.toml"
target/release/bootfleet check-config "$unit_dir/bootfleet.toml" > /dev/null

echo "== Debian package: build, lintian, install into a fresh root, run, remove"
tests/package.sh

# cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets the stable
# toolchain accept them.
# Each target starts from its committed seeds (fuzz/seeds/<target>, written
# by fuzz/make_seeds.py) and keeps what it finds in fuzz/corpus/<target>.
echo "== fuzz targets: building them with libFuzzer's instrumentation (about 10 minutes the first time, silent)"
for target in tftp_packet boot_names_and_ranges http_request dhcp_decide tftp_write_netascii multicast_session; do
    echo "== fuzz: $target, ${FUZZ_SECONDS:-20} s"
    dict=()
    if [ -f "fuzz/$target.dict" ]; then dict=(-dict="$PWD/fuzz/$target.dict"); fi
    log="$(mktemp)"
    mkdir -p "fuzz/corpus/$target"
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- -max_total_time="${FUZZ_SECONDS:-20}" -rss_limit_mb=2048 "${dict[@]}" > "$log" 2>&1; then
        # The finding itself, and where its input was written, not just
        # the end of the backtrace.
        # (or, when the target did not build, the compiler's errors)
        grep -E -A 3 "panicked at|ERROR: libFuzzer|Test unit written|^error" "$log" | head -n 30 || true
        echo "fuzz target $target failed; reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run $target <the input above>"
        rm -f "$log"
        exit 1
    fi
    tail -n 3 "$log"
    rm -f "$log"
done

echo "== PostgreSQL: a throwaway cluster for the store tests"
pg_dir=$(mktemp -d /tmp/bootfleet-pg-XXXXXX)
trap 'rm -rf "$unit_dir"; tests/postgres.sh stop "$pg_dir"' EXIT
BOOTFLEET_TEST_POSTGRES=$(tests/postgres.sh start "$pg_dir")
export BOOTFLEET_TEST_POSTGRES

echo "== tests (unit, integration with real clients, both engines)"
test_log=$(mktemp)
skipped_log=$(mktemp)
set +e
BOOTFLEET_SKIPPED="$skipped_log" cargo test --release --workspace --no-fail-fast 2>&1 | tee "$test_log"
test_status=${PIPESTATUS[0]}
set -e
# One closing summary over every test binary, true whatever happened: the
# counts from each binary's result line, the failed tests by name, and the
# tests that skipped their checks for a missing tool, with the reason.
read -r passed failed ignored < <(awk '/^test result:/ {
        for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) g += $(i-1) } }
    END { printf "%d %d %d\n", p, f, g }' "$test_log")
skipped=$(sort -u "$skipped_log" | wc -l)
echo
echo "== summary after $(( ($(date +%s) - started) / 60 )) min"
echo "all tests: $((passed - skipped)) passed, $failed failed, $skipped skipped (their checks did not run), $ignored ignored"
if [ "$failed" -gt 0 ]; then
    echo "failed:"
    grep -E "^test .* \.\.\. FAILED$" "$test_log" | sed 's/^test /  /; s/ \.\.\. FAILED$//' | sort -u
fi
if [ "$skipped" -gt 0 ]; then
    echo "skipped (install what they name; CI installs everything and skips nothing):"
    sort -u "$skipped_log" | sed 's/^/  /'
fi
if [ "$test_status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    echo "cargo test exited with status $test_status before every test ran (a build error or a crashed test binary; see above)"
fi
rm -f "$test_log" "$skipped_log"
exit "$test_status"
