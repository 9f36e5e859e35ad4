#!/usr/bin/env bash
# Make sure a PostgreSQL server is reachable on 127.0.0.1:${PGPORT:-5432} with the role
# "paysentinel" (password "paysentinel", LOGIN CREATEDB) and the database "paysentinel_test"
# owned by it. Idempotent. Written for Debian/Ubuntu (postgresql-common); installing or
# starting a server needs root.
set -euo pipefail

PGPORT="${PGPORT:-5432}"
HOST=127.0.0.1
ROLE=paysentinel
PASSWORD=paysentinel
DATABASE=paysentinel_test
READY_TIMEOUT=30

step() { echo "ensure-postgres: $*"; }
fail() {
    echo "ensure-postgres: FAILED: $1" >&2
    if [ $# -gt 1 ]; then echo "ensure-postgres: what to do: $2" >&2; fi
    exit 1
}
is_root() { [ "$(id -u)" -eq 0 ]; }
need_root() {
    is_root || fail "$1 needs root, and this script runs as $(id -un)" \
        "re-run it as root (sudo $0), or $2"
}

server_ready() { pg_isready -q -h "$HOST" -p "$PGPORT" >/dev/null 2>&1; }
role_can_log_in() {
    PGPASSWORD="$PASSWORD" PGCONNECT_TIMEOUT=5 psql -h "$HOST" -p "$PGPORT" -U "$ROLE" -d "$DATABASE" \
        -X -tAc 'SELECT 1' >/dev/null 2>&1
}
# Run psql as the "postgres" superuser over the local socket (as root or as postgres).
psql_as_postgres() {
    if is_root; then
        (cd / && runuser -u postgres -- psql -X -v ON_ERROR_STOP=1 -p "$PGPORT" -d postgres "$@")
    else
        psql -X -v ON_ERROR_STOP=1 -p "$PGPORT" -d postgres "$@"
    fi
}
# Print "<version> <name> <status>" of the cluster configured for $PGPORT, if any.
cluster_on_port() {
    command -v pg_lsclusters >/dev/null 2>&1 || return 0
    pg_lsclusters -h 2>/dev/null | awk -v port="$PGPORT" '$3 == port { print $1, $2, $4; exit }'
}
newest_server_version() {
    local bin
    for bin in /usr/lib/postgresql/*/bin/postgres; do
        [ -x "$bin" ] && basename "$(dirname "$(dirname "$bin")")"
    done | sort -V | tail -n 1
}

# 1. Already there?
if server_ready && role_can_log_in; then
    step "PostgreSQL on $HOST:$PGPORT is ready and role $ROLE can log in to $DATABASE"
    exit 0
fi

if server_ready; then
    step "a PostgreSQL server answers on $HOST:$PGPORT"
else
    # 2. Server binaries.
    version="$(newest_server_version)"
    if [ -z "$version" ]; then
        step "no PostgreSQL server installed; installing it with apt-get"
        need_root "installing PostgreSQL" "install it yourself (apt-get install postgresql)"
        command -v apt-get >/dev/null 2>&1 ||
            fail "apt-get is not available to install PostgreSQL" "install a PostgreSQL server and re-run this script"
        step "apt-get update"
        apt-get update -qq || fail "apt-get update failed" "check the network and the apt sources, then re-run"
        step "apt-get install postgresql (this can take a minute)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null ||
            fail "apt-get install postgresql failed" "run 'apt-get install postgresql' to see the error"
        version="$(newest_server_version)"
        [ -n "$version" ] || fail "postgresql was installed but no /usr/lib/postgresql/*/bin/postgres exists" \
            "check the postgresql packages (dpkg -l 'postgresql*')"
    fi
    step "PostgreSQL $version server binaries are installed"
    command -v pg_lsclusters >/dev/null 2>&1 ||
        fail "pg_lsclusters is missing (package postgresql-common)" "apt-get install postgresql-common"

    # 3. A cluster on $PGPORT.
    read -r cluster_version cluster_name cluster_status <<<"$(cluster_on_port)" || true
    if [ -z "${cluster_name:-}" ]; then
        cluster_version="$version"
        cluster_name=main
        if pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" { found = 1 } END { exit !found }'; then
            cluster_name=paysentinel
        fi
        step "creating cluster $cluster_version/$cluster_name on port $PGPORT"
        need_root "creating a cluster" "create one yourself (pg_createcluster -p $PGPORT $cluster_version $cluster_name)"
        pg_createcluster -p "$PGPORT" -o "listen_addresses=localhost" "$cluster_version" "$cluster_name" >/dev/null ||
            fail "pg_createcluster $cluster_version $cluster_name failed" "run it by hand to see the error"
        cluster_status=down
    fi
    step "cluster $cluster_version/$cluster_name is configured for port $PGPORT (status: $cluster_status)"

    # 4. Listening on 127.0.0.1 (Debian's default "localhost" includes it).
    listen="$(pg_conftool -s "$cluster_version" "$cluster_name" show listen_addresses 2>/dev/null || echo localhost)"
    case ",${listen// /}," in
        *,localhost,* | *,127.0.0.1,* | *,\*,* | *,0.0.0.0,*) ;;
        *)
            step "listen_addresses is '$listen'; adding 127.0.0.1"
            need_root "changing listen_addresses" "add 127.0.0.1 to listen_addresses in the cluster's postgresql.conf"
            pg_conftool "$cluster_version" "$cluster_name" set listen_addresses "$listen,127.0.0.1"
            if [ "${cluster_status%%,*}" = online ]; then
                pg_ctlcluster "$cluster_version" "$cluster_name" restart ||
                    fail "restarting cluster $cluster_version/$cluster_name failed" \
                        "see /var/log/postgresql/postgresql-$cluster_version-$cluster_name.log"
            fi
            ;;
    esac

    # 5. Running.
    if [ "${cluster_status%%,*}" != online ]; then
        step "starting cluster $cluster_version/$cluster_name"
        need_root "starting PostgreSQL" "start it yourself (pg_ctlcluster $cluster_version $cluster_name start)"
        if ! pg_ctlcluster "$cluster_version" "$cluster_name" start; then
            log="/var/log/postgresql/postgresql-$cluster_version-$cluster_name.log"
            [ -r "$log" ] && tail -n 20 "$log" >&2
            fail "pg_ctlcluster $cluster_version $cluster_name start failed" "see $log"
        fi
    fi
    step "waiting for $HOST:$PGPORT to accept connections"
    for _ in $(seq "$READY_TIMEOUT"); do
        server_ready && break
        sleep 1
    done
    server_ready || fail "PostgreSQL is not accepting connections on $HOST:$PGPORT after ${READY_TIMEOUT}s" \
        "check pg_lsclusters and /var/log/postgresql/"
    step "PostgreSQL is accepting connections on $HOST:$PGPORT"
