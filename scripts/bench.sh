#!/usr/bin/env bash
# imap-gateway benchmark: real Dovecot backends, the gateway (release build) and
# tools/loadgen, every scenario run against the bare backend and through the gateway in the
# same run. See docs/benchmarks.md.
#
#   sudo ./scripts/bench.sh                       full run (a few minutes)
#   sudo ./scripts/bench.sh --scenarios login,fetch --duration 5s --repeat 2
#
# Options (defaults in brackets):
#   --scenarios LIST      login,login-hashed,login-tls,login-tls-resume,fetch,latency,idle,
#                         idle-tls [all of them]
#   --login-clients N     login storm clients [32]
#   --fetch-clients N     bulk fetch clients [8]
#   --latency-clients L   comma list of client counts for the latency scenario [1,8]
#   --latency-paced L     comma list of CLIENTS@RATE latency runs at a fixed command rate
#                         (an open loop below saturation: the added latency at that load,
#                         rather than the queueing of a saturated machine) [8@8000]
#   --duration D          measurement time of login, fetch and latency [10s]
#   --warmup D            load before measuring [2s]
#   --idle L              comma list of idle session counts [1000,20000]
#   --idle-tls L          comma list of idle session counts of idle-tls: the clients use
#                         implicit TLS (Dovecot's TLS ports, the gateway's TLS listener) [1000]
#   --idle-hold D         how long the idle sessions are held [10s]
#   --idle-ramp R         new idle sessions per second, and ended ones after the hold [500]
#   --idle-cap N          most idle sessions per gateway process [what the open-files limit
#                         allows one process: (limit - 200) / 2]; a larger idle count is run
#                         through several gateway processes (and loadgen processes), each on
#                         its own port, as replicas would be deployed
#   --users K             users on each backend [2000]
#   --messages M          messages of --size bytes in INBOX of users 1..fetch-clients [5]
#   --size BYTES          size of those messages [2000000]
#   --repeat N            run the whole set N times [1]
#   --gw-log LEVEL        the gateway's log level, and nginx's error_log level to match
#                         (anything finer than info: info, as nginx's debug needs a debug
#                         build) [info]
#   --gw-perf TOML        extra lines for the gateway's [performance] section, e.g.
#                         'splice = false' or 'worker_threads = 1' (to measure what they do)
#   --pass-scheme S       the password scheme of users user1.. in Dovecot's passdb: PLAIN, or
#                         CRYPT (bcrypt, what `doveadm pw` makes by default) [PLAIN]; the
#                         users huser1.. of login-hashed always have CRYPT
#   --dovecot-services P  tuned (long-lived login processes, reused imap processes) or
#                         stock (Dovecot's defaults: a login and an imap process per
#                         connection) [tuned]
#   --peers LIST          other proxies measured in the same run, in front of the same
#                         Dovecots: dovecot-proxy (a third Dovecot in proxy mode), nginx
#                         (nginx's mail proxy), haproxy (a plain TCP forwarder, the floor:
#                         plain scenarios only), or none [dovecot-proxy,nginx]
#   --out DIR             results directory [target/bench/<timestamp>]
# Environment: BENCH_DIR (state: configs, mail, logs) [/var/tmp/imap-gateway-bench];
# BENCH_PORT (first of the loopback ports: BENCH_PORT..+17, and +20..+79 for the extra gateway
# processes of large idle runs) [21140]; BENCH_GATEWAY (another build of the gateway to
# measure, for an A/B against a branch) [target/release/imap-gateway]; BENCH_OWN_SESSION (the
# command that starts the gateway and haproxy in a session of their own; empty: in this
# script's session, as loadgen) [setsid].
#
# Needs root (Dovecot's processes change user). Installs dovecot-imapd, openssl and python3
# with apt-get if missing. Stops everything it started on exit, also on Ctrl-C.
# shellcheck disable=SC2317 # functions run through wait_until or the trap
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER=$REPO/scripts/bench_helper.py

SCENARIOS=login,login-hashed,login-tls,login-tls-resume,fetch,latency,idle,idle-tls
LOGIN_CLIENTS=32
FETCH_CLIENTS=8
LATENCY_CLIENTS=1,8
LATENCY_PACED=8@8000
DURATION=10s
WARMUP=2s
IDLE_COUNTS=1000,20000
IDLE_TLS_COUNTS=1000
IDLE_HOLD=10s
IDLE_RAMP=500
IDLE_CAP=
USERS=2000
MESSAGES=5
SIZE=2000000
REPEAT=1
GW_LOG=info
GW_PERF=
PASS_SCHEME=PLAIN
DOVECOT_SERVICES=tuned
PEERS=dovecot-proxy,nginx
# User n's backend is HOME_OF[n % 2], as loadgen's --target order gives it in direct runs;
# the Dovecot proxy's passdb, nginx's map and the gateway's routes all follow it.
HOME_OF=(bench-a bench-b)
# Every daemon in a session of its own (setsid): see "Scheduling groups" in docs/benchmarks.md.
OWN_SESSION=${BENCH_OWN_SESSION-setsid}
OUT=
PASSWORD=benchpw
MAIL_USER=imapgwbench

die() {
  printf 'bench.sh: %s\n' "$*" >&2
  exit 1
}
say() { printf '==> %s\n' "$*" >&2; }

