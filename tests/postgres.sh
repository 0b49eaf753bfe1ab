#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests: initdb and pg_ctl in a
# directory of its own, as the unprivileged `postgres` user when run as
# root, listening on a free loopback port only (and a Unix socket in that
# directory). tests/run-all.sh starts one before `cargo test` and stops it
# after; by hand:
#
#   url=$(tests/postgres.sh start /tmp/bootfleet-pg)   # prints its URL
#   BOOTFLEET_TEST_POSTGRES=$url cargo test --release
#   tests/postgres.sh stop /tmp/bootfleet-pg           # and removes it
#
# `pause DIR` stops the server and keeps its data, `resume DIR` starts it
# again on the same port: how a test takes the database away and back.
# BOOTFLEET_PG_ALSO_LISTEN=ADDR (at start) also listens on that address,
# with trust for any client: for servers in test namespaces, on a test
# bridge's address.
# Tests create a database of their own in it for each test.
set -euo pipefail
command=${1:?usage: tests/postgres.sh start|stop|pause|resume DIR}
dir=${2:?usage: tests/postgres.sh start|stop|pause|resume DIR}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "PostgreSQL's server is not installed (apt install postgresql)" >&2
    exit 1
fi
as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case $command in
start)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 > "$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    listen=127.0.0.1
    if [ -n "${BOOTFLEET_PG_ALSO_LISTEN:-}" ]; then
        listen="127.0.0.1,$BOOTFLEET_PG_ALSO_LISTEN"
        echo "host all all 0.0.0.0/0 trust" >> "$dir/data/pg_hba.conf"
    fi
    # fsync off: a test cluster lives for one run.
    echo "-h $listen -p $port -k $dir -c fsync=off -c max_connections=200" > "$dir/options"
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o "$(cat "$dir/options")" start > /dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
pause)
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop > /dev/null
    ;;
resume)
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o "$(cat "$dir/options")" start > /dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    ;;
stop)
    if [ -d "$dir/data" ]; then
        as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop > /dev/null || true
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: tests/postgres.sh start|stop|pause|resume DIR" >&2
    exit 2
    ;;
esac
