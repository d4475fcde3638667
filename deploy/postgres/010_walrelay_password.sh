#!/usr/bin/env bash
# Sets the password of the walrelay role (created without one by
# sql/004_role.sql) from $WALRELAY_PASSWORD. The server stores it as a
# SCRAM-SHA-256 verifier (password_encryption's default), and the image's
# pg_hba.conf asks for scram-sha-256 on every TCP connection, the replication
# connection included.
#
# Runs once, on the first start with an empty data volume (see
# 001_walrelay_sql.sh). To change the password later:
#     docker compose -f deploy/compose.yaml exec postgres \
#         psql -U postgres -d app -c '\password walrelay'
# and restart walrelay with the new WALRELAY_PASSWORD.
#
# Works both executed and sourced by the entrypoint: no `exit`, no `set -u`.
set -Eeo pipefail

if [ -z "${WALRELAY_PASSWORD:-}" ]; then
    echo "walrelay: WALRELAY_PASSWORD is empty: the walrelay role could not log in" >&2
    false
fi
# psql reads the password from the environment itself (\getenv, psql 15+),
# so it is on no command line, and :'...' quotes it as a literal, so any
# character is safe.
PGHOST= PGHOSTADDR= psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'EOSQL'
\getenv walrelay_password WALRELAY_PASSWORD
ALTER ROLE walrelay PASSWORD :'walrelay_password';
EOSQL
echo "walrelay: password of role walrelay set"
