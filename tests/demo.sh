#!/usr/bin/env bash
# demo.sh: the main job. Installs and builds dolly, starts a throwaway PostgreSQL cluster with
# dolly preloaded, and shows what it can run on. (Generation and fine-tuning join this demo
# as the engine and the model server land.) The cluster is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh

bindir=$(pg_config --bindir)
user=$(id -un)
[ "$(id -u)" -ne 0 ] || user=${DOLLY_TEST_USER:-postgres}
as_user() { if [ "$(id -u)" -eq 0 ]; then runuser -u "$user" -- "$@"; else "$@"; fi; }

dir=$(mktemp -d /tmp/dolly-demo.XXXXXX)
chown "$user" "$dir"
port=${DOLLY_DEMO_PORT:-54329}
cleanup() { as_user "$bindir/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT

as_user "$bindir/initdb" -D "$dir/data" -A trust >/dev/null
cat >> "$dir/data/postgresql.conf" <<CONF
shared_preload_libraries = 'dolly'
port = $port
listen_addresses = ''
unix_socket_directories = '$dir'
CONF
as_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
psql() { as_user "$bindir/psql" -X -h "$dir" -p "$port" -d postgres "$@"; }

psql -q -c "CREATE EXTENSION dolly"
psql -c "SELECT dolly_version()" -c "SELECT * FROM dolly_backends()" \
	-c "SELECT pid, backend_type FROM pg_stat_activity WHERE backend_type LIKE 'dolly%'"
