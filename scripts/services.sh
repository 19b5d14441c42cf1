#!/usr/bin/env bash
# The real services of a kvlib cluster, on this machine, under .services/ (git-ignored):
#   - Ceph: one monitor, one OSD (BlueStore on a file, so data survives a restart) and the
#     radosgw S3 gateway, cephx off;
#   - PostgreSQL 15, started by initdb/pg_ctl as the postgres user.
# Usage: scripts/services.sh up|down [s3|postgres]   (no service: both)
# `up` starts what is not already running (by the PIDs it recorded), writes .services/env
# (KVLIB_STORE, KVLIB_MANIFEST, AWS_* as KEY=VALUE lines) and records PIDs under
# .services/pids; `down` stops by those PIDs. Data stays until `scripts/services.sh clean`,
# so a fault test can stop a service and start it again.
# PostgreSQL runs as the postgres user, which cannot enter a checkout inside a 0700 folder
# (`mktemp -d`): as root its folder is /var/tmp/kvlib-pg-<hash of this checkout's path>,
# recorded in .services/pg-dir so that `down` and `clean` find it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$ROOT/.services"
PIDS="$DIR/pids"
# Ports away from the usual ones, so a second checkout on the machine can pick others. The first
# `up` records them in .services/ports, so a later `up` or `down` of one service uses the same ones.
[[ -f "$DIR/ports" ]] && . "$DIR/ports"
PG_PORT="${KVLIB_PG_PORT:-${PG_PORT:-55432}}"
RGW_PORT="${KVLIB_RGW_PORT:-${RGW_PORT:-57480}}"
MON_PORT="${KVLIB_MON_PORT:-${MON_PORT:-56789}}"
BUCKET="${KVLIB_BUCKET:-kvlib}"
ACCESS_KEY="kvlibaccess"
SECRET_KEY="kvlibsecret0000000000000000000000000000"

log() { echo "services: $*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit="$1" what="$2"; shift 2
  local start=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - start > limit )); then log "$what did not come up in ${limit}s"; return 1; fi
    sleep 0.3
  done
}

# -- PostgreSQL -----------------------------------------------------------------

