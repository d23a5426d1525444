#!/bin/sh
# First start: a new cluster in $PGDATA with the database and its owner. Then PostgreSQL in the
# foreground on 127.0.0.1 (the stack's private network namespace; README "Deploy": why trust there).
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --auth-local=trust --auth-host=trust -E UTF8 >/dev/null
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k /tmp" -w start >/dev/null
  createdb -h /tmp -U "$POSTGRES_USER" "$POSTGRES_DB"
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "initialised $PGDATA: database $POSTGRES_DB, owner $POSTGRES_USER"
fi
exec postgres -D "$PGDATA" -c listen_addresses=127.0.0.1 -c port=5432 -c unix_socket_directories=/tmp \
  -c max_connections=100 -c shared_buffers=64MB
