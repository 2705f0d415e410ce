#!/usr/bin/env bash
# Fuzzing smoke run: builds the cargo-fuzz targets in fuzz/ (framer, prescan, preauth) and
# runs each for a short while (FUZZ_SECONDS, default 20) from the seeds in fuzz/seeds plus the
# corpus kept from earlier runs. Fails on any crash, panic, hang (-timeout) or build failure;
# the input that did it is printed and left in fuzz/artifacts/<target>/.
#
# Self-contained on a fresh Debian 12 machine with Rust: installs cargo-fuzz (pinned) from
# crates.io if it is missing, into $IMAP_GATEWAY_CI_CACHE/fuzz (/var/cache/imap-gateway-ci,
# the cache of the other scripts/check-*.sh), about a minute to build. The fuzz build
# directory and the corpus live there too, so a later run rebuilds only the gateway.
# Measured on a 2-core machine: about 2 minutes with the build cached (the gateway crate is
# rebuilt, 50-100 s, then 3 x 20 s); the first run on a fresh machine adds cargo-fuzz (1 min)
# and the dependencies' fuzz build (4-6 min).
#
# Only stable Rust is installed: cargo-fuzz passes nightly -Z flags (sanitizer coverage),
# which RUSTC_BOOTSTRAP=1 lets the stable compiler take. No sanitizer (-s none): the code is
# safe Rust, we look for panics and hangs, and AddressSanitizer would double the cold build
# and halve the runs per second. Debug assertions are on.
#
# To fuzz for longer: FUZZ_SECONDS=600 ./scripts/fuzz-smoke.sh, or FUZZ_TARGETS=preauth.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${IMAP_GATEWAY_CI_CACHE:-/var/cache/imap-gateway-ci}/fuzz
CARGO_FUZZ_VERSION=0.13.2
SECONDS_EACH=${FUZZ_SECONDS:-20}
read -r -a TARGETS <<<"${FUZZ_TARGETS:-framer prescan preauth}"
FUZZ=$CACHE/bin/cargo-fuzz
FLAGS=(-O -a -s none --target-dir "$CACHE/target")
export RUSTC_BOOTSTRAP=1

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
failed=()

# libFuzzer itself is C++, built by libfuzzer-sys with the system compiler.
if ! command -v c++ >/dev/null; then
  echo "installing: g++ (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ >/dev/null; } ||
    { echo "FAIL  install g++"; exit 1; }
fi

start=$(now)
if [ ! -x "$FUZZ" ] || [ "$("$FUZZ" --version 2>/dev/null | awk '{ print $2 }')" != "$CARGO_FUZZ_VERSION" ]; then
  echo "installing: cargo-fuzz $CARGO_FUZZ_VERSION"
  if ! cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$CACHE" --quiet; then
    echo "FAIL  install cargo-fuzz $CARGO_FUZZ_VERSION"
    exit 1
  fi
fi
printf 'PASS  %-36s %s\n' "cargo-fuzz $CARGO_FUZZ_VERSION" "$(elapsed "$start")"

start=$(now)
log=$(mktemp /tmp/fuzz-smoke.XXXXXX)
trap 'rm -f "$log"' EXIT
if ! (cd fuzz && "$FUZZ" build "${FLAGS[@]}") >"$log" 2>&1; then
  printf 'FAIL  %-36s %s\n' "build fuzz targets" "$(elapsed "$start")"
  tail -n 40 "$log" | sed 's/^/      | /'
  exit 1
fi
printf 'PASS  %-36s %s\n' "build fuzz targets" "$(elapsed "$start")"

for target in "${TARGETS[@]}"; do
  start=$(now)
  corpus=$CACHE/corpus/$target
  # Each run adds what it found; past this many inputs, loading them eats into the run's
  # time, so the corpus starts over from the seeds.
  if [ -d "$corpus" ] && [ "$(find "$corpus" -type f | wc -l)" -gt 20000 ]; then
    rm -rf "$corpus"
  fi
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  # The first directory receives new inputs; the committed seeds are read only.
  if (cd fuzz && "$FUZZ" run "${FLAGS[@]}" "$target" "$corpus" "seeds/$target" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$REPO/fuzz/artifacts/$target/") >"$log" 2>&1; then
    runs=$(grep -Eo '^Done [0-9]+ runs' "$log" | awk '{ print $2 }')
    printf 'PASS  %-36s %s (%s runs)\n' "fuzz $target" "$(elapsed "$start")" "${runs:-?}"
  else
    printf 'FAIL  %-36s %s\n' "fuzz $target" "$(elapsed "$start")"
    grep -E -A12 'panicked|ERROR: libFuzzer|deadly signal|Test unit written' "$log" | head -n 60 | sed 's/^/      | /'
    for a in "fuzz/artifacts/$target"/*; do
      [ -f "$a" ] && printf '      input %s: %s\n' "$a" "$(od -An -c "$a" | head -c 600 | tr -s ' ')"
    done
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAIL: fuzz targets crashed: ${failed[*]} (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 $FUZZ run ${FLAGS[*]} TARGET ARTIFACT)"
  exit 1
fi
echo "PASS: fuzzing smoke run"
