#!/usr/bin/env bash
# Small-file HTTP requests per second, this build against an earlier one,
# and the file-system system calls each makes on the request path.
#
#   benches/small_file_compare.sh BASELINE_BINARY [ROUNDS]
#
# Both servers run at once (one worker each, pinned to core 0) from the
# same boot directory holding a 4 KB file; wrk (one thread, 64 kept-alive
# connections, 5 s, pinned to core 1) measures each in turn, ROUNDS times
# (default 3). Then each binary serves 2,000 requests over one connection
# under strace, once per engine, and the calls that touch the requested
# file are counted (the inventory poll's stat is left out). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=${1:?usage: benches/small_file_compare.sh BASELINE_BINARY [ROUNDS]}
rounds=${2:-3}
current=target/release/bootfleet
for tool in wrk strace taskset python3; do
    command -v "$tool" >/dev/null || { echo "$tool is missing (apt install wrk strace util-linux python3)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'pkill -f "root $work/boot" || true; rm -rf "$work"' EXIT
mkdir -p "$work/boot/images"
head -c 4096 /dev/urandom > "$work/boot/images/loader.bin"

serve() { # BINARY NAME PORT [ENGINE]
    taskset -c 0 "$1" serve --root "$work/boot" --state-dir "$work/state-$2" --tftp-listen 127.0.0.1:0 \
        --http-listen "127.0.0.1:$3" --panel-listen off --workers 1 --engine "${4:-auto}" > /dev/null 2>&1 &
}

echo "== requests/s for a 4 KB file, 64 connections, 5 s per point"
serve "$current" current 28201
serve "$baseline" baseline 28202
sleep 1.5
for round in $(seq "$rounds"); do
    for pair in current:28201 baseline:28202; do
        rate=$(taskset -c 1 wrk -t1 -c64 -d5s "http://127.0.0.1:${pair#*:}/images/loader.bin" | awk '/Requests\/sec/ {print $2}')
        echo "round $round ${pair%:*} $rate"
    done
done
pkill -f "root $work/boot" || true
sleep 1

echo "== file-system calls on the request path, 2,000 requests"
for engine in io-uring epoll; do
    for pair in "current:$current" "baseline:$baseline"; do
        port=$((20000 + RANDOM % 20000))
        strace -f --seccomp-bpf -o "$work/strace.txt" -e trace=openat,statx,newfstatat,readlink \
            "${pair#*:}" serve --root "$work/boot" --state-dir "$work/state-strace" --tftp-listen 127.0.0.1:0 \
            --http-listen "127.0.0.1:$port" --panel-listen off --workers 1 --engine "$engine" > /dev/null 2>&1 &
        sleep 1.5
        python3 - "$port" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
request = b"GET /images/loader.bin HTTP/1.1\r\nHost: x\r\n\r\n"
for _ in range(2000):
    s.sendall(request)
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(65536)
    head, body = got.split(b"\r\n\r\n", 1)
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(body) < length:
        body += s.recv(65536)
PY
        pkill -f "http-listen 127.0.0.1:$port" || true
        sleep 1
        calls=$(grep -v inventory.toml "$work/strace.txt" | grep -cE 'openat|statx|newfstatat|readlink' || true)
        echo "$engine ${pair%%:*}: $calls file-system calls in all (start-up included)"
    done
done
