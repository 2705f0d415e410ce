#!/usr/bin/env bash
# Checks dashboards/: the alert rules (promtool check rules, promtool test rules with
# alerts.test.yml), every PromQL query of the Grafana dashboard (check_promql.py: parsed by
# promtool), and the dashboard JSON against the @grafana/schema types (tsc). Whether the
# metrics they use exist is tests/observability.rs (cargo, with scripts/test.sh).
#
# On a fresh Debian 12 machine, as root: installs promtool (Debian package prometheus, no
# recommends) and Node.js (Debian packages nodejs and npm) if they are missing, and the
# pinned npm packages of dashboards/schema-check with `npm ci`. Runs every step even when
# one fails, prints PASS/FAIL and the time of each, and exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

failed=()

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# step NAME COMMAND...: runs COMMAND, output shown only when it fails.
step() {
  local name=$1
  shift
  local start out status
  start=$(now)
  out=$("$@" 2>&1)
  status=$?
  if [ $status -eq 0 ]; then
    printf 'PASS  %-36s %s\n' "$name" "$(elapsed "$start")"
  else
    printf 'FAIL  %-36s %s\n' "$name" "$(elapsed "$start")"
    printf '%s\n' "$out" | sed 's/^/      /'
    failed+=("$name")
  fi
}

apt_install() {
  echo "installing: $*"
  apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_tools() {
  if ! command -v promtool >/dev/null; then
    # Only promtool is wanted, not the exporters the package recommends.
    apt_install prometheus || return 1
  fi
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_install nodejs npm || return 1
  fi
  command -v python3 >/dev/null || apt_install python3 || return 1
  # typescript 7 declares Node.js >= 16.20; checked with 20, Debian 12 has 18: ask for 18.
  local major
  major=$(node -p 'process.versions.node.split(".")[0]') || return 1
  if [ "$major" -lt 18 ]; then
    echo "Node.js $(node --version) is too old: 18 or later is needed" >&2
    return 1
  fi
  echo "promtool $(promtool --version 2>&1 | awk 'NR == 1 { print $3 }'), node $(node --version), npm $(npm --version)"
}

npm_ci() {
  # Exactly the versions in package-lock.json; fast when the npm cache has them.
  (cd dashboards/schema-check && npm ci --no-audit --no-fund --prefer-offline --loglevel=error)
}

step "install promtool, node, python3" install_tools
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAIL: cannot check without the tools" >&2
  exit 1
fi
step "npm ci (dashboards/schema-check)" npm_ci
step "promtool check rules alerts.yml" promtool check rules dashboards/alerts.yml
step "promtool test rules alerts.test.yml" promtool test rules dashboards/alerts.test.yml
step "dashboard PromQL parses (promtool)" python3 dashboards/check_promql.py dashboards/imap-gateway.json
if [[ " ${failed[*]} " == *" npm ci "* ]]; then
  printf 'FAIL  %-36s %s\n' "dashboard schema (tsc)" "skipped: npm ci failed"
  failed+=("dashboard schema (tsc)")
else
  step "dashboard schema (tsc)" bash -c 'cd dashboards/schema-check && npm run -s check'
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAIL: ${#failed[@]} step(s): ${failed[*]}"
  exit 1
fi
echo "PASS: dashboards and alerts"