while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "option $1 needs a value (see the head of $0)"
  case $1 in
  --scenarios) SCENARIOS=$2 ;;
  --login-clients) LOGIN_CLIENTS=$2 ;;
  --fetch-clients) FETCH_CLIENTS=$2 ;;
  --latency-clients) LATENCY_CLIENTS=$2 ;;
  --latency-paced) LATENCY_PACED=$2 ;;
  --duration) DURATION=$2 ;;
  --warmup) WARMUP=$2 ;;
  --idle) IDLE_COUNTS=$2 ;;
  --idle-tls) IDLE_TLS_COUNTS=$2 ;;
  --idle-hold) IDLE_HOLD=$2 ;;
  --idle-ramp) IDLE_RAMP=$2 ;;
  --idle-cap) IDLE_CAP=$2 ;;
  --users) USERS=$2 ;;
  --messages) MESSAGES=$2 ;;
  --size) SIZE=$2 ;;
  --repeat) REPEAT=$2 ;;
  --gw-log) GW_LOG=$2 ;;
  --gw-perf) GW_PERF=$2 ;;
  --pass-scheme) PASS_SCHEME=$2 ;;
  --dovecot-services) DOVECOT_SERVICES=$2 ;;
  --peers) PEERS=$2 ;;
  --out) OUT=$2 ;;
  *) die "unknown option $1 (see the head of $0)" ;;
  esac
  shift 2
done

[ "$(id -u)" -eq 0 ] || die "run this as root: sudo $0"
case $PASS_SCHEME in PLAIN | CRYPT) ;; *) die "--pass-scheme: PLAIN or CRYPT, not $PASS_SCHEME" ;; esac
case $DOVECOT_SERVICES in tuned | stock) ;; *) die "--dovecot-services: tuned or stock, not $DOVECOT_SERVICES" ;; esac
for p in ${PEERS//,/ }; do
  case $p in dovecot-proxy | nginx | haproxy | none) ;; *) die "--peers: dovecot-proxy, nginx, haproxy or none, not $p" ;; esac
done

BENCH_DIR=${BENCH_DIR:-/var/tmp/imap-gateway-bench}
BASE=${BENCH_PORT:-21140}
GW_PORT=$((BASE + 3))
GW_TLS_PORT=$((BASE + 4))
GW_ADMIN_PORT=$((BASE + 5))
declare -A PORT=([bench-a]=$((BASE + 0)) [bench-b]=$((BASE + 1)))
declare -A TLS_PORT=([bench-a]=$((BASE + 10)) [bench-b]=$((BASE + 11)))
INSTANCES=(bench-a bench-b)
# The peer: Dovecot in proxy mode in front of the same two instances.
PEER_PORT=$((BASE + 6))
PEER_TLS_PORT=$((BASE + 16))
PEER_DIR=$BENCH_DIR/peer-dovecot
want_peer() { [[ ",$PEERS," == *",dovecot-proxy,"* ]]; }
# The other peer: nginx's mail proxy, with its auth_http answered by its own http server.
NGINX_PORT=$((BASE + 7))
NGINX_TLS_PORT=$((BASE + 17))
NGINX_AUTH_PORT=$((BASE + 8))
NGINX_DIR=$BENCH_DIR/peer-nginx
want_nginx() { [[ ",$PEERS," == *",nginx,"* ]]; }
# The floor: haproxy in TCP mode, one port per Dovecot, no IMAP at all. It only shows what
# a second loopback TCP hop costs, which every proxy pays; it cannot route a user itself,
# so loadgen spreads users over its two ports exactly as over the two Dovecots directly.
HAPROXY_PORTS=($((BASE + 12)) $((BASE + 13)))
HAPROXY_DIR=$BENCH_DIR/peer-haproxy
want_haproxy() { [[ ",$PEERS," == *",haproxy,"* ]]; }

# --- processes (no procps needed) ---------------------------------------------------------

alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}
dead() { ! alive "$1"; }
group_empty() {
  local f stat fields
  for f in /proc/[0-9]*/stat; do
    stat=$(cat "$f" 2>/dev/null) || continue
    read -r -a fields <<<"${stat##*) }"
    [ "${fields[2]}" = "$1" ] && [ "${fields[0]}" != Z ] && return 1
  done
  return 0
}
wait_until() {
  local seconds=$1 i
  shift
  for ((i = 0; i < seconds * 10; i++)); do
    "$@" && return 0
    sleep 0.1
  done
  return 1
}
# Whether a server on 127.0.0.1:$1 sends an "* OK" greeting (a subshell: its own stderr).
greets() (
  local line
  exec 2>/dev/null
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  IFS= read -r -t 2 line <&3 || return 1
  printf 'x LOGOUT\r\n' >&3 || true
  [[ "$line" == "* OK"* ]]
)
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

