#!/usr/bin/env bash
# A throwaway PostgreSQL on loopback for the storage/postgres tests.
#
#   bash .ci/postgres.sh go test ./storage/postgres/  # start it, run the command, stop it
#   bash .ci/postgres.sh                              # start it, print the URL, stop it on Ctrl-C
#   source .ci/postgres.sh                            # from a bash script (.ci/run): start it, export
#                                                     # the URL; it stops when that script exits
#                                                     # (this sets the script's EXIT trap)
#
# It exports
#   AUTOTLS_TEST_POSTGRES_URL  postgres://autotls@127.0.0.1:PORT/autotls_test?sslmode=disable
#   AUTOTLS_TEST_PGBOUNCER_URL the same database through PgBouncer in transaction mode
#   AUTOTLS_TEST_POSTGRES_CTL  a script taking "stop" or "start" (the server restart test uses it)
#
# Debian's postgresql and pgbouncer are installed if missing (as root;
# apt-get update first).
# The server runs from a new temporary directory, listens on 127.0.0.1 at a
# free port only, trusts every local connection, and is stopped by its PID and
# its directory removed on exit; PgBouncer likewise. initdb, postgres and
# pgbouncer refuse to run as root: as root, they run as the postgres system
# user.

# autotls_pg_bin prints Debian's newest PostgreSQL binary directory.
autotls_pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  [ -n "$d" ] && [ -x "$d/postgres" ] && echo "$d"
}

# autotls_pg_free_port prints a loopback TCP port nothing listens on, below
# Linux's ephemeral range (32768 and up by default), where the outgoing
# connections of tests running meanwhile would take it first.
autotls_pg_free_port() {
  local port
  for _ in $(seq 100); do
    port=$((10000 + RANDOM % 22768))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "postgres.sh: no free port found" >&2
  return 1
}

# autotls_pg_pid prints the running server's PID: the one in postmaster.pid
# (the server may have been restarted through the ctl script), else the one
# this script started.
autotls_pg_pid() {
  local pid
  pid=$(head -n1 "$AUTOTLS_PG_DIR/data/postmaster.pid" 2>/dev/null || true)
  echo "${pid:-$AUTOTLS_PG_PID}"
}

