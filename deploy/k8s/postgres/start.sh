#!/bin/sh
# PostgreSQL for the prediction log in a pod (the image of deploy/postgres/, another start than its
# own, which listens on a shared loopback with trust): the first start makes the cluster, the database
# and its owner with the Secret's password; then PostgreSQL listens on the pod's address and takes
# only scram-sha-256 logins of that owner to that database from the network.
set -eu
PGDATA=/var/lib/postgresql/data/pgdata
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  initdb -D "$PGDATA" -U digits --pwfile=/run/secrets/postgres/password --auth-local=trust \
    --auth-host=scram-sha-256 -E UTF8 >/dev/null
  printf 'host predictions digits 0.0.0.0/0 scram-sha-256\nhost predictions digits ::/0 scram-sha-256\n' \
    >>"$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k /tmp" -w start >/dev/null
  createdb -h /tmp -U digits predictions
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "initialised $PGDATA: database predictions, owner digits"
fi
# max_connections: one connection per TorchServe worker (handlers/prediction_log.py); the production
# overlay's 8 pods x 10 workers = 80 (tests/test_k8s_manifests.py checks every overlay against it).
exec postgres -D "$PGDATA" -c listen_addresses='*' -c port=5432 -c unix_socket_directories=/tmp \
  -c max_connections=200 -c shared_buffers=64MB -c password_encryption=scram-sha-256