fi

# 6. Role and database.
if ! is_root && [ "$(id -un)" != postgres ]; then
    fail "creating the role and database needs the postgres superuser, and this script runs as $(id -un)" \
        "re-run it as root (sudo $0), or create them yourself: CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'; CREATE DATABASE $DATABASE OWNER $ROLE;"
fi
if [ "$(psql_as_postgres -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" = 1 ]; then
    step "role $ROLE exists; making sure it can log in with its password"
    psql_as_postgres -qc "ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" >/dev/null ||
        fail "ALTER ROLE $ROLE failed"
else
    step "creating role $ROLE"
    psql_as_postgres -qc "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" >/dev/null ||
        fail "CREATE ROLE $ROLE failed"
fi
owner="$(psql_as_postgres -tAc "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '$DATABASE'")"
if [ -z "$owner" ]; then
    step "creating database $DATABASE owned by $ROLE"
    psql_as_postgres -qc "CREATE DATABASE $DATABASE OWNER $ROLE" >/dev/null || fail "CREATE DATABASE $DATABASE failed"
elif [ "$owner" != "$ROLE" ]; then
    step "database $DATABASE is owned by $owner; giving it to $ROLE"
    psql_as_postgres -qc "ALTER DATABASE $DATABASE OWNER TO $ROLE" >/dev/null || fail "ALTER DATABASE $DATABASE failed"
else
    step "database $DATABASE exists and is owned by $ROLE"
fi

# 7. Check it the way the tests will connect.
role_can_log_in || fail "role $ROLE cannot log in to $DATABASE on $HOST:$PGPORT with its password" \
    "allow password logins from 127.0.0.1 in pg_hba.conf (host all all 127.0.0.1/32 scram-sha-256) and reload"
step "ready: postgresql://$ROLE:$PASSWORD@$HOST:$PGPORT/$DATABASE"