autotls_pg_stop() {
  [ -n "${AUTOTLS_PG_DIR:-}" ] || return 0
  local pid
  if [ -n "${AUTOTLS_PG_BOUNCER_PID:-}" ]; then
    kill -TERM "$AUTOTLS_PG_BOUNCER_PID" 2>/dev/null || true
  fi
  pid=$(autotls_pg_pid)
  if [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null; then # fast shutdown
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -rf "$AUTOTLS_PG_DIR"
  AUTOTLS_PG_DIR=
}

# autotls_pg_wait_ready waits until the server at port accepts connections;
# it fails if the server with PID pid exits first or after 30 s.
autotls_pg_wait_ready() {
  local bin=$1 port=$2 pid=$3
  for _ in $(seq 300); do
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

autotls_pg_start() {
  local bin missing=()
  autotls_pg_bin >/dev/null || missing+=(postgresql)
  [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "postgres.sh: missing ${missing[*]}; as root: apt-get install ${missing[*]}" >&2
      return 1
    fi
    echo "postgres.sh: installing Debian's ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  fi
  bin=$(autotls_pg_bin)

  local as=() # runs a command as the server's user
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    # In /tmp, whatever TMPDIR says: the postgres user must reach it.
    AUTOTLS_PG_DIR=$(mktemp -d /tmp/autotls-pg.XXXXXX)
    chown postgres: "$AUTOTLS_PG_DIR"
    as=(setpriv --reuid=postgres --regid=postgres --init-groups --)
  else
    AUTOTLS_PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/autotls-pg.XXXXXX")
  fi
  local dir=$AUTOTLS_PG_DIR
  (cd "$dir" && "${as[@]}" "$bin/initdb" -D "$dir/data" -U autotls --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1) || {
    cat "$dir/initdb.log" >&2
    return 1
  }

  # Durability is not wanted from a server that lives for one test run.
  local opts=(-c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off
    -c synchronous_commit=off -c full_page_writes=off)
  local port pid tries
  for tries in 1 2 3; do
    port=$(autotls_pg_free_port)
    (cd "$dir" && exec "${as[@]}" "$bin/postgres" -D "$dir/data" -k "$dir" -p "$port" "${opts[@]}" \
      >>"$dir/postgres.log" 2>&1 </dev/null) &
    pid=$!
    AUTOTLS_PG_PID=$pid
    if autotls_pg_wait_ready "$bin" "$port" "$pid"; then
      break
    fi
    kill -KILL "$pid" 2>/dev/null || true
    pid=
    echo "postgres.sh: the server did not start on port $port (try $tries)" >&2
  done
  if [ -z "$pid" ]; then
    cat "$dir/postgres.log" >&2
    return 1
  fi
  "$bin/createdb" -h 127.0.0.1 -p "$port" -U autotls autotls_test

  # PgBouncer in transaction mode: a client's consecutive transactions may
  # run on different server connections, so session state does not carry.
  local bport
  bport=$(autotls_pg_free_port)
  echo '"autotls" ""' >"$dir/userlist.txt"
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
autotls_test = host=127.0.0.1 port=$port dbname=autotls_test user=autotls
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bport
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
max_client_conn = 500
default_pool_size = 20
INI
  (cd "$dir" && exec "${as[@]}" /usr/sbin/pgbouncer "$dir/pgbouncer.ini" \
    >>"$dir/pgbouncer.log" 2>&1 </dev/null) &
  AUTOTLS_PG_BOUNCER_PID=$!
  local ready=
  for _ in $(seq 100); do
    if "$bin/psql" -qAt -h 127.0.0.1 -p "$bport" -U autotls -d autotls_test -c 'SELECT 1' >/dev/null 2>&1; then
      ready=1
      break
    fi
    kill -0 "$AUTOTLS_PG_BOUNCER_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$ready" ]; then
    echo "postgres.sh: PgBouncer did not start" >&2
    cat "$dir/pgbouncer.log" >&2
    return 1
  fi

  # The restart test stops and starts the server through this script.
  local start
  start=$(printf '%q ' "${as[@]}" "$bin/postgres" -D "$dir/data" -k "$dir" -p "$port" "${opts[@]}")
  cat >"$dir/ctl" <<EOF
#!/usr/bin/env bash
# Stops or starts the test server; written by .ci/postgres.sh.
set -euo pipefail
cd $(printf %q "$dir")
case "\${1:-}" in
stop)
  pid=\$(head -n1 data/postmaster.pid)
  kill -INT "\$pid"
  while kill -0 "\$pid" 2>/dev/null; do sleep 0.05; done ;;
start)
  setsid $start >>postgres.log 2>&1 </dev/null &
  for _ in \$(seq 300); do
    $(printf %q "$bin/pg_isready") -q -h 127.0.0.1 -p $port && exit 0
    sleep 0.1
  done
  echo "ctl: the server did not start" >&2; exit 1 ;;
*) echo "usage: \$0 stop|start" >&2; exit 2 ;;
esac
EOF
  chmod 0755 "$dir/ctl"

  export AUTOTLS_TEST_POSTGRES_URL="postgres://autotls@127.0.0.1:$port/autotls_test?sslmode=disable"
  export AUTOTLS_TEST_PGBOUNCER_URL="postgres://autotls@127.0.0.1:$bport/autotls_test?sslmode=disable"
  export AUTOTLS_TEST_POSTGRES_CTL="$dir/ctl"
  echo "postgres.sh: $("$bin/postgres" --version) (PID $pid) at $AUTOTLS_TEST_POSTGRES_URL"
  echo "postgres.sh: PgBouncer (PID $AUTOTLS_PG_BOUNCER_PID, transaction mode) at $AUTOTLS_TEST_PGBOUNCER_URL"
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced: the server lives as long as the sourcing script.
  trap autotls_pg_stop EXIT
  autotls_pg_start
else
  set -euo pipefail
  trap autotls_pg_stop EXIT
  trap 'exit 130' INT TERM
  autotls_pg_start
  if [ $# -gt 0 ]; then
    "$@"
  else
    echo "postgres.sh: running until Ctrl-C; in another shell:"
    echo "  export AUTOTLS_TEST_POSTGRES_URL='$AUTOTLS_TEST_POSTGRES_URL'"
    echo "  export AUTOTLS_TEST_PGBOUNCER_URL='$AUTOTLS_TEST_PGBOUNCER_URL'"
    echo "  export AUTOTLS_TEST_POSTGRES_CTL='$AUTOTLS_TEST_POSTGRES_CTL'"
    # The server may be restarted through the ctl script meanwhile: wait
    # for a signal, not for its PID.
    sleep infinity &
    autotls_pg_sleep=$!
    trap 'kill "$autotls_pg_sleep" 2>/dev/null; exit 130' INT TERM
    wait "$autotls_pg_sleep" || true
  fi
fi