DOVECOT_PIDS=()
PEER_PID=
NGINX_PID=
# stop_daemon PID [group]: TERM, up to 10 s to end, then KILL (its whole process group with
# "group", for a daemon that started workers of its own).
stop_daemon() {
  local pid=$1 victim=$1
  [ "${2:-}" = group ] && victim=-$1
  if [ -n "$pid" ] && alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    wait_until 10 dead "$pid" || kill -KILL -- "$victim" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
}
stop_nginx() {
  stop_daemon "$NGINX_PID" group
  NGINX_PID=
}
HAPROXY_PID=
stop_haproxy() {
  stop_daemon "$HAPROXY_PID"
  HAPROXY_PID=
}
GW_PID=
stop_gateway() {
  local pid
  for pid in $GW_PID "${GW_EXTRA_PIDS[@]}"; do
    if alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      wait_until 5 dead "$pid" || kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  GW_PID=
  GW_EXTRA_PIDS=()
}
GW_EXTRA_PIDS=()
stop_dovecots() {
  local pid
  for pid in "${DOVECOT_PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in "${DOVECOT_PIDS[@]}"; do
    if ! wait_until 10 group_empty "$pid"; then
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  DOVECOT_PIDS=()
  PEER_PID=
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM HUP
  stop_gateway
  stop_nginx
  stop_haproxy
  stop_dovecots
  if [ -n "${INOTIFY_OLD:-}" ] && [ "$(cat "$INOTIFY")" != "$INOTIFY_OLD" ]; then
    echo "$INOTIFY_OLD" >"$INOTIFY" || true
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- 1. packages, build, limits -----------------------------------------------------------

missing=()
[ -x /usr/sbin/dovecot ] || missing+=(dovecot-imapd)
if want_nginx; then
  [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
  [ -e /usr/lib/nginx/modules/ngx_mail_module.so ] || missing+=(libnginx-mod-mail)
fi
if want_haproxy; then [ -x /usr/sbin/haproxy ] || missing+=(haproxy); fi
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo=$(command -v cargo || true)
[ -n "$cargo" ] || { [ -x "$HOME/.cargo/bin/cargo" ] && cargo=$HOME/.cargo/bin/cargo; }
[ -n "$cargo" ] || die "cargo not found: install Rust (https://rustup.rs) first"
say "cargo build --release --workspace"
(cd "$REPO" && "$cargo" build --release --workspace)
GATEWAY=${BENCH_GATEWAY:-$REPO/target/release/imap-gateway}
LOADGEN=$REPO/target/release/loadgen

# 20,000 idle sessions: one descriptor each in loadgen, two in the gateway, one or more in
# Dovecot. Everything started from here inherits these limits.
# Raising the hard limit needs CAP_SYS_RESOURCE, which some containers drop: then the
# hard limit bounds the idle counts (the gateway holds two descriptors per session).
NOFILE=$(cat /proc/sys/fs/nr_open)
((NOFILE > 1048576)) && NOFILE=1048576
if ! ulimit -Hn "$NOFILE" 2>/dev/null; then
  say "cannot raise the hard limit of open files to $NOFILE (no CAP_SYS_RESOURCE?); it stays $(ulimit -Hn)"
fi
ulimit -Sn "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
ulimit -u unlimited 2>/dev/null || true
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)

# Every IDLE session's imap process takes an inotify instance of the mail user, and Dovecot
# hibernates a session only with one: at the default of 128 per user, the rest stay in imap
# processes up to process_limit. Raised for the run, restored on exit.
INOTIFY=/proc/sys/fs/inotify/max_user_instances
INOTIFY_OLD=$(cat "$INOTIFY")
if ((INOTIFY_OLD < 65536)); then
  echo 65536 >"$INOTIFY" || say "cannot raise $INOTIFY: idle sessions will not all hibernate"
fi

for p in "${PORT[@]}" "${TLS_PORT[@]}" "$GW_PORT" "$GW_TLS_PORT" "$GW_ADMIN_PORT"; do
  port_busy "$p" && die "127.0.0.1:$p is in use (BENCH_PORT picks other ports)"
done

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$REPO/target/bench/$STAMP}
mkdir -p "$OUT" "$BENCH_DIR"
OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
chmod 755 "$BENCH_DIR"

# --- 2. TLS: a CA and an ECDSA P-256 certificate for localhost and 127.0.0.1 ----------------

TLS=$BENCH_DIR/tls
if [ ! -s "$TLS/server.pem" ]; then
  say "making a test CA and server certificate in $TLS"
  mkdir -p "$TLS"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj /CN=imap-gateway-bench-ca -keyout "$TLS/ca.key" -out "$TLS/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
    -keyout "$TLS/server.key" -out "$TLS/server.csr" 2>/dev/null
  printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'basicConstraints=CA:FALSE' \
    'keyUsage=digitalSignature' 'extendedKeyUsage=serverAuth' >"$TLS/ext.cnf"
  openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" \
    -CAcreateserial -days 3650 -extfile "$TLS/ext.cnf" -out "$TLS/server.pem" 2>/dev/null
fi

# --- 3. Dovecot: two instances, users and seeded Maildirs ---------------------------------

if ! id -u "$MAIL_USER" >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    --user-group "$MAIL_USER"
fi
MAIL_UID=$(id -u "$MAIL_USER")
MAIL_GID=$(id -g "$MAIL_USER")
BIG_USERS=$FETCH_CLIENTS
for l in ${LATENCY_CLIENTS//,/ }; do ((l > BIG_USERS)) && BIG_USERS=$l; done
for l in ${LATENCY_PACED//,/ }; do ((${l%@*} > BIG_USERS)) && BIG_USERS=${l%@*}; done

# The process settings of --dovecot-services: tuned, or Dovecot's own defaults (stock).
login_services() {
  [ "$DOVECOT_SERVICES" = tuned ] || {
    echo "  # stock: Dovecot's defaults (a login process per connection)"
    return
  }
  cat <<EOF2
  # "High-performance mode": long-lived login processes, each with many clients.
  service_count = 0
  process_min_avail = 2
  client_limit = 5000
  process_limit = 8
EOF2
}
imap_services() {
  if [ "$DOVECOT_SERVICES" = tuned ]; then
    cat <<EOF2
  # Reuse imap processes instead of forking one per login (about 8 ms CPU each).
  service_count = 1000
  idle_kill = 30s
EOF2
  else
    echo "  # stock: Dovecot's defaults (an imap process per login)"
  fi
  echo "  process_limit = 5000"
}

write_dovecot_conf() {
  local inst=$1 d=$BENCH_DIR/$1
  cat >"$d/dovecot.conf" <<EOF
# Written by scripts/bench.sh: Dovecot instance $inst, tuned for load (docs/benchmarks.md).
base_dir = $d/run
state_dir = $d/state
instance_name = $inst
login_greeting = Dovecot ready ($inst)
protocols = imap
listen = 127.0.0.1
shutdown_clients = yes
log_path = $d/dovecot.log
info_log_path = $d/dovecot-info.log

default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = $MAIL_UID
first_valid_gid = $MAIL_GID
mail_uid = $MAIL_UID
mail_gid = $MAIL_GID
mail_location = maildir:~/Maildir:LAYOUT=fs

ssl = yes
ssl_cert = <$TLS/server.pem
ssl_key = <$TLS/server.key
disable_plaintext_auth = no
auth_mechanisms = plain login
login_trusted_networks = 127.0.0.0/8

# Many sessions per user and address, many processes and clients.
mail_max_userip_connections = 100000
default_process_limit = 5000
default_client_limit = 100000
default_vsz_limit = 1G

# IDLE sessions move to one imap-hibernate process after this long, so that 20,000 of
# them do not need 20,000 imap processes.
imap_hibernate_timeout = 2s

passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $d/users.passwd
}
userdb {
  driver = static
  args = uid=$MAIL_UID gid=$MAIL_GID home=$d/mail/%u
}

namespace inbox {
  inbox = yes
  separator = /
  prefix =
}

service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = ${PORT[$inst]}
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = ${TLS_PORT[$inst]}
    ssl = yes
  }
$(login_services)
}

