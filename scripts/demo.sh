#!/usr/bin/env bash
# imap-gateway demo: two real Dovecot backends on loopback and the gateway in front of them.
#
#   sudo ./scripts/demo.sh          (or, as root: ./scripts/demo.sh)
#
# For Debian 12 with Rust installed. The script:
#   - installs dovecot-imapd and curl with apt-get if they are missing (and a C compiler);
#   - builds the gateway (cargo build --release);
#   - starts two Dovecot instances, demo-a on 127.0.0.1:10143 and demo-b on 127.0.0.1:10144,
#     each with the users alice/alicepw, bob/bobpw and carol@example.org/carolpw, and a
#     welcome message in every INBOX;
#   - writes gateway.toml and routing.toml, then runs the gateway in the foreground on
#     127.0.0.1:1143. Ctrl-C stops the gateway and both Dovecots.
#
# Everything lives in demo-state/ at the top of the repository (or in $DEMO_DIR): configs, logs
# and mail. Mail is kept from one run to the next; delete the directory to start over.
# Running the script again first stops whatever a previous run left behind.
# shellcheck disable=SC2317 # some functions only run through wait_until or a trap
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GW_ADDR=127.0.0.1:1143
INSTANCES=(demo-a demo-b)
declare -A PORT=([demo-a]=10143 [demo-b]=10144)
USERS=(alice:alicepw bob:bobpw carol@example.org:carolpw)
MAIL_USER=imapgwdemo
READY_SECONDS=20

