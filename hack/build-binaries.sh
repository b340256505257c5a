#!/usr/bin/env bash
# Builds the local control plane's binaries from their Go modules into a cache outside the
# checkout. Idempotent: a binary that is already there (and reports its version) is skipped.
# Sourced by hack/cluster; usable alone: hack/build-binaries.sh
set -euo pipefail
HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$HACK_DIR/versions.env"
CACHE_ROOT=${KUBEMAAS_CACHE:-$HOME/.cache/kubemaas}
BIN_DIR=$CACHE_ROOT/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION
SRC_DIR=$CACHE_ROOT/src
export CGO_ENABLED=0 GOFLAGS=-trimpath GOTOOLCHAIN=local

log() { printf '[kubemaas %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# The real kubelet node (hack/real-node.sh) is on unless KUBEMAAS_REAL_NODE=0: only one may run
# on a machine, so every other checkout sets it to 0 and builds and installs none of it.
real_node_wanted() { [ "${KUBEMAAS_REAL_NODE:-1}" != 0 ]; }
have() { [ -x "$BIN_DIR/$1" ]; }

# go.mod of a wrapper module that builds k8s.io/kubernetes commands: every staging module the
# kubernetes go.mod replaces with ./staging/... is pinned to the matching v0.x release instead.
kube_wrapper() {
  local dir=$SRC_DIR/kubernetes-$KUBE_VERSION minor=${KUBE_VERSION#v1.} stage_ver
  stage_ver=v0.$minor
  mkdir -p "$dir"
  # a wrapper resolved before kubelet and kube-proxy were in it is resolved again
  if [ ! -f "$dir/go.sum" ] || [ ! -f "$dir/.resolved" ] || ! grep -q kube-proxy "$dir/tools.go"; then
    log "resolving k8s.io/kubernetes@$KUBE_VERSION (staging modules at $stage_ver)"
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    {
      echo "module kubemaas.local/kubebuild"
      echo
      echo "go 1.25.0"
      echo
      echo "require k8s.io/kubernetes $KUBE_VERSION"
      echo
      grep -E '=> \./staging/' "$gomod" | awk -v v="$stage_ver" '{print "replace " $1 " => " $1 " " v}'
    } >"$dir/go.mod"
    cat >"$dir/tools.go" <<'GO'
//go:build tools

package kubebuild

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
    (cd "$dir" && go mod tidy -e >&2)
    touch "$dir/.resolved"
  fi
  echo "$dir"
}

kube_ldflags() {
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local flags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

build_kube() {
  local missing=() c wanted=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  real_node_wanted && wanted+=(kubelet kube-proxy)
  for c in "${wanted[@]}"; do have "$c" || missing+=("$c"); done
  [ ${#missing[@]} -eq 0 ] && { log "kubernetes $KUBE_VERSION: cached"; return; }
  local dir; dir=$(kube_wrapper)
  local pkgs=(); for c in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  log "building ${missing[*]} $KUBE_VERSION (cold: tens of minutes on 2 cores)"
  (cd "$dir" && go build -ldflags "$(kube_ldflags)" -o "$BIN_DIR/" "${pkgs[@]}")
}

build_etcd() {
  have etcd && { log "etcd $ETCD_VERSION: cached"; return; }
  local dir=$SRC_DIR/etcd-$ETCD_VERSION
  mkdir -p "$dir"
  if [ ! -f "$dir/.resolved" ]; then
    log "resolving go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    local v=$ETCD_VERSION
    cat >"$dir/go.mod" <<GOMOD
module kubemaas.local/etcdbuild

go 1.25.0

require go.etcd.io/etcd/server/v3 $v
GOMOD
    cat >"$dir/tools.go" <<'GO'
//go:build tools

package etcdbuild

import _ "go.etcd.io/etcd/server/v3"
GO
    (cd "$dir" && go mod tidy -e >&2)
    touch "$dir/.resolved"
  fi
  log "building etcd $ETCD_VERSION"
  (cd "$dir" && go build -ldflags "-s -w" -o "$BIN_DIR/etcd" go.etcd.io/etcd/server/v3)
}

build_plain() { # name module-path version
  have "$1" && { log "$1 $3: cached"; return; }
  log "building $1 $3"
  GOBIN=$BIN_DIR go install -ldflags "${4:-} -s -w" "$2@$3"
}

# Debian packages the real node and the image builder use; apt-get only for what is missing.
NODE_PACKAGES=(containerd runc containernetworking-plugins iptables conntrack mmdebstrap umoci skopeo)
install_node_packages() {
  local missing=() p
  for p in "${NODE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && { log "node packages: installed"; return; }
  if [ "$(id -u)" != 0 ]; then
    log "the real node needs: sudo apt-get install ${missing[*]} (or set KUBEMAAS_REAL_NODE=0)"
    return 1
  fi
  log "installing ${missing[*]} (apt-get)"
  # Debian's own containerd service, where apt starts one, is left unused: each cluster runs its own
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
}

# KubeRay's ray-operator, the controller of the multi-node child (docs/operator.md, "Multi-node
# models"). Not in build_all: about 20 minutes cold on 2 cores; `hack/build-binaries.sh kuberay`.
# Its CRDs are in the module: $(go env GOMODCACHE)/github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION/config/crd/bases
KUBERAY_VERSION=${KUBERAY_VERSION:-v1.5.0}
KUBERAY_BIN=$CACHE_ROOT/bin/kuberay-$KUBERAY_VERSION/ray-operator
build_kuberay() {
  [ -x "$KUBERAY_BIN" ] && { log "ray-operator $KUBERAY_VERSION: cached"; return; }
  local dir=$SRC_DIR/kuberay-$KUBERAY_VERSION
  mkdir -p "$dir" "$(dirname "$KUBERAY_BIN")"
  if [ ! -f "$dir/.resolved" ]; then
    printf 'module kubemaas.local/kuberaybuild\n\ngo 1.25.0\n\nrequire github.com/ray-project/kuberay/ray-operator %s\n' \
      "$KUBERAY_VERSION" >"$dir/go.mod"
    printf '//go:build tools\n\npackage kuberaybuild\n\nimport _ "github.com/ray-project/kuberay/ray-operator"\n' >"$dir/tools.go"
    (cd "$dir" && GOWORK=off go mod tidy -e >&2)
    touch "$dir/.resolved"
  fi
  log "building ray-operator $KUBERAY_VERSION (cold: about 20 minutes on 2 cores)"
  (cd "$dir" && GOWORK=off go build -ldflags "-s -w" -o "$KUBERAY_BIN" github.com/ray-project/kuberay/ray-operator)
}

build_all() {
  mkdir -p "$BIN_DIR" "$SRC_DIR"
  build_etcd
  build_plain kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
  build_plain helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  build_kube
  if real_node_wanted; then
    build_plain crictl sigs.k8s.io/cri-tools/cmd/crictl "$CRICTL_VERSION" "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION"
    install_node_packages
  fi
  log "binaries in $BIN_DIR"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  if [ "${1:-}" = kuberay ]; then mkdir -p "$SRC_DIR"; build_kuberay; else build_all; fi
fi