service imap {
$(imap_services)
  unix_listener imap-master {
    user = \$default_internal_user
  }
  extra_groups = \$default_internal_group
}

service imap-hibernate {
  # Several processes: each holds one descriptor per session, under RLIMIT_NOFILE.
  client_limit = 5000
  process_limit = 8
  unix_listener imap-hibernate {
    mode = 0660
    group = \$default_internal_group
  }
}
EOF
}

# One hash for every hashed user (same password): what each login verifies costs the same.
HASH=$(/usr/bin/doveadm pw -s CRYPT -p "$PASSWORD")
# The users user1..K as the passdb holds them.
if [ "$PASS_SCHEME" = CRYPT ]; then USER_SECRET=$HASH; else USER_SECRET="{PLAIN}$PASSWORD"; fi
for inst in "${INSTANCES[@]}"; do
  d=$BENCH_DIR/$inst
  mkdir -p "$d/run" "$d/state" "$d/mail"
  chmod 755 "$d" "$d/mail"
  write_dovecot_conf "$inst"
  say "seeding $inst: $USERS users, users 1..$BIG_USERS with $MESSAGES messages of $SIZE bytes"
  python3 "$HELPER" seed "$d" "$MAIL_UID" "$MAIL_GID" "$USERS" "$USER_SECRET" "$BIG_USERS" \
    "$MESSAGES" "$SIZE" "$HASH"
  chown root:dovecot "$d/users.passwd"
  chmod 640 "$d/users.passwd"
  # A previous run that was killed hard may have left this instance running.
  if [ -s "$d/run/master.pid" ]; then
    old=$(<"$d/run/master.pid")
    if alive "$old" && tr '\0' ' ' <"/proc/$old/cmdline" | grep -qF "$d/dovecot.conf"; then
      kill -TERM -- "-$old" 2>/dev/null || kill -TERM "$old" 2>/dev/null || true
      wait_until 10 dead "$old" || kill -KILL "$old" 2>/dev/null || true
    fi
  fi
done

# The peer: a Dovecot that only proxies (Dovecot's "proxy mode", as mail operators deploy
# it): its passdb gives each user the backend (by user number, as loadgen's direct runs
# spread them) and it forwards the client's password and address (ID), tuned like the
# backends (long-lived login processes, which do the proxying).
write_peer_conf() {
  local d=$PEER_DIR n port
  mkdir -p "$d/run" "$d/state"
  chmod 755 "$d"
  cat >"$d/dovecot.conf" <<EOF
# Written by scripts/bench.sh: Dovecot in proxy mode, the peer measured beside the gateway.
base_dir = $d/run
state_dir = $d/state
instance_name = peer-dovecot
login_greeting = Dovecot proxy ready
protocols = imap
listen = 127.0.0.1
shutdown_clients = yes
log_path = $d/dovecot.log
info_log_path = $d/dovecot-info.log
default_internal_user = dovecot
default_login_user = dovenull
ssl = yes
ssl_cert = <$TLS/server.pem
ssl_key = <$TLS/server.key
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_max_userip_connections = 100000
default_process_limit = 5000
default_client_limit = 100000
default_vsz_limit = 1G
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $d/users.passwd
}
userdb {
  driver = static
  args = uid=$MAIL_UID gid=$MAIL_GID home=/nonexistent
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $PEER_PORT
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $PEER_TLS_PORT
    ssl = yes
  }
$(login_services)
}
EOF
  # Users 1..K, user n on the instance loadgen's direct runs give it (targets by n mod 2).
  # The husers are checked here as the users are (the backend checks their hash again).
  for ((n = 1; n <= USERS; n++)); do
    for u in user huser; do
      echo "$u$n:{PLAIN}$PASSWORD::::::proxy=y host=127.0.0.1 port=${PORT[${HOME_OF[n % 2]}]}"
    done
  done >"$d/users.passwd"
  chown root:dovecot "$d/users.passwd"
  chmod 640 "$d/users.passwd"
}

want_peer && write_peer_conf

# nginx's mail proxy as its documentation sets it up: auth_http says where each user goes
# (here its own http server, by the user number's parity, as the direct runs spread them;
# a real deployment asks an external service, which costs more), then nginx logs in on
# the backend with the client's credentials and relays.
write_nginx_conf() {
  local d=$NGINX_DIR
  # The same log level as the gateway's: at info both write their lines per session (nginx
  # three: connected, logged in, session done), at warn neither writes any.
  local level=$GW_LOG
  case $level in error | warn | info) ;; off) level=emerg ;; *) level=info ;; esac
  mkdir -p "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
