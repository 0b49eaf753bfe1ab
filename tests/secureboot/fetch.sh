#!/usr/bin/env bash
# Debian's signed Secure Boot chain for the QEMU Secure Boot test: shim
# (package shim-signed, signed by Microsoft's UEFI CA, which OVMF's
# OVMF_VARS_4M.ms.fd enrols) and GRUB's network image (package
# grub-efi-amd64-signed, signed by Debian's key, which shim carries). They
# are fetched with apt (each .deb checked against the archive's signed
# index) and unpacked into target/secureboot rather than installed: their
# maintainer scripts would run grub-install on this machine. A server
# machine installs the two packages and bootfleet serves them from /usr/lib
# (see docs/secure-boot.md). Prints the directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="$PWD/target/secureboot"
if [ -f "$out/SHA256SUMS" ] && (cd "$out" && sha256sum --check --quiet SHA256SUMS); then
    echo "$out"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # apt's download sandbox user must be able to write there
download() { (cd "$work" && apt-get download -q shim-signed grub-efi-amd64-signed) >&2; }
download || { apt-get update -q >&2 && download; }
for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
done
mkdir -p "$out"
cp "$work/root/usr/lib/shim/shimx64.efi.signed" "$out/shimx64.efi"
cp "$work/root/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed" "$out/grubx64.efi"
(cd "$work" && ls *.deb) > "$out/PACKAGES"
(cd "$out" && sha256sum shimx64.efi grubx64.efi > SHA256SUMS)
echo "$out"
