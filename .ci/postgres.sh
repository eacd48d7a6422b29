#!/usr/bin/env bash
# Run a command next to a throwaway PostgreSQL server on 127.0.0.1, for the fleet-store tests.
#
#   .ci/postgres.sh python -m pytest -q tests/lut_service/test_fleet.py tests/lut_service/test_migrations.py
#
# initdb into a temporary folder, pg_ctl on a free port of 127.0.0.1 (no Unix socket outside that folder),
# password authentication; the command sees EFFPOSE_TEST_PG_URL (a SQLAlchemy URL of the server's
# "postgres" database; the tests create and drop their own databases on it). A trap stops the server and
# removes the folder however the command ends. PostgreSQL's server refuses to run as root: as root the
# server runs as the "postgres" user (created if missing). PG_BIN overrides where initdb/pg_ctl live.
set -euo pipefail

if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 64
fi
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    echo "postgres.sh: no PostgreSQL server binaries (apt-get install postgresql, or set PG_BIN)" >&2
    exit 69
fi

as_server() { "$@"; }
if [ "$(id -u)" = 0 ]; then
    id -u postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    as_server() { runuser -u postgres -- "$@"; }
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/effpose-pg.XXXXXX")
chmod 755 "$dir"
[ "$(id -u)" = 0 ] && chown postgres "$dir"
stop() {
    as_server "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap stop EXIT
trap 'exit 130' INT TERM

password=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf '%s\n' "$password" >"$dir/pw"
[ "$(id -u)" = 0 ] && chown postgres "$dir/pw"
as_server "$PG_BIN/initdb" -D "$dir/data" -U effpose --pwfile="$dir/pw" --auth=scram-sha-256 \
    -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 70; }
rm -f "$dir/pw"
# fsync off: a throwaway server for tests; max_connections for several agents and test clients at once
as_server "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" start >/dev/null \
    || { cat "$dir/server.log" >&2; exit 70; }

export EFFPOSE_TEST_PG_URL="postgresql+psycopg://effpose:${password}@127.0.0.1:${port}/postgres"
echo "postgres.sh: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
status=0
"$@" || status=$?
exit "$status"