# Written by scripts/bench.sh: nginx's mail proxy, a peer measured beside the gateway.
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
daemon off;
worker_processes auto;
worker_rlimit_nofile 20000;
pid $d/nginx.pid;
error_log $d/error.log $level;
events {
  worker_connections 10000;
}
http {
  access_log off;
  client_body_temp_path $d/tmp;
  proxy_temp_path $d/tmp;
  fastcgi_temp_path $d/tmp;
  uwsgi_temp_path $d/tmp;
  scgi_temp_path $d/tmp;
  map \$http_auth_user \$backend_port {
    ~[02468]\$ ${PORT[bench-a]};
    default ${PORT[bench-b]};
  }
  server {
    listen 127.0.0.1:$NGINX_AUTH_PORT;
    location = /auth {
      add_header Auth-Status OK;
      add_header Auth-Server 127.0.0.1;
      add_header Auth-Port \$backend_port;
      return 204;
    }
  }
}
mail {
  server_name localhost;
  auth_http 127.0.0.1:$NGINX_AUTH_PORT/auth;
  proxy_pass_error_message on;
  imap_capabilities IMAP4rev1 LITERAL+ SASL-IR ID IDLE;
  ssl_certificate $TLS/server.pem;
  ssl_certificate_key $TLS/server.key;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    protocol imap;
    imap_auth plain login;
  }
  server {
    listen 127.0.0.1:$NGINX_TLS_PORT ssl;
    protocol imap;
    imap_auth plain login;
  }
}
EOF
}
want_nginx && write_nginx_conf

# haproxy as an L4 forwarder with splice: the least any proxy can do per connection (accept,
# connect, move bytes), and no log lines, so its figures are a floor, not a peer's.
write_haproxy_conf() {
  mkdir -p "$HAPROXY_DIR"
  cat >"$HAPROXY_DIR/haproxy.cfg" <<EOF
# Written by scripts/bench.sh: a TCP forwarder, the floor under every proxy measured.
global
  # Two descriptors a connection and, with splice, two per pipe (maxpipes: maxconn / 4),
  # within the open-files limit raised above; the scenarios run here need far fewer.
  maxconn $((NOFILE / 4))
  pidfile $HAPROXY_DIR/haproxy.pid
defaults
  mode tcp
  option splice-auto
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen bench-a
  bind 127.0.0.1:${HAPROXY_PORTS[0]}
  server bench-a 127.0.0.1:${PORT[bench-a]}
listen bench-b
  bind 127.0.0.1:${HAPROXY_PORTS[1]}
  server bench-b 127.0.0.1:${PORT[bench-b]}
EOF
}
want_haproxy && write_haproxy_conf

start_haproxy() {
  stop_haproxy
  say "starting the floor, haproxy in TCP mode, on 127.0.0.1:${HAPROXY_PORTS[0]} and ${HAPROXY_PORTS[1]}"
  $OWN_SESSION /usr/sbin/haproxy -db -f "$HAPROXY_DIR/haproxy.cfg" </dev/null >"$HAPROXY_DIR/haproxy.out" 2>&1 &
  HAPROXY_PID=$!
  wait_until 10 greets "${HAPROXY_PORTS[0]}" || {
    cat "$HAPROXY_DIR/haproxy.out" >&2 || true
    die "haproxy did not start"
  }
}

start_nginx() {
  stop_nginx
  say "starting the peer nginx (mail proxy) on 127.0.0.1:$NGINX_PORT (TLS $NGINX_TLS_PORT)"
  setsid /usr/sbin/nginx -c "$NGINX_DIR/nginx.conf" </dev/null >"$NGINX_DIR/nginx.out" 2>&1 &
  NGINX_PID=$!
  wait_until 10 greets "$NGINX_PORT" || {
    cat "$NGINX_DIR/nginx.out" "$NGINX_DIR/error.log" >&2 || true
    die "nginx did not start"
  }
}

# (Re)starts both instances: every repetition starts from fresh Dovecots, not from one still
# busy thawing and reaping the thousands of sessions and processes of an idle run.
start_dovecots() {
  local inst d
  stop_dovecots
  for inst in "${INSTANCES[@]}"; do
    d=$BENCH_DIR/$inst
    say "starting Dovecot $inst on 127.0.0.1:${PORT[$inst]} (TLS ${TLS_PORT[$inst]})"
    # Foreground (-F) in its own process group, so that it is reaped here and stopped whole.
    setsid /usr/sbin/dovecot -F -c "$d/dovecot.conf" </dev/null >"$d/dovecot.out" 2>&1 &
    DOVECOT_PIDS+=($!)
  done
  if want_peer; then
    say "starting the peer, Dovecot in proxy mode, on 127.0.0.1:$PEER_PORT (TLS $PEER_TLS_PORT)"
    setsid /usr/sbin/dovecot -F -c "$PEER_DIR/dovecot.conf" </dev/null >"$PEER_DIR/dovecot.out" 2>&1 &
    PEER_PID=$!
    DOVECOT_PIDS+=("$PEER_PID")
    wait_until 20 greets "$PEER_PORT" || {
      cat "$PEER_DIR/dovecot.out" "$PEER_DIR/dovecot.log" >&2 || true
      die "the Dovecot proxy did not start"
    }
  fi
  for inst in "${INSTANCES[@]}"; do
    d=$BENCH_DIR/$inst
    wait_until 20 greets "${PORT[$inst]}" ||
      {
        cat "$d/dovecot.out" "$d/dovecot.log" >&2 || true
        die "Dovecot $inst did not start"
      }
  done
}

# --- 4. the gateway -----------------------------------------------------------------------