say() { printf '==> %s\n' "$*"; }
die() {
  printf 'demo.sh: %s\n' "$*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "run this as root: sudo $0"

# --- processes, without procps (a minimal Debian may lack ps/pgrep) ------------------------

# Whether process $1 exists and is not a zombie.
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# Whether process $1 is alive and its command line contains $2.
runs_with() {
  alive "$1" || return 1
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# Live processes whose process group is $1.
group_members() {
  local f stat fields
  for f in /proc/[0-9]*/stat; do
    stat=$(cat "$f" 2>/dev/null) || continue
    read -r -a fields <<<"${stat##*) }" # state ppid pgrp ...
    [ "${fields[2]}" = "$1" ] && [ "${fields[0]}" != Z ] && echo "${f//[^0-9]/}"
  done
  return 0
}

group_empty() { [ -z "$(group_members "$1")" ]; }
dead() { ! alive "$1"; }

# Waits up to $1 seconds, polling every 0.1 s, until the command "${@:2}" succeeds.
wait_until() {
  local seconds=$1 i
  shift
  for ((i = 0; i < seconds * 10; i++)); do
    "$@" && return 0
    sleep 0.1
  done
  return 1
}

# Stops the Dovecot instances in directories "$@" by the pids in their master.pid files, with
# every process of their process groups (a daemonized master leads its own group).
stop_dovecots() {
  local dir pid pids=()
  for dir in "$@"; do
    [ -s "$dir/run/master.pid" ] || continue
    pid=$(<"$dir/run/master.pid")
    if [[ "$pid" =~ ^[0-9]+$ ]] && runs_with "$pid" "$dir/dovecot.conf"; then
      say "stopping Dovecot $(basename "$dir") (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$dir/run/master.pid"
  done
  for pid in "${pids[@]}"; do
    if ! wait_until 10 group_empty "$pid"; then
      kill -KILL -- "-$pid" 2>/dev/null || true
      wait_until 5 group_empty "$pid" || echo "warning: Dovecot $pid did not stop" >&2
    fi
  done
}

# Stops a gateway that a previous run left running (its pid is in gateway.pid).
stop_old_gateway() {
  local pidfile=$DEMO_DIR/gateway.pid pid
  [ -s "$pidfile" ] || return 0
  pid=$(<"$pidfile")
  if [[ "$pid" =~ ^[0-9]+$ ]] && runs_with "$pid" "$DEMO_DIR/gateway.toml"; then
    say "stopping the gateway of a previous run (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    wait_until 5 dead "$pid" || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# Whether something accepts connections on 127.0.0.1:$1.
port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints the first line a server on 127.0.0.1:$1 sends, then logs out.
greeting() {
  local line
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  if ! IFS= read -r -t 2 line <&3; then
    exec 3<&-
    return 1
  fi
  printf 'x LOGOUT\r\n' >&3 || true
  exec 3<&-
  printf '%s\n' "${line%$'\r'}"
}

# --- 1. packages ---------------------------------------------------------------------------

missing=()
[ -x /usr/sbin/dovecot ] || missing+=(dovecot-imapd)
command -v curl >/dev/null || missing+=(curl)
command -v cc >/dev/null || missing+=(gcc libc6-dev) # cargo links with cc; ring compiles C
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- 2. build ------------------------------------------------------------------------------

# Under sudo, build as the invoking user with their own toolchain, so target/ stays theirs;
# otherwise (or if they have no ~/.cargo) as root.
build_user=
cargo=
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
  user_cargo=$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin/cargo
  if [ -x "$user_cargo" ]; then
    build_user=$SUDO_USER
    cargo=$user_cargo
  fi
fi
if [ -z "$cargo" ]; then
  for c in "$(command -v cargo || true)" "$HOME/.cargo/bin/cargo"; do
    [ -n "$c" ] && [ -x "$c" ] && cargo=$c && break
  done
fi
[ -n "$cargo" ] || die "cargo not found: install Rust (https://rustup.rs) first"

say "building imap-gateway (cargo build --release)"
if [ -n "$build_user" ]; then
  (cd "$REPO" && runuser -u "$build_user" -- env PATH="$(dirname "$cargo"):$PATH" \
    "$cargo" build --release)
else
  (cd "$REPO" && "$cargo" build --release)
fi
GATEWAY=$REPO/target/release/imap-gateway
[ -x "$GATEWAY" ] || die "$GATEWAY was not built"

# --- 3. state directory and leftovers of a previous run ------------------------------------

DEMO_DIR=${DEMO_DIR:-$REPO/demo-state}
mkdir -p "$DEMO_DIR"
DEMO_DIR=$(cd "$DEMO_DIR" && pwd)
chmod 755 "$DEMO_DIR"

stop_old_gateway
stop_dovecots "${INSTANCES[@]/#/$DEMO_DIR/}"

# From here on, whatever happens, the Dovecots started below are stopped on exit.
GW_PID=
cleanup() {
  local status=$?
  trap - EXIT INT TERM HUP
  if [ -n "$GW_PID" ] && alive "$GW_PID"; then
    # On SIGTERM the gateway stops accepting and waits for open sessions to end.
    kill -TERM "$GW_PID" 2>/dev/null || true
    if ! wait_until 5 dead "$GW_PID"; then
      echo "gateway still has open sessions after 5 s: killing it" >&2
      kill -KILL "$GW_PID" 2>/dev/null || true
    fi
    wait "$GW_PID" 2>/dev/null || true
    rm -f "$DEMO_DIR/gateway.pid"
  fi
  stop_dovecots "${INSTANCES[@]/#/$DEMO_DIR/}"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

for port in "${PORT[@]}" "${GW_ADDR##*:}"; do
  if port_busy "$port"; then
    die "127.0.0.1:$port is already in use (another demo in another DEMO_DIR?); see: ss -ltnp"
  fi
done

# --- 4. Dovecot: mail user, configuration, users, welcome messages -------------------------

if ! id -u "$MAIL_USER" >/dev/null 2>&1; then
  say "creating the system user $MAIL_USER (owner of the demo mail)"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    --user-group "$MAIL_USER"
fi
MAIL_UID=$(id -u "$MAIL_USER")
MAIL_GID=$(id -g "$MAIL_USER")

# Dovecot's processes run as dovecot, dovenull and $MAIL_USER: each must reach the state dir.
for u in dovecot dovenull "$MAIL_USER"; do
  runuser -u "$u" -- test -x "$DEMO_DIR" ||
    die "user $u cannot reach $DEMO_DIR (a parent directory is private, e.g. a home with mode 700);
    use another place: sudo DEMO_DIR=/var/tmp/imap-gateway-demo $0"
done

# Writes the welcome message into the INBOX of user $3 on instance $1 (port $2), as a new
# Maildir file, unless the user has a Maildir already (mail is kept across runs).
seed_welcome() {
  local inst=$1 port=$2 user=$3 home=$DEMO_DIR/$1/mail/$3
  local maildir=$home/Maildir
  [ -e "$maildir" ] && return 0
  mkdir -p "$maildir/cur" "$maildir/new" "$maildir/tmp"
  local name file size
  name="$(date +%s).M${RANDOM}P$$.imapgwdemo"
  file=$maildir/tmp/$name
  cat >"$file" <<EOF
From: imap-gateway demo <demo@localhost>
To: $user
Subject: Welcome to $inst
Date: $(date -R)
Message-ID: <welcome.$inst.$user@imap-gateway.demo>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

Hello $user,

this message lives on the Dovecot instance "$inst" (127.0.0.1:$port).
You are reading it through imap-gateway, which routed you here.
EOF
  size=$(stat -c %s "$file")
  chown -R "$MAIL_UID:$MAIL_GID" "$home"
  mv "$file" "$maildir/new/$name,S=$size"
}

write_dovecot_conf() {
  local inst=$1 port=$2 d=$DEMO_DIR/$1
  cat >"$d/dovecot.conf" <<EOF
# Generated by scripts/demo.sh: Dovecot instance $inst for the imap-gateway demo.
# Self-contained (no /etc/dovecot): only IMAP, only on 127.0.0.1:$port.
base_dir = $d/run
state_dir = $d/state
instance_name = $inst
login_greeting = Dovecot ready ($inst)
protocols = imap
listen = 127.0.0.1
shutdown_clients = yes
log_path = $d/dovecot.log
info_log_path = $d/dovecot.log
auth_verbose = yes
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{session}>

default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = $MAIL_UID
first_valid_gid = $MAIL_GID
mail_uid = $MAIL_UID
mail_gid = $MAIL_GID
mail_location = maildir:~/Maildir:LAYOUT=fs

# Plaintext passwords on loopback only; the gateway reports the client's address with ID.
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
login_trusted_networks = 127.0.0.0/8

mail_plugins = \$mail_plugins quota
protocol imap {
  mail_plugins = \$mail_plugins imap_quota
}
plugin {
  quota = count:User quota
  quota_vsizes = yes
  quota_rule = *:storage=1G
}

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
  mailbox Drafts {
    special_use = \\Drafts
    auto = subscribe
  }
  mailbox Sent {
    special_use = \\Sent
    auto = subscribe
  }
  mailbox Trash {
    special_use = \\Trash
    auto = subscribe
  }
}

service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $port
  }
  inet_listener imaps {
    port = 0
  }
}
EOF
}

for inst in "${INSTANCES[@]}"; do
  d=$DEMO_DIR/$inst
  mkdir -p "$d/run" "$d/state" "$d/mail"
  chmod 755 "$d" "$d/mail"
  write_dovecot_conf "$inst" "${PORT[$inst]}"
  : >"$d/users.passwd"
  for entry in "${USERS[@]}"; do
    printf '%s:{PLAIN}%s\n' "${entry%%:*}" "${entry#*:}" >>"$d/users.passwd"
    seed_welcome "$inst" "${PORT[$inst]}" "${entry%%:*}"
  done
  chown root:dovecot "$d/users.passwd"
  chmod 640 "$d/users.passwd"
done

# --- 5. start both Dovecots and wait for their greetings -----------------------------------

for inst in "${INSTANCES[@]}"; do
  d=$DEMO_DIR/$inst
  say "starting Dovecot $inst on 127.0.0.1:${PORT[$inst]}"
  # Dovecot daemonizes; its stdout/stderr go to a file, never to a pipe someone waits on.
  if ! /usr/sbin/dovecot -c "$d/dovecot.conf" </dev/null >"$d/dovecot.out" 2>&1; then
    cat "$d/dovecot.out" >&2
    die "Dovecot $inst did not start (log: $d/dovecot.log)"
  fi
done
for inst in "${INSTANCES[@]}"; do
  d=$DEMO_DIR/$inst
  ready=
  for ((i = 0; i < READY_SECONDS * 10; i++)); do
    line=$(greeting "${PORT[$inst]}" 2>/dev/null) || line=
    if [[ "$line" == "* OK"*"($inst)"* ]]; then
      ready=1
      break
    fi
    if [ "$i" -gt 10 ] && ! { [ -s "$d/run/master.pid" ] && alive "$(<"$d/run/master.pid")"; }; then
      break
    fi
    sleep 0.1
  done
  if [ -z "$ready" ]; then
    cat "$d/dovecot.out" >&2
    tail -n 20 "$d/dovecot.log" >&2 2>/dev/null || true
    die "Dovecot $inst did not greet on 127.0.0.1:${PORT[$inst]} within ${READY_SECONDS}s"
  fi
  say "Dovecot $inst is ready: $line"
done

# --- 6. gateway configuration --------------------------------------------------------------

cat >"$DEMO_DIR/gateway.toml" <<EOF
# imap-gateway configuration written by scripts/demo.sh. Reference: docs/configuration.md.

# Relative paths are resolved against the directory of this file.
routing_table = "routing.toml"

[[listeners]]
name = "demo"
address = "$GW_ADDR"
mode = "plain"
# No TLS certificate, so no STARTTLS: LOGIN and AUTHENTICATE are allowed in cleartext only
# because this listener is on loopback. Never set this on a listener reachable from a network.
allow_plaintext_auth = true

[log]
level = "info"
EOF

cat >"$DEMO_DIR/routing.toml" <<EOF
# Routing table written by scripts/demo.sh. Reference: docs/routing.md.

# Users without a route of their own are spread over these backends by rendezvous hashing.
default_pool = ["demo-a", "demo-b"]

[[backends]]
name = "demo-a"
address = "127.0.0.1:${PORT[demo-a]}"
tls = "none"
trusted = true   # Dovecot trusts the gateway (login_trusted_networks) to report client IPs

[[backends]]
name = "demo-b"
address = "127.0.0.1:${PORT[demo-b]}"
tls = "none"
trusted = true

# One route of each kind: an exact user, a whole domain; everyone else goes by the pool.
[[routes]]
user = "alice"
backend = "demo-a"

[[routes]]
user = "*@example.org"
backend = "demo-b"

# A mount: alice's home is demo-a, and her folders on demo-b appear under "Shared".
[[mounts]]
users = "alice"
prefix = "Shared"
backend = "demo-b"
namespace = "shared"
EOF

"$GATEWAY" check-config --config "$DEMO_DIR/gateway.toml" >/dev/null

# --- 7. how to use it, then the gateway in the foreground ----------------------------------

conf=$DEMO_DIR/gateway.toml
[[ "$DEMO_DIR" == "$REPO"/* ]] && conf=${conf#"$REPO"/}
cat <<EOF

imap-gateway listens on $GW_ADDR (users: alice/alicepw, bob/bobpw, carol@example.org/carolpw).
In another terminal, in $REPO:

  curl -v --url 'imap://$GW_ADDR/INBOX;UID=1' --user alice:alicepw
  curl --url 'imap://$GW_ADDR/INBOX;UID=1' --user carol@example.org:carolpw
  target/release/imap-gateway route bob --config $conf

Or point any mail client at $GW_ADDR, plain IMAP, no TLS.
Backends: demo-a 127.0.0.1:${PORT[demo-a]}, demo-b 127.0.0.1:${PORT[demo-b]}; logs in $DEMO_DIR/demo-*/dovecot.log.
Ctrl-C stops the gateway and both Dovecots.

EOF

# Not exec: this shell stays to stop the Dovecots when the gateway ends.
"$GATEWAY" run --config "$DEMO_DIR/gateway.toml" &
GW_PID=$!
echo "$GW_PID" >"$DEMO_DIR/gateway.pid"
set +e
wait "$GW_PID"
status=$?
set -e
GW_PID=
rm -f "$DEMO_DIR/gateway.pid"
exit "$status"
