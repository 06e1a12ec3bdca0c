#!/usr/bin/env bash
# Checks that vendor/hyper is exactly the hyper crate published on crates.io
# (of the version vendor/hyper/Cargo.toml names) plus
# vendor/hyper.portcullis.patch, and nothing else: a path patch hides the
# crate from `cargo update` and advisory tools, so an edit made here by hand,
# or a patch file that no longer matches the tree, would otherwise go unseen.
#
#   scripts/check-vendor.sh
#
# Uses cargo only (crates.io, through a scratch project in a temporary
# directory), tar, sha256sum, patch and diff. Exits non-zero and prints the
# difference if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
patch_file="$root/vendor/hyper.portcullis.patch"

# The version: the `version` key of the [package] table.
version="$(awk -F'"' '
    /^\[/ { in_package = ($0 == "[package]"); next }
    in_package && $1 ~ /^version *= *$/ { print $2; exit }
' vendor/hyper/Cargo.toml)"
[[ -n "$version" ]] || { echo "check-vendor: no version in vendor/hyper/Cargo.toml" >&2; exit 1; }

work="$(mktemp -d /tmp/portcullis-check-vendor.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# A scratch project that depends on exactly that version, outside this
# workspace (so our [patch.crates-io] does not apply to it). `cargo fetch`
# downloads the .crate into cargo's cache and records the registry's
# checksum of it in the scratch Cargo.lock.
mkdir -p "$work/fetch/src"
cat >"$work/fetch/Cargo.toml" <<EOF
[package]
name = "portcullis-check-vendor"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
hyper = "=$version"

[workspace]
EOF
: >"$work/fetch/src/lib.rs"
(cd "$work/fetch" && cargo fetch --quiet)

checksum="$(awk -v version="$version" '
    /^\[\[package\]\]/ { name = ""; ver = "" }
    /^name = /     { name = $3; gsub(/"/, "", name) }
    /^version = /  { ver = $3; gsub(/"/, "", ver) }
    /^checksum = / { sum = $3; gsub(/"/, "", sum); if (name == "hyper" && ver == version) { print sum; exit } }
' "$work/fetch/Cargo.lock")"
[[ -n "$checksum" ]] || { echo "check-vendor: no checksum for hyper $version in the scratch Cargo.lock" >&2; exit 1; }

# The .crate file in cargo's cache whose contents have that checksum: the
# published archive itself, not a source tree someone could have edited.
crate=""
for candidate in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"hyper-$version.crate"; do
    [[ -f "$candidate" ]] || continue
    if [[ "$(sha256sum "$candidate" | awk '{print $1}')" == "$checksum" ]]; then
        crate="$candidate"
        break
    fi
done
[[ -n "$crate" ]] || { echo "check-vendor: no hyper-$version.crate with checksum $checksum in cargo's cache" >&2; exit 1; }

# As vendor/README.md describes the copy: the crate without tests/,
# benches/ and examples/ (none of which hyper publishes today) and without
# the Cargo.lock that `cargo package` adds (cargo ignores a path
# dependency's lock file), then the patch. .cargo_vcs_info.json stays: it
# names the upstream commit the release was cut from.
mkdir "$work/published"
tar -xzf "$crate" -C "$work/published"
published="$work/published/hyper-$version"
rm -rf "$published/tests" "$published/benches" "$published/examples" \
    "$published/Cargo.lock"
# --fuzz=0: every hunk must match its context exactly (a patch that needs
# fuzz is one to regenerate); no .orig/.rej files are left in the tree.
if ! patch -p1 --quiet --fuzz=0 --no-backup-if-mismatch -d "$published" <"$patch_file"; then
    echo "check-vendor: vendor/hyper.portcullis.patch does not apply to hyper $version as published" >&2
    exit 1
fi

if ! diff -r "$published" vendor/hyper; then
    echo "check-vendor: vendor/hyper is not hyper $version from crates.io plus vendor/hyper.portcullis.patch (differences above)" >&2
    exit 1
fi
echo "check-vendor: vendor/hyper is hyper $version ($crate, sha256 $checksum) plus vendor/hyper.portcullis.patch"
