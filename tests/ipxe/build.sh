#!/bin/bash
# The iPXE the QEMU tests need, from upstream source at a pinned commit:
#
#   tests/ipxe/build.sh --source-only   the source tree, unpacked and checked,
#                                        in target/ipxe/src-COMMIT (seconds):
#                                        what the method 2 and 4 tests hand to
#                                        `bootfleet ipxe build`
#   tests/ipxe/build.sh                 that, then the multicast-fixed builds
#                                        in target/ipxe/bin (1af41000.rom,
#                                        undionly.kpxe, ipxe.efi, SHA256SUMS)
#                                        for a machine without
#                                        ../shared/ipxe/bin (2-5 min on 2 cores)
#
# Every iPXE build before the fix drops multicast TFTP data:
# tftp_process_multicast() leaves the group's socket address unzeroed and
# udp_demux() compares its padding (0001-tftp-zero-multicast-socket-address.patch,
# one memset). The source is upstream iPXE at the pinned commit, from
# ../shared/ipxe when it is there, else downloaded from GitHub; either way
# its files are checked against TREE_SHA256 (the SHA-256 of the sorted
# `sha256sum` listing of every file, which does not depend on how the
# archive was compressed or named) before the tree is kept. The kept tree
# is reused: iPXE's make then rebuilds only what changed.
#
# Needs: gcc make binutils perl liblzma-dev mtools (tests/run-all.sh installs them).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
COMMIT=0ab2277c40f1
TREE_SHA256=6a127101bc600bb83cf795e7c204df3573ceed0b234850dfe202a5586ec037a3
OUT=${BOOTFLEET_IPXE_OUT:-$REPO/target/ipxe}
TREE=$OUT/src-$COMMIT

if [ ! -f "$TREE/src/Makefile" ]; then
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    # BOOTFLEET_IPXE_ARCHIVE: a copy of the archive from elsewhere (a
    # mirror, a machine without GitHub); checked like any other.
    archive=${BOOTFLEET_IPXE_ARCHIVE:-$REPO/../shared/ipxe/ipxe-src-$COMMIT.tar.gz}
    if [ ! -f "$archive" ]; then
        archive=$WORK/ipxe-$COMMIT.tar.gz
        echo "fetching iPXE $COMMIT from GitHub" >&2
        curl -fsSL --retry 3 -o "$archive" "https://github.com/ipxe/ipxe/archive/$COMMIT.tar.gz"
    fi
    mkdir "$WORK/src"
    tar -xzf "$archive" -C "$WORK/src" --strip-components=1
    tree=$(cd "$WORK/src" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
    if [ "$tree" != "$TREE_SHA256" ]; then
        echo "the iPXE source in $archive is not commit $COMMIT (file tree $tree, expected $TREE_SHA256)" >&2
        exit 1
    fi
    mkdir -p "$OUT"
    rm -rf "$TREE"
    mv "$WORK/src" "$TREE"
    # A downloaded archive is kept beside the tree (the tests check that a
    # tampered copy of it is refused).
    if [ "$archive" = "$WORK/ipxe-$COMMIT.tar.gz" ]; then
        mv "$archive" "$OUT/ipxe-src-$COMMIT.tar.gz"
    fi
fi
if [ "${1:-}" = "--source-only" ]; then
    echo "$TREE"
    exit 0
fi

cd "$TREE"
# The fix, unless an earlier run (or `bootfleet ipxe build`) put it in.
if ! grep -q 'memset ( &socket, 0, sizeof ( socket ) );' src/net/udp/tftp.c; then
    patch -p1 < "$HERE/0001-tftp-zero-multicast-socket-address.patch"
fi
cd src
# No embedded script in these: `bootfleet ipxe build` may have left one set.
make -j"$(nproc)" bin/1af41000.rom bin/undionly.kpxe EMBED= >&2
make -j"$(nproc)" bin-x86_64-efi/ipxe.efi EMBED= >&2
mkdir -p "$OUT/bin"
cp bin/1af41000.rom bin/undionly.kpxe bin-x86_64-efi/ipxe.efi "$OUT/bin/"
cd "$OUT/bin" && sha256sum 1af41000.rom undionly.kpxe ipxe.efi > SHA256SUMS
echo "$OUT/bin"
