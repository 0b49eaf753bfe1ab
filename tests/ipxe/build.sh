#!/bin/bash
# Builds the multicast-fixed iPXE the QEMU multicast tests boot, into
# target/ipxe/bin (1af41000.rom, undionly.kpxe, ipxe.efi, SHA256SUMS), for
# a machine without ../shared/ipxe/bin beside the repository.
#
# Every iPXE build before the fix drops multicast TFTP data:
# tftp_process_multicast() leaves the group's socket address unzeroed and
# udp_demux() compares its padding (0001-tftp-zero-multicast-socket-address.patch,
# one memset). The source is upstream iPXE at the pinned commit, from
# ../shared/ipxe when it is there, else downloaded from GitHub; either way
# its files are checked against TREE_SHA256 (the SHA-256 of the sorted
# `sha256sum` listing of every file, which does not depend on how the
# archive was compressed or named) before anything is built.
#
# Usage: tests/ipxe/build.sh            (from the repository; 5-10 min on 2 cores)
# Needs: gcc make binutils perl liblzma-dev mtools (tests/run-all.sh installs them).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
COMMIT=0ab2277c40f1
TREE_SHA256=6a127101bc600bb83cf795e7c204df3573ceed0b234850dfe202a5586ec037a3
OUT=${BOOTFLEET_IPXE_OUT:-$REPO/target/ipxe}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

archive=$REPO/../shared/ipxe/ipxe-src-$COMMIT.tar.gz
if [ ! -f "$archive" ]; then
    archive=$WORK/ipxe-$COMMIT.tar.gz
    echo "fetching iPXE $COMMIT from GitHub" >&2
    curl -fsSL --retry 3 -o "$archive" "https://github.com/ipxe/ipxe/archive/$COMMIT.tar.gz"
fi
mkdir "$WORK/src"
tar -xzf "$archive" -C "$WORK/src" --strip-components=1
cd "$WORK/src"
tree=$(find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ "$tree" != "$TREE_SHA256" ]; then
    echo "the iPXE source in $archive is not commit $COMMIT (file tree $tree, expected $TREE_SHA256)" >&2
    exit 1
fi
patch -p1 < "$HERE/0001-tftp-zero-multicast-socket-address.patch"
cd src
make -j"$(nproc)" bin/1af41000.rom bin/undionly.kpxe >&2
make -j"$(nproc)" bin-x86_64-efi/ipxe.efi >&2
mkdir -p "$OUT/bin"
cp bin/1af41000.rom bin/undionly.kpxe bin-x86_64-efi/ipxe.efi "$OUT/bin/"
cd "$OUT/bin" && sha256sum 1af41000.rom undionly.kpxe ipxe.efi > SHA256SUMS
echo "$OUT/bin"