# Both in every gateway configuration: the --gw-perf settings, and the gateway's own limits
# off, since the benchmark loads it on purpose.
GW_TUNING="[performance]
$GW_PERF

[limits]
max_connections = 0
max_connections_per_ip = 0
max_sessions_per_user = 0
auth_penalty_base = \"0s\""
cat >"$BENCH_DIR/gateway.toml" <<EOF
# Written by scripts/bench.sh.
routing_table = "routing.toml"

[[listeners]]
name = "plain"
address = "127.0.0.1:$GW_PORT"
mode = "plain"
allow_plaintext_auth = true

[[listeners]]
name = "tls"
address = "127.0.0.1:$GW_TLS_PORT"
mode = "tls"
tls_cert = "$TLS/server.pem"
tls_key = "$TLS/server.key"

[admin]
address = "127.0.0.1:$GW_ADMIN_PORT"

[log]
level = "$GW_LOG"

$GW_TUNING
EOF
cat >"$BENCH_DIR/routing.toml" <<EOF
# Written by scripts/bench.sh: user n on the backend that loadgen's direct runs, nginx and the
# Dovecot proxy give it (n mod 2: even on bench-a), one route per user. Left to the pool's
# rendezvous hashing, the few users of a latency or fetch run fall unevenly (users 1-8: six
# on bench-a), and the gateway would be measured on a busier Dovecot than the others.
default_pool = ["bench-a", "bench-b"]

[[backends]]
name = "bench-a"
address = "127.0.0.1:${PORT[bench-a]}"
tls = "none"
trusted = true

[[backends]]
name = "bench-b"
address = "127.0.0.1:${PORT[bench-b]}"
tls = "none"
trusted = true
EOF
for ((n = 1; n <= USERS; n++)); do
  for u in user huser; do
    printf '\n[[routes]]\nuser = "%s%d"\nbackend = "%s"\n' "$u" "$n" "${HOME_OF[n % 2]}"
  done
done >>"$BENCH_DIR/routing.toml"
"$GATEWAY" check-config --config "$BENCH_DIR/gateway.toml" >/dev/null
# Not beside gateway.toml: the gateway watches that directory for changes, and a log written
# there costs it a wake-up per line (docs/configuration.md, Reloading).
GW_LOGFILE=$BENCH_DIR/log/gateway.log
mkdir -p "$BENCH_DIR/log"
: >"$GW_LOGFILE" # this run's gateways only (each restart appends)

# A fresh gateway for every measured run: RSS and CPU start from the same state.
start_gateway() {
  stop_gateway
  $OWN_SESSION "$GATEWAY" run --config "$BENCH_DIR/gateway.toml" </dev/null >>"$GW_LOGFILE" 2>&1 &
  GW_PID=$!
  wait_until 10 greets "$GW_PORT" || die "the gateway did not start (log: $GW_LOGFILE)"
}

# start_gateways K: the gateway and K-1 more processes, each with its own plain listener,
# admin port and TLS listener (BASE+20+k, BASE+40+k, BASE+60+k) on the same routing table.
start_gateways() {
  local k conf
  # Listener ports BASE+21.., admin ports BASE+41.., TLS BASE+61..: at most 19 extra
  # processes fit between.
  (($1 <= 20)) || die "$1 gateway processes: at most 20 (raise --idle-cap or the open-files limit)"
  start_gateway
  GW_PORTS=("$GW_PORT")
  GW_TLS_PORTS=("$GW_TLS_PORT")
  GW_ADMIN_PORTS=("$GW_ADMIN_PORT")
  for ((k = 1; k < $1; k++)); do
    conf=$BENCH_DIR/gateway-$k.toml
    cat >"$conf" <<EOF2
# Written by scripts/bench.sh: extra gateway process $k of a large idle run.
routing_table = "routing.toml"

[[listeners]]
name = "plain"
address = "127.0.0.1:$((BASE + 20 + k))"
mode = "plain"
allow_plaintext_auth = true

[[listeners]]
name = "tls"
address = "127.0.0.1:$((BASE + 60 + k))"
mode = "tls"
tls_cert = "$TLS/server.pem"
tls_key = "$TLS/server.key"

[admin]
address = "127.0.0.1:$((BASE + 40 + k))"

[log]
level = "$GW_LOG"

$GW_TUNING
EOF2
    $OWN_SESSION "$GATEWAY" run --config "$conf" </dev/null >>"$GW_LOGFILE" 2>&1 &
    GW_EXTRA_PIDS+=($!)
    GW_PORTS+=($((BASE + 20 + k)))
    GW_TLS_PORTS+=($((BASE + 60 + k)))
    GW_ADMIN_PORTS+=($((BASE + 40 + k)))
    wait_until 10 greets $((BASE + 20 + k)) || die "gateway process $k did not start"
  done
}

