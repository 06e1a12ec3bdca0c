#!/usr/bin/env bash
# Checks deploy/portcullis.service with systemd's own tools:
#   systemd-analyze verify            every key known, every command executable
#   systemd-analyze security --offline  the sandbox's exposure score, at most 2.0
# The unit runs /usr/local/bin/portcullis; the check runs a copy that points
# at PORTCULLIS_BIN (default target/release/portcullis, built if missing),
# because verify requires the binary to exist. Any message from verify
# (an unknown key is only a warning to systemd) fails the check.
# Skips, saying so, when systemd-analyze is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

unit=deploy/portcullis.service
max_exposure=2.0

if ! command -v systemd-analyze >/dev/null; then
    echo "check-unit: systemd-analyze is not installed (Debian: apt-get install systemd); skipped"
    exit 0
fi
bin="${PORTCULLIS_BIN:-target/release/portcullis}"
[[ -x "$bin" ]] || cargo build --release
bin="$(realpath "$bin")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sed "s#/usr/local/bin/portcullis#$bin#g" "$unit" >"$work/portcullis.service"

if ! messages="$(systemd-analyze verify --man=no "$work/portcullis.service" 2>&1)" || [[ -n "$messages" ]]; then
    echo "check-unit: systemd-analyze verify $unit:"
    echo "${messages//$work\//deploy/}"
    exit 1
fi
echo "check-unit: systemd-analyze verify: ok"

report="$(systemd-analyze security --offline=yes "$work/portcullis.service" 2>&1)" || {
    echo "$report"
    exit 1
}
exposure="$(sed -n 's/.*Overall exposure level for portcullis.service: \([0-9.]*\).*/\1/p' <<<"$report")"
if [[ -z "$exposure" ]]; then
    echo "check-unit: no exposure level in systemd-analyze security's report:"
    echo "$report"
    exit 1
fi
if awk -v e="$exposure" -v m="$max_exposure" 'BEGIN { exit !(e > m) }'; then
    echo "$report"
    echo "check-unit: exposure $exposure is above $max_exposure"
    exit 1
fi
echo "check-unit: systemd-analyze security: exposure $exposure (at most $max_exposure)"
