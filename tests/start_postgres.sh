#!/usr/bin/env bash
# Start a private PostgreSQL server on 127.0.0.1 for the tests and print its URL.
# Installs Debian's `postgresql` package when missing (as root or with passwordless sudo).
# The server is the tests' own (data in $STUDY_PG_DIR, default /tmp/study-postgres, port
# $STUDY_PG_PORT, default 54329, trust authentication on loopback only); the system cluster
# is not touched. Running it again reuses a running server. Exit status 1: no server.
# `start_postgres.sh --stop` stops the server only if a start of this script started it (so
# `make test` leaves nothing running that was not running before).
set -euo pipefail
DIR=${STUDY_PG_DIR:-/tmp/study-postgres}
PORT=${STUDY_PG_PORT:-54329}
URL="postgresql://postgres@127.0.0.1:${PORT}/postgres"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

MARK="$DIR.started-by-tests"
if [ "${1:-}" = --stop ]; then
  [ -f "$MARK" ] || exit 0
  BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR" -m fast -w stop >/dev/null 2>&1 || true
  else
    "$BIN/pg_ctl" -D "$DIR" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -f "$MARK"
  exit 0
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing postgresql (Debian package)" >&2
  as_root apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >&2
fi
BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")

# PostgreSQL refuses to run as root: run it as the `postgres` user when we are root
if [ "$(id -u)" = 0 ]; then
  run() { runuser -u postgres -- "$@"; }
else
  run() { "$@"; }
fi

if [ ! -f "$DIR/PG_VERSION" ]; then
  as_root mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
  run "$BIN/initdb" -D "$DIR" -A trust -U postgres >/dev/null
fi
if ! run "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
  run "$BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w \
    -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1" start >/dev/null
  touch "$MARK"
fi
echo "$URL"