pg_bin() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do [[ -x "$dir/pg_ctl" ]] && { echo "$dir"; return; }; done
  log "PostgreSQL not found: installing it (apt-get install postgresql)"
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null
  for dir in /usr/lib/postgresql/*/bin; do [[ -x "$dir/pg_ctl" ]] && { echo "$dir"; return; }; done
  log "PostgreSQL is still missing after apt-get install"; return 1
}

# From /, which the postgres user can enter, whatever folder this checkout lies in.
as_postgres() { if [[ "$(id -u)" == 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi; }

pg_dir_known() {  # where PostgreSQL's folder is, if `up` ever chose one
  if [[ -f "$DIR/pg-dir" ]]; then cat "$DIR/pg-dir"; else echo "$DIR/pg"; fi
}

pg_dir() {  # choose (once) and record PostgreSQL's folder: one the postgres user can enter
  local dir="$DIR/pg"
  if [[ -f "$DIR/pg-dir" ]]; then cat "$DIR/pg-dir"; return; fi
  if [[ "$(id -u)" == 0 && ! -f "$DIR/pg/data/PG_VERSION" ]]; then  # a cluster from before stays where it is
    dir="/var/tmp/kvlib-pg-$(printf %s "$ROOT" | sha256sum | cut -c1-16)"
    # Not recorded, so not this .services/'s: left by an earlier checkout at this path, never cleaned.
    if [[ -f "$dir/data/postmaster.pid" ]] && kill -0 "$(head -1 "$dir/data/postmaster.pid")" 2>/dev/null; then
      log "$dir holds a running PostgreSQL that this checkout did not start: stop it first"; return 1
    fi
    rm -rf "$dir"
  fi
  echo "$dir" >"$DIR/pg-dir"
  echo "$dir"
}

pg_up() {
  local bin pg data
  pg="$(pg_dir)"; data="$pg/data"
  if [[ -f "$data/postmaster.pid" ]] && kill -0 "$(head -1 "$data/postmaster.pid")" 2>/dev/null; then
    head -1 "$data/postmaster.pid" >"$PIDS/postgres"
    log "PostgreSQL already running (pid $(cat "$PIDS/postgres"))"
    return
  fi
  bin="$(pg_bin)"
  mkdir -p "$pg"
  if [[ "$(id -u)" == 0 ]]; then chown postgres: "$pg"; chmod 700 "$pg"; fi
  if ! as_postgres test -w "$pg"; then
    log "the postgres user cannot write $pg (a parent folder is not searchable by it): remove $DIR/pg-dir to choose again"
    return 1
  fi
  if [[ ! -f "$data/PG_VERSION" ]]; then
    as_postgres "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >"$pg/initdb.log"
  fi
  as_postgres "$bin/pg_ctl" -D "$data" -l "$pg/server.log" -w -t 60 \
    -o "-p $PG_PORT -k $pg -c listen_addresses=127.0.0.1 -c fsync=on" start >/dev/null
  head -1 "$data/postmaster.pid" >"$PIDS/postgres"
  as_postgres "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'kvlib'" | grep -q 1 ||
    as_postgres "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres kvlib
  log "PostgreSQL on 127.0.0.1:$PG_PORT (pid $(cat "$PIDS/postgres"), data in $data)"
}

pg_down() {
  local bin data
  data="$(pg_dir_known)/data"
  if [[ -f "$data/postmaster.pid" ]]; then
    bin="$(pg_bin)"
    as_postgres "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null || stop_pid postgres
  fi
  rm -f "$PIDS/postgres"
}

# -- Ceph -----------------------------------------------------------------------

ceph_conf() {
  cat >"$DIR/ceph/ceph.conf" <<EOF
[global]
fsid = $(cat "$DIR/ceph/fsid")
mon host = v1:127.0.0.1:$MON_PORT
ms bind msgr2 = false
ms bind ipv4 = true
ms bind ipv6 = false
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
run dir = $DIR/ceph/run
admin socket = $DIR/ceph/run/\$name.asok
log file = $DIR/ceph/log/\$name.log
pid file = $DIR/ceph/run/\$name.pid
# One OSD straight under the root: replicas are chosen among OSDs, not hosts.
osd crush chooseleaf type = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon max pg per osd = 1000
# With cephx off the OSD exits at start unless it leaves CRUSH and its classes alone.
osd crush update on start = false
osd class update on start = false
osd objectstore = bluestore
osd memory target = 1073741824
bluestore cache autotune = false
bluestore cache size = 134217728
[mon.a]
mon data = $DIR/ceph/mon/a
[osd.0]
osd data = $DIR/ceph/osd/0
bluestore block path = $DIR/ceph/osd-0.block
bluestore block create = true
bluestore block size = 4294967296
[client.rgw.a]
rgw data = $DIR/ceph/rgw
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw dns name = 127.0.0.1
EOF
}

ceph_cmd() { ceph -c "$DIR/ceph/ceph.conf" --connect-timeout 10 "$@"; }

ceph_create() {  # first start only: monitor store, OSD in the CRUSH map, the S3 user
  local uuid
  uuidgen >"$DIR/ceph/fsid"
  ceph_conf
  monmaptool --create --addv a "[v1:127.0.0.1:$MON_PORT]" --fsid "$(cat "$DIR/ceph/fsid")" "$DIR/ceph/monmap" >/dev/null
  ceph-mon -c "$DIR/ceph/ceph.conf" --mkfs -i a --monmap "$DIR/ceph/monmap" >/dev/null
  ceph-mon -c "$DIR/ceph/ceph.conf" -i a
  uuid="$(uuidgen)"
  ceph_cmd osd new "$uuid" >/dev/null
  ceph-osd -c "$DIR/ceph/ceph.conf" -i 0 --mkfs --osd-uuid "$uuid" >"$DIR/ceph/log/osd-mkfs.out" 2>&1
  ceph_cmd osd crush add osd.0 1 root=default >/dev/null
  touch "$DIR/ceph/created"
}

ceph_up() {
  command -v radosgw >/dev/null || {
    log "installing Ceph (ceph-mon ceph-osd radosgw)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ceph-mon ceph-osd radosgw >/dev/null
  }
  mkdir -p "$DIR/ceph/run" "$DIR/ceph/log" "$DIR/ceph/mon/a" "$DIR/ceph/osd/0" "$DIR/ceph/rgw"
  if [[ ! -f "$DIR/ceph/created" ]]; then
    stop_pid radosgw; stop_pid ceph-osd; stop_pid ceph-mon  # a half-made cluster from an interrupted first start
    rm -rf "$DIR/ceph/mon/a" "$DIR/ceph/osd/0" "$DIR/ceph/run/mon.a.pid" && mkdir -p "$DIR/ceph/mon/a" "$DIR/ceph/osd/0"
    ceph_create
  elif ! running ceph-mon; then
    ceph_conf
    rm -f "$DIR/ceph/run/mon.a.pid"
    ceph-mon -c "$DIR/ceph/ceph.conf" -i a
  fi
  wait_for 30 "ceph-mon" test -s "$DIR/ceph/run/mon.a.pid"
  cp "$DIR/ceph/run/mon.a.pid" "$PIDS/ceph-mon"
  if ! running ceph-osd; then
    rm -f "$DIR/ceph/run/osd.0.pid"
    ceph-osd -c "$DIR/ceph/ceph.conf" -i 0
    wait_for 30 "ceph-osd" test -s "$DIR/ceph/run/osd.0.pid"
    cp "$DIR/ceph/run/osd.0.pid" "$PIDS/ceph-osd"
  fi
  wait_for 60 "osd.0 up" bash -c "ceph -c '$DIR/ceph/ceph.conf' osd dump | grep -q '^osd.0 up'"
  rgw_up
  if ! radosgw-admin -c "$DIR/ceph/ceph.conf" user info --uid=kvlib >/dev/null 2>&1; then
    radosgw-admin -c "$DIR/ceph/ceph.conf" user create --uid=kvlib --display-name=kvlib \
      --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null
  fi
  log "Ceph S3 gateway on http://127.0.0.1:$RGW_PORT (mon $(cat "$PIDS/ceph-mon"), osd $(cat "$PIDS/ceph-osd"), rgw $(cat "$PIDS/radosgw"))"
}

rgw_up() {
  if running radosgw; then return; fi
  rm -f "$DIR/ceph/run/client.rgw.a.pid"
  radosgw -c "$DIR/ceph/ceph.conf" -n client.rgw.a
  wait_for 60 "radosgw" test -s "$DIR/ceph/run/client.rgw.a.pid"
  cp "$DIR/ceph/run/client.rgw.a.pid" "$PIDS/radosgw"
  wait_for 90 "the S3 gateway" curl -sf -o /dev/null "http://127.0.0.1:$RGW_PORT/"
}

ceph_down() { stop_pid radosgw; stop_pid ceph-osd; stop_pid ceph-mon; }

# -- shared ---------------------------------------------------------------------

running() {  # running NAME: the PID recorded for NAME is alive and is that program
  local file="$PIDS/$1" pid
  [[ -f "$file" ]] || return 1
  pid="$(cat "$file")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1"* ]]
}

stop_pid() {  # stop_pid NAME: TERM the recorded PID, wait, then KILL
  local file="$PIDS/$1" pid
  [[ -f "$file" ]] || return 0
  pid="$(cat "$file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

write_env() {
  cat >"$DIR/env" <<EOF
KVLIB_STORE=s3://$BUCKET/chunks
KVLIB_MANIFEST=postgresql://postgres@127.0.0.1:$PG_PORT/kvlib
AWS_ENDPOINT_URL=http://127.0.0.1:$RGW_PORT
AWS_ACCESS_KEY_ID=$ACCESS_KEY
AWS_SECRET_ACCESS_KEY=$SECRET_KEY
AWS_DEFAULT_REGION=us-east-1
EOF
  log "wrote $DIR/env"
}

main() {
  local action="${1:-}" which="${2:-all}"
  mkdir -p "$PIDS"
  printf 'PG_PORT=%s\nRGW_PORT=%s\nMON_PORT=%s\n' "$PG_PORT" "$RGW_PORT" "$MON_PORT" >"$DIR/ports"
  case "$action:$which" in
    up:all) pg_up; ceph_up; write_env ;;
    up:postgres) pg_up ;;
    up:s3) ceph_up ;;
    up:rgw) rgw_up ;;
    down:all) rm -f "$DIR/env"; ceph_down; pg_down ;;
    down:postgres) pg_down ;;
    down:s3) ceph_down ;;
    down:rgw) stop_pid radosgw ;;
    clean:*) local pg; pg="$(pg_dir_known)"; main down all; rm -rf "$pg" "$DIR" ;;
    *) echo "usage: $0 up|down|clean [s3|rgw|postgres]" >&2; exit 2 ;;
  esac
}

main "$@"
