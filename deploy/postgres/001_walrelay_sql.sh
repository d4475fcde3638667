#!/usr/bin/env bash
# Applies walrelay's setup scripts (the repository's sql/, mounted read-only
# at /opt/walrelay/sql by deploy/compose.yaml) in name order: the events
# table, its append-only guard, the publication and the walrelay role.
#
# The postgres image runs the files of /docker-entrypoint-initdb.d once, on
# the first start with an empty data volume, as the superuser, into
# $POSTGRES_DB, while the server listens on its Unix socket only. sql/ is not
# mounted there itself because this directory adds a script of its own
# (010_walrelay_password.sh), and Docker cannot mount a file into another,
# read-only bind mount (it would have to create the mount point in the
# host's sql/).
#
# Works both executed and sourced by the entrypoint: no `exit`, no `set -u`.
set -Eeo pipefail

walrelay_sql_dir=/opt/walrelay/sql
if ! compgen -G "$walrelay_sql_dir/*.sql" >/dev/null; then
    echo "walrelay: no *.sql files in $walrelay_sql_dir: is ../sql mounted there?" >&2
    false
fi
for walrelay_sql_file in "$walrelay_sql_dir"/*.sql; do
    echo "walrelay: applying $walrelay_sql_file"
    PGHOST= PGHOSTADDR= psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password \
        --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
        --file "$walrelay_sql_file"
done
