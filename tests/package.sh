#!/usr/bin/env bash
# The Debian package: builds it (packaging/build-deb.sh), checks it with
# lintian (no errors), installs it into a fresh root with `dpkg --root`
# (its maintainer scripts run there under busybox's shell), runs the
# installed `bootfleet --version` and `bootfleet check-config` on the
# installed default config, checks the units, man pages and completions are
# where Debian looks, then removes it and checks the config is kept.
# Run as root (dpkg --root and mknod). tests/run-all.sh calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "package test FAILED: $*" >&2; exit 1; }

packaging/build-deb.sh
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
deb="target/debian/bootfleet_${version}-1_amd64.deb"
[ -f "$deb" ] || fail "$deb was not built"

lintian --fail-on error --tag-display-limit 0 "$deb" 2>&1 | grep -v "running with root privileges" || true
lintian --fail-on error "$deb" >/dev/null 2>&1 || fail "lintian reports errors (run: lintian $deb)"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/bin" "$root/tmp" "$root/dev"
touch "$root/var/lib/dpkg/status"
mknod -m 666 "$root/dev/null" c 1 3
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
# libc and systemd are the host's, not the fresh root's.
dpkg --root="$root" --force-depends --log=/dev/null -i "$deb" >/dev/null

installed="$root/usr/bin/bootfleet"
[ -x "$installed" ] || fail "no /usr/bin/bootfleet after installing"
"$installed" --version | grep -qx "bootfleet $version" || fail "bootfleet --version does not say $version"
# The installed config, with its boot directory where tmpfiles would have
# made it on a real system (the fresh root has no systemd-tmpfiles).
mkdir -p "$root/srv/bootfleet"
sed "s#\"/srv/bootfleet\"#\"$root/srv/bootfleet\"#" "$root/etc/bootfleet/bootfleet.toml" > "$root/tmp/bootfleet.toml"
"$installed" check-config "$root/tmp/bootfleet.toml" >/dev/null \
    || fail "check-config refuses the installed default config"
for file in usr/lib/systemd/system/bootfleet.service usr/lib/systemd/system/bootfleet.socket \
    usr/lib/sysusers.d/bootfleet.conf usr/lib/tmpfiles.d/bootfleet.conf \
    usr/share/man/man1/bootfleet.1.gz usr/share/man/man1/bootfleet-serve.1.gz \
    usr/share/bash-completion/completions/bootfleet usr/share/zsh/vendor-completions/_bootfleet \
    usr/share/fish/vendor_completions.d/bootfleet.fish usr/share/doc/bootfleet/copyright; do
    [ -f "$root/$file" ] || fail "/$file is not installed"
done
grep -q "^ExecStart=/usr/bin/bootfleet serve" "$root/usr/lib/systemd/system/bootfleet.service" \
    || fail "the packaged unit does not start /usr/bin/bootfleet"
grep -q "^Type=notify" "$root/usr/lib/systemd/system/bootfleet.service" || fail "the packaged unit is not Type=notify"
# The packaged units pass systemd's own check, with the installed binary.
units=$(mktemp -d)
sed "s#/usr/bin/bootfleet#$installed#" "$root/usr/lib/systemd/system/bootfleet.service" > "$units/bootfleet.service"
cp "$root/usr/lib/systemd/system/bootfleet.socket" "$units/"
MANPATH="$root/usr/share/man:" systemd-analyze verify "$units/bootfleet.service" "$units/bootfleet.socket" \
    || fail "systemd-analyze verify (the man page it names is the installed one)"
rm -rf "$units"

dpkg --root="$root" --log=/dev/null -r bootfleet >/dev/null
[ ! -e "$installed" ] || fail "the binary is still there after removal"
[ -f "$root/etc/bootfleet/bootfleet.toml" ] || fail "removal (not purge) deleted the operator's config"
echo "package test passed: $deb builds, is lintian-clean of errors, installs, runs and removes"
