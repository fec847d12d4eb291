#!/usr/bin/env bash
# Build the real control plane the tests run reqapi behind — kube-apiserver and
# kubectl from one Kubernetes release, etcd from its own module, and a small
# client-go program (metadataclient/, the metadata client) — into a cache
# under $HOME keyed on the two go.sum files and this script, and print the
# directory holding the three binaries (the last line of output; progress goes
# to stderr). A second run with the same key prints the cached directory at
# once. Go is used here only; it never enters reqapi's runtime.
#
#   tests/controlplane/build.sh            # build (or reuse) and print the bin dir
#   REQAPI_CONTROLPLANE_CACHE=DIR ...      # cache root (default ~/.cache/reqapi-controlplane)
#
# Measured on a 2-core VM: cold (empty Go build cache) 449 s — etcd 68 s,
# kube-apiserver 359 s, kubectl 22 s — plus about 20 s of module downloads;
# warm (binaries cached) well under a second. Go's own module cache
# (~/go/pkg/mod) and build cache (~/.cache/go-build) are kept too, so a new key
# with warm Go caches (this script or the client changed) relinks in about 35 s.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${REQAPI_CONTROLPLANE_CACHE:-$HOME/.cache/reqapi-controlplane}"

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: no Go toolchain on PATH; install Go 1.26 or newer to build the control plane" >&2
    exit 3
fi

# The release the binaries claim to be: read from the pin so the two cannot
# disagree. /version and `kubectl version` show it (the module build would
# otherwise say v0.0.0-master).
kube_version="$(sed -n 's/^\tk8s.io\/kubernetes \(v[0-9.]*\).*/\1/p' "$here/kubernetes/go.mod")"
etcd_version="$(sed -n 's/^\tgo.etcd.io\/etcd\/server\/v3 \(v[0-9.]*\).*/\1/p' "$here/etcd/go.mod")"
if [[ -z "$kube_version" || -z "$etcd_version" ]]; then
    echo "build.sh: cannot read the pinned versions from $here/*/go.mod" >&2
    exit 2
fi

key="$(cat "$here/kubernetes/go.sum" "$here/kubernetes/go.mod" "$here/etcd/go.sum" "$here/etcd/go.mod" "$0" \
           "$here/kubernetes/metadataclient/main.go" \
       | sha256sum | cut -c1-16)"
bin="$cache_root/$key/bin"
if [[ -x "$bin/kube-apiserver" && -x "$bin/kubectl" && -x "$bin/etcd" && -x "$bin/metadataclient" ]]; then
    echo "build.sh: reusing $bin (kubernetes $kube_version, etcd $etcd_version)" >&2
    echo "$bin"
    exit 0
fi

mkdir -p "$cache_root/$key"
staging="$(mktemp -d "$cache_root/$key/build.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

major="${kube_version#v}"; major="${major%%.*}"
minor="${kube_version#v*.}"; minor="${minor%%.*}"
# The same -X flags hack/lib/version.sh passes, for both version packages.
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

step() {  # step NAME DIR PACKAGE [go build flags...]
    local name="$1" dir="$2" package="$3"; shift 3
    local started=$SECONDS
    echo "build.sh: building $name ($package) — a cold build takes minutes on 2 cores" >&2
    (cd "$dir" && CGO_ENABLED=0 go build -trimpath -o "$staging/$name" "$@" "$package")
    echo "build.sh: $name built in $((SECONDS - started)) s" >&2
}

total_started=$SECONDS
step etcd "$here/etcd" go.etcd.io/etcd/server/v3 -ldflags "-s -w"
step kube-apiserver "$here/kubernetes" k8s.io/kubernetes/cmd/kube-apiserver -ldflags "$ldflags"
step kubectl "$here/kubernetes" k8s.io/kubernetes/cmd/kubectl -ldflags "$ldflags"
# A small client-go program of this module: the metadata client, as metadata informers use it.
step metadataclient "$here/kubernetes" ./metadataclient -ldflags "-s -w"

# Publish all three at once so an interrupted build never looks complete.
rm -rf "$bin"
mv "$staging" "$bin"
trap - EXIT
echo "build.sh: control plane built in $((SECONDS - total_started)) s into $bin" >&2
echo "$bin"