# idle_split CASE MODE REP N PROCS [--tls --ca PEM]: N idle sessions through PROCS gateway
# processes (or directly), from as many loadgen processes as the open-files limit needs.
# While they run, the gateways' session gauges and RSS are sampled every half second; the
# peak of concurrent sessions, and the RSS at that peak, go into the combined result. With
# --tls the clients use the TLS ports (the gateways' TLS listeners, Dovecot's imaps).
idle_split() {
  local case=$1 mode=$2 rep=$3 n=$4 procs=$5 tls=("${@:6}")
  local per_lg=$((NOFILE - 300)) lgs i share start target=() pid=() files=() lgpids=()
  lgs=$(((n + per_lg - 1) / per_lg))
  ((lgs < 2)) && lgs=2
  if [ "$mode" = gateway ]; then
    start_gateways "$procs"
    local ports=("${GW_PORTS[@]}")
    [ ${#tls[@]} -gt 0 ] && ports=("${GW_TLS_PORTS[@]}")
    for i in "${ports[@]}"; do target+=(--target "127.0.0.1:$i"); done
    for i in $GW_PID "${GW_EXTRA_PIDS[@]}"; do pid+=(--pid "$i"); done
  elif [ ${#tls[@]} -gt 0 ]; then
    target=(--target "127.0.0.1:${TLS_PORT[bench-a]}" --target "127.0.0.1:${TLS_PORT[bench-b]}")
  else
    target=(--target "127.0.0.1:${PORT[bench-a]}" --target "127.0.0.1:${PORT[bench-b]}")
  fi
  say "$case/$mode/$rep: $n idle sessions, $lgs loadgen processes$([ "$mode" = gateway ] && echo ", $procs gateway processes")"
  local peak=$OUT/$case-$mode-$rep.peak
  local gw_pids="$GW_PID ${GW_EXTRA_PIDS[*]}"
  if [ "$mode" = gateway ]; then
    python3 "$HELPER" sample-start "$peak" "${GW_ADMIN_PORTS[*]}" "$gw_pids"
  fi
  start=0
  for ((i = 0; i < lgs; i++)); do
    share=$((n / lgs + (i < n % lgs ? 1 : 0)))
    files+=("$OUT/$case-$mode-$rep.$i.json")
    # Users are spread by number over the targets: an offset per process keeps the mix even.
    "$LOADGEN" "${target[@]}" "${pid[@]}" --label "$case/$mode/$rep" --password "$PASSWORD" \
      "${tls[@]}" --scenario idle --clients "$share" --user-count "$USERS" --user-start $((1 + (start % USERS))) \
      --src-ips 250 --idle-ramp $((IDLE_RAMP / lgs)) --duration "$IDLE_HOLD" --warmup 3s \
      >"${files[$i]}" &
    lgpids+=($!)
    start=$((start + share))
  done
  local sampler=
  if [ "$mode" = gateway ]; then
    python3 "$HELPER" sample "$peak" "${GW_ADMIN_PORTS[*]}" "$gw_pids" "${lgpids[*]}" &
    sampler=$!
  fi
  for i in "${lgpids[@]}"; do wait "$i" || echo "a loadgen process failed in $case/$mode/$rep" >&2; done
  [ -n "$sampler" ] && wait "$sampler"
  python3 "$HELPER" combine "$case/$mode/$rep" "$([ "$mode" = gateway ] && echo "$peak" || echo -)" \
    "${files[@]}" >>"$RESULTS"
  tail -n 1 "$RESULTS" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("   ", ", ".join(f"{k} {r[k]}" for k in ("sessions_idling", "max_concurrent_sessions", "rss_kb_per_session") if r.get(k) is not None), "errors", r["errors"]["count"])' >&2
}

# --- 5. the scenarios ---------------------------------------------------------------------

# run CASE MODE REP LOADGEN-ARGS...: one loadgen run, its JSON line appended to the results.
run() {
  local case=$1 mode=$2 rep=$3 json
  shift 3
  # Direct runs spread the users over both Dovecots (each has all of them), as the gateway
  # does: both modes then load the same two servers. One Dovecot alone spends less CPU per
  # login than two (fewer processes to switch between), which would flatter the direct run.
  local target=(--target "127.0.0.1:${PORT[bench-a]}" --target "127.0.0.1:${PORT[bench-b]}")
  local pid=()
  if [[ " $* " == *" --tls "* ]]; then
    target=(--target "127.0.0.1:${TLS_PORT[bench-a]}" --target "127.0.0.1:${TLS_PORT[bench-b]}")
  fi
  if [ "$mode" = gateway ]; then
    start_gateway
    target=(--target "127.0.0.1:$GW_PORT")
    [[ " $* " == *" --tls "* ]] && target=(--target "127.0.0.1:$GW_TLS_PORT")
    pid=(--pid "$GW_PID")
  fi
  if [ "$mode" = nginx ]; then
    target=(--target "127.0.0.1:$NGINX_PORT")
    [[ " $* " == *" --tls "* ]] && target=(--target "127.0.0.1:$NGINX_TLS_PORT")
    pid=(--target-tree "$NGINX_PID")
  fi
  if [ "$mode" = haproxy ]; then
    target=(--target "127.0.0.1:${HAPROXY_PORTS[0]}" --target "127.0.0.1:${HAPROXY_PORTS[1]}")
    pid=(--pid "$HAPROXY_PID")
  fi
  if [ "$mode" = dovecot-proxy ]; then
    target=(--target "127.0.0.1:$PEER_PORT")
    [[ " $* " == *" --tls "* ]] && target=(--target "127.0.0.1:$PEER_TLS_PORT")
    # Its work is done in its login processes: the whole tree, reaped children included.
    pid=(--target-tree "$PEER_PID")
  fi
  # Both Dovecots, whole process trees, in every mode: what the backends spent per unit.
  local dpid
  for dpid in "${DOVECOT_PIDS[@]}"; do
    [ "$dpid" = "$PEER_PID" ] || pid+=(--backend-tree "$dpid")
  done
  say "$case/$mode/$rep: loadgen ${target[*]} $*"
  if ! json=$("$LOADGEN" "${target[@]}" "${pid[@]}" --label "$case/$mode/$rep" \
    --password "$PASSWORD" "$@"); then
    echo "loadgen failed for $case/$mode/$rep" >&2
    return 0
  fi
  printf '%s\n' "$json" >>"$RESULTS"
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("   ", ", ".join(f"{k} {r[k]}" for k in ("ops", "ops_per_s", "mb_per_s", "target_cpu_ms_per_op", "backend_cpu_ms_per_op", "self_cpu_ms_per_op", "rss_kb_per_session") if r.get(k) is not None), "errors", r["errors"]["count"])' "$json" >&2
  if [ "$mode" = gateway ] && ! alive "$GW_PID"; then
    echo "THE GATEWAY DIED during $case/$mode/$rep; last log lines:" >&2
    tail -n 20 "$GW_LOGFILE" >&2
  fi
}

both() {
  run "$1" direct "$2" "${@:3}"
  run "$1" gateway "$2" "${@:3}"
}

# Direct, the gateway, and the peers (login, fetch, latency). Even repetitions run the
# gateway after the peers: the machine and Dovecot's state drift over a scenario, and a
# fixed order would always hand the same proxy the same share of that drift.
with_peers() {
  run "$1" direct "$2" "${@:3}"
  if (($2 % 2 == 1)); then run "$1" gateway "$2" "${@:3}"; fi
  if want_peer; then run "$1" dovecot-proxy "$2" "${@:3}"; fi
  if want_nginx; then run "$1" nginx "$2" "${@:3}"; fi
  # The forwarder passes bytes through: over TLS it would measure Dovecot's TLS, not a floor.
  if want_haproxy && [[ " ${*:3} " != *" --tls "* ]]; then run "$1" haproxy "$2" "${@:3}"; fi
  if (($2 % 2 == 0)); then run "$1" gateway "$2" "${@:3}"; fi
}

# idle_counts NAME REP COUNTS [--tls --ca PEM]: the idle scenario once per session count.
idle_counts() {
  local name=$1 rep=$2 counts=$3 n max procs
  shift 3
  for n in ${counts//,/ }; do
    # Bounded by the open-files limit: loadgen needs one descriptor per session, the
    # gateway two (client and backend), plus a few of their own.
    max=${IDLE_CAP:-$(((NOFILE - 200) / 2))}
    if ((n > max)); then
      procs=$(((n + max - 1) / max))
      say "$name: $n sessions exceed what the open-files limit $NOFILE allows one gateway process ($max, --idle-cap): $procs gateway processes"
      idle_split "$name-$n" direct "$rep" "$n" "$procs" "$@"
      idle_split "$name-$n" gateway "$rep" "$n" "$procs" "$@"
      continue
    fi
    both "$name-$n" "$rep" "$@" --scenario idle --clients "$n" --user-count "$USERS" \
      --src-ips 250 --idle-ramp "$IDLE_RAMP" --duration "$IDLE_HOLD" --warmup 3s
  done
}

common=(--duration "$DURATION" --warmup "$WARMUP")
for ((rep = 1; rep <= REPEAT; rep++)); do
  start_dovecots
  if want_nginx; then start_nginx; fi
  if want_haproxy; then start_haproxy; fi
  for s in ${SCENARIOS//,/ }; do
    case $s in
    login)
      with_peers login-plain "$rep" --scenario login --clients "$LOGIN_CLIENTS" --user-count "$USERS" \
        --src-ips 64 "${common[@]}"
      ;;
    login-hashed)
      # The same storm by users whose passwords the backends keep hashed (bcrypt), as real
      # ones do: a Dovecot login then costs what the issue's reference figures show.
      with_peers login-hashed "$rep" --scenario login --users 'huser{n}' --clients "$LOGIN_CLIENTS" \
        --user-count "$USERS" --src-ips 64 "${common[@]}"
      ;;
    login-tls)
      with_peers login-tls "$rep" --scenario login --tls --ca "$TLS/ca.pem" --clients "$LOGIN_CLIENTS" \
        --user-count "$USERS" --src-ips 64 "${common[@]}"
      ;;
    login-tls-resume)
      # Every user a client with a TLS session cache of its own: a user's next login (about
      # 2,000 logins later) offers the session of its last. A longer warm-up, so that every
      # user has one before the measurement.
      with_peers login-tls-resume "$rep" --scenario login --tls --tls-resume --ca "$TLS/ca.pem" \
        --clients "$LOGIN_CLIENTS" --user-count "$USERS" --src-ips 64 --duration "$DURATION" --warmup 6s
      ;;
    fetch)
      with_peers fetch "$rep" --scenario fetch --clients "$FETCH_CLIENTS" --user-count "$FETCH_CLIENTS" \
        "${common[@]}"
      ;;
    latency)
      for c in ${LATENCY_CLIENTS//,/ }; do
        with_peers "latency-$c" "$rep" --scenario latency --clients "$c" --user-count "$c" "${common[@]}"
      done
      for cr in ${LATENCY_PACED//,/ }; do
        c=${cr%@*} r=${cr#*@}
        with_peers "latency-$c-at-$r" "$rep" --scenario latency --clients "$c" --user-count "$c" \
          --rate "$r" "${common[@]}"
      done
      ;;
    idle) idle_counts idle "$rep" "$IDLE_COUNTS" ;;
    idle-tls) idle_counts idle-tls "$rep" "$IDLE_TLS_COUNTS" --tls --ca "$TLS/ca.pem" ;;
    *) die "unknown scenario $s" ;;
    esac
  done
done
stop_gateway

# --- 6. report ----------------------------------------------------------------------------

{
  echo "imap-gateway benchmark $STAMP on $(uname -srm), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "gateway $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?'), Dovecot $(/usr/sbin/dovecot --version), load average at start: $LOADAVG_START, open files limit $NOFILE"
  echo "Dovecot services: $DOVECOT_SERVICES, password scheme: $PASS_SCHEME (login-hashed: CRYPT)"
  echo
  python3 "$HELPER" report "$RESULTS"
} | tee "$OUT/report.txt"
say "results: $RESULTS and $OUT/report.txt"
