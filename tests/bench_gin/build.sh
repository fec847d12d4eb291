#!/usr/bin/env bash
# Build the Go/gin reference server of `python3 tests/bench.py --versus-gin`
# into a cache under $HOME keyed on go.mod, go.sum, main.go and this script,
# and print the binary's path (the last line of output; progress goes to
# stderr). A second run with the same key prints the cached path at once.
# Go is used here only; it never enters reqapi's runtime.
#
#   tests/bench_gin/build.sh               # build (or reuse) and print the binary
#   REQAPI_BENCH_CACHE=DIR ...             # cache root (default ~/.cache/reqapi-bench)
#
# The module proxy must serve gin v1.12.0 and its requirements (go.sum pins them);
# Go's module and build caches (~/go/pkg/mod, ~/.cache/go-build) are reused.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${REQAPI_BENCH_CACHE:-$HOME/.cache/reqapi-bench}"

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: no Go toolchain on PATH; install Go 1.26 or newer to build the gin server" >&2
    exit 3
fi

key="$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" "$0" | sha256sum | cut -c1-16)"
binary="$cache_root/gin-$key/bench_gin"
if [[ -x "$binary" ]]; then
    echo "build.sh: reusing $binary" >&2
    echo "$binary"
    exit 0
fi

mkdir -p "$cache_root/gin-$key"
staging="$(mktemp "$cache_root/gin-$key/build.XXXXXX")"
trap 'rm -f "$staging"' EXIT
started=$SECONDS
echo "build.sh: building the gin server ($(go version | cut -d' ' -f3))" >&2
# -mod=readonly: go.mod and go.sum are the pin; a build never rewrites them.
(cd "$here" && CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$staging" .)
mv "$staging" "$binary"            # published at once: an interrupted build never looks complete
trap - EXIT
echo "build.sh: built in $((SECONDS - started)) s into $binary" >&2
echo "$binary"
