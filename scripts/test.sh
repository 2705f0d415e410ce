#!/usr/bin/env bash
# Runs every test of imap-gateway. Installs what the tests need on a fresh Debian 12 machine
# (run as root): a real Dovecot (the tests start their own instances), curl and python3
# (independent IMAP clients used by the tests), openssl (hashes a passdb password), promtool
# (from Debian's prometheus package: checks a live /metrics scrape).
#
# Then the packaging checks (each installs its own tools, caching them under
# /var/cache/imap-gateway-ci): the dashboards and alert rules, the Kubernetes manifests and
# Helm chart, the container image; and a fuzzing smoke run of the fuzz targets in fuzz/
# (scripts/fuzz-smoke.sh, about two minutes once its tools and build are cached). They run before the Rust
# tests so that the test runner's summary closes the output; a failure in any of them still
# fails the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/sbin/dovecot ] || missing+=(dovecot-imapd)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
command -v openssl >/dev/null || missing+=(openssl)
command -v useradd >/dev/null || missing+=(passwd)
[ -x /usr/bin/kill ] || [ -x /bin/kill ] || missing+=(procps)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v promtool >/dev/null; then
  echo "installing: prometheus (for promtool)"
  apt-get update -qq
  # No recommends: only promtool is wanted, not the exporters.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

packaging=0
for check in check-dashboards check-k8s check-image fuzz-smoke; do
  echo "== scripts/$check.sh"
  if ! "./scripts/$check.sh"; then
    echo "scripts/$check.sh FAILED"
    packaging=1
  fi
done

tests=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || tests=$?
else
  cargo test --workspace --no-fail-fast "$@" || tests=$?
fi
[ "$packaging" -eq 0 ] || echo "packaging or fuzzing checks FAILED (see above)" >&2
[ "$tests" -eq 0 ] && [ "$packaging" -eq 0 ]
