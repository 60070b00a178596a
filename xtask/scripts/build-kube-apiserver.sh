#!/bin/sh
# Builds kube-apiserver from Debian bookworm's `kubernetes` source package (upstream v1.20.2
# with its vendor/ tree), the way that package's debian/rules builds it: GOPATH mode, with
# Debian's Go. Called by `cargo xtask setup`; the Go module proxy is not needed.
#
#   build-kube-apiserver.sh WORKDIR OUT
#
# WORKDIR is scratch space (about 1.8 GB, removed afterwards by the caller); OUT is where the
# binary goes. Needs a deb-src entry for bookworm, golang-go, rsync, make and
# golang-github-modern-go-reflect2-dev (setup installs all of them first).
set -eu
work=$1
out=$2
mkdir -p "$work"
cd "$work"
apt-get source -qq kubernetes
src=$(find . -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
[ -n "$src" ] || { echo "apt-get source kubernetes left no source tree" >&2; exit 1; }
cd "$src"
# The vendored reflect2 1.0.1 mishandles maps with Go >= 1.18 (json-iterator then fails at
# run time, e.g. decoding any map field); Debian's 1.0.2 is the fixed release.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
export GOPATH="$PWD/.go"
export GOCACHE="$work/gocache"
export PATH="/usr/lib/go/bin:$PATH"
export CGO_ENABLED=0
mkdir -p .go/src/k8s.io
[ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
env HOME="$work/home" make WHAT=cmd/kube-apiserver
mkdir -p "$(dirname "$out")"
cp _output/bin/kube-apiserver "$out.tmp"
mv "$out.tmp" "$out"
