#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine and runs
# all of it: the fuzz targets (briefly), the systemd unit check, then every
# unit and integration test over both engine backends. Run as root (the
# network-namespace tests need CAP_NET_ADMIN): `sudo tests/run-all.sh`.
# CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

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
APT_PACKAGES=(tftp-hpa atftp curl iproute2 nftables systemd g++ pkg-config busybox-static isc-dhcp-client
    dnsmasq-base ndisc6 procps qemu-system-x86 ipxe-qemu ipxe ovmf linux-image-amd64 kmod cpio xz-utils zstd
    openssl chromium chromium-driver)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || {
    echo "cargo is not on PATH: install Rust with rustup, and under sudo keep your PATH:" >&2
    echo "    sudo env \"PATH=\$PATH\" tests/run-all.sh" >&2
    exit 1
}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

echo "== format check"
cargo fmt --all -- --check

echo "== build"
cargo build --release --workspace --all-targets

echo "== systemd unit: systemd-analyze verify"
unit_dir=$(mktemp -d)
trap 'rm -rf "$unit_dir"' EXIT
sed "s#/usr/local/bin/bootfleet#$PWD/target/release/bootfleet#" systemd/bootfleet.service > "$unit_dir/bootfleet.service"
systemd-analyze verify "$unit_dir/bootfleet.service"
target/release/bootfleet check-config systemd/bootfleet.toml > /dev/null

# cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets the stable
# toolchain accept them.
# Each target starts from its committed seeds (fuzz/seeds/<target>, written
# by fuzz/make_seeds.py) and keeps what it finds in fuzz/corpus/<target>.
for target in tftp_packet boot_names_and_ranges http_request dhcp_decide tftp_write_netascii multicast_session; do
    echo "== fuzz: $target, ${FUZZ_SECONDS:-20} s"
    dict=()
    if [ -f "fuzz/$target.dict" ]; then dict=(-dict="$PWD/fuzz/$target.dict"); fi
    log="$(mktemp)"
    mkdir -p "fuzz/corpus/$target"
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- -max_total_time="${FUZZ_SECONDS:-20}" -rss_limit_mb=2048 "${dict[@]}" > "$log" 2>&1; then
        # The finding itself, and where its input was written, not just
        # the end of the backtrace.
        grep -E -A 3 "panicked at|ERROR: libFuzzer|Test unit written" "$log" | head -n 30
        echo "fuzz target $target failed; reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run $target <the input above>"
        rm -f "$log"
        exit 1
    fi
    tail -n 3 "$log"
    rm -f "$log"
done

echo "== tests (unit, integration with real clients, both engines)"
test_log=$(mktemp)
cargo test --release --workspace 2>&1 | tee "$test_log"
# One closing line over every test binary (the last binary cargo runs, the
# doc-tests, has none).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) s += $(i-1) } }
     END { printf "all tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$test_log"
rm -f "$test_log"
