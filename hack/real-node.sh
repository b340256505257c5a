# The real node of the local cluster (sourced by hack/cluster): containerd + runc + CNI bridge,
# a kubelet and kube-proxy (iptables mode) joined to the local control plane beside the KWOK
# nodes. Tainted and labelled kubemaas.io/real-node=true, so only pods that ask land on it.
# Off with KUBEMAAS_REAL_NODE=0. One per machine: kube-proxy's iptables chains, the CNI bridge
# and the kubepods cgroups are machine-wide, so a second one refuses to start (see claim_node).
# docs/local-cluster.md ("The real node") explains every setting below.
# shellcheck shell=bash

NODE=$STATE/node
NODE_NAME=real-0
NODE_LABEL=kubemaas.io/real-node
POD_CIDR=${KUBEMAAS_POD_CIDR:-10.88.0.0/24}
BRIDGE=kubemaas0
NODE_OWNER=/run/kubemaas/real-node # the cluster dir of the checkout whose real node runs
CONTAINERD_SOCK=$NODE/containerd.sock
# The light images' dependencies (hack/images --light): this checkout's installed packages,
# mounted read-only at /opt/kubemaas/deps in every container of the node.
NODE_DEPS=${KUBEMAAS_NODE_DEPS:-$REPO_DIR/.venv/lib/python3.11/site-packages}
# and runtime-vllm's (hack/images --light runtime-vllm): the vLLM venv's (hack/vllm-venv), at
# /opt/kubemaas/deps-vllm. Left out (with a note) where that venv is not built.
NODE_DEPS_VLLM=${KUBEMAAS_NODE_DEPS_VLLM:-${KUBEMAAS_VLLM_VENV:-${KUBEMAAS_CACHE:-$HOME/.cache/kubemaas}/venv-vllm}/lib/python3.11/site-packages}
NODE_COMPONENTS=(containerd kubelet kube-proxy)

host_ip() { # the address pods reach the API server on (and the node's InternalIP)
  [ -n "${KUBEMAAS_NODE_IP:-}" ] && { echo "$KUBEMAAS_NODE_IP"; return; }
  ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p'
}

ctr_() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }
crictl_() { "$BIN_DIR/crictl" --runtime-endpoint "unix://$CONTAINERD_SOCK" --timeout 30s "$@"; }

# One real node per machine: refuse clearly when another checkout's node is alive; take over
# (cleaning its machine-wide leftovers) when it died without `down`.
claim_node() {
  mkdir -p "$(dirname "$NODE_OWNER")"
  exec 8>"$NODE_OWNER.lock"
  flock -w 30 8 || { log "error: $NODE_OWNER.lock is held"; return 1; }
  local owner=""
  [ -f "$NODE_OWNER" ] && owner=$(cat "$NODE_OWNER")
  if [ -n "$owner" ] && [ "$owner" != "$STATE" ]; then
    if owner_alive "$owner"; then
      log "error: a real node already runs on this machine, for the cluster in $owner"
      log "  only one can: stop it there (hack/cluster down), or start this cluster without one: KUBEMAAS_REAL_NODE=0 hack/cluster up"
      exec 8>&-
      return 1
    fi
    log "the real node of $owner died without 'down': cleaning what it left"
    clean_machine
  fi
  echo "$STATE" >"$NODE_OWNER"
  exec 8>&-
}

# The owner is alive while any process its cluster recorded runs, or while its claim is fresh
# (an `up` between claiming and starting its first process).
owner_alive() { # cluster-dir
  local f
  for f in "$1"/pids/*; do
    [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && return 0
  done
  [ -n "$(find "$NODE_OWNER" -newermt '-120 seconds' 2>/dev/null)" ]
}

gen_node_pki() {
  [ -f "$PKI/kubelet.crt" ] && return
  (
    cd "$PKI"
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    local who
    for who in "kubelet:/O=system:nodes/CN=system:node:$NODE_NAME" "kube-proxy:/CN=system:kube-proxy"; do
      openssl req -newkey rsa:2048 -nodes -keyout "${who%%:*}.key" -out "${who%%:*}.csr" -subj "${who#*:}" 2>/dev/null
      openssl x509 -req -in "${who%%:*}.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile client.ext -out "${who%%:*}.crt" 2>/dev/null
    done
    rm -f ./*.csr client.ext
  )
}

node_kubeconfig() { # who port
  local b64; b64() { base64 -w0 <"$1"; }
  cat >"$NODE/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$2", certificate-authority-data: $(b64 "$PKI/ca.crt")}
users:
- name: $1
  user: {client-certificate-data: $(b64 "$PKI/$1.crt"), client-key-data: $(b64 "$PKI/$1.key")}
contexts:
- name: local
  context: {cluster: local, user: $1}
current-context: local
EOF
  chmod 600 "$NODE/$1.kubeconfig"
}

# containerd's default OCI spec plus the light images' read-only dependency mounts.
write_base_spec() {
  local vllm_deps=""
  if [ -d "$NODE_DEPS_VLLM" ]; then vllm_deps=$NODE_DEPS_VLLM
  else log "no $NODE_DEPS_VLLM: the light runtime-vllm image will not find vLLM (hack/vllm-venv builds it)"; fi
  ctr oci spec | python3 -c '
import json, sys
spec = json.load(sys.stdin)
for source, destination in zip(sys.argv[1:], ["/opt/kubemaas/deps", "/opt/kubemaas/deps-vllm"]):
    if source:
        spec["mounts"].append({"destination": destination, "type": "bind", "source": source,
                               "options": ["rbind", "ro", "nosuid", "nodev"]})
json.dump(spec, sys.stdout, indent=1)' "$NODE_DEPS" "$vllm_deps" >"$NODE/base-spec.json"
}

write_node_config() {
  local api_port=$1 ip=$2 kubelet_port healthz_port proxy_healthz proxy_metrics base_spec=""
  kubelet_port=$(free_port); healthz_port=$(free_port); proxy_healthz=$(free_port); proxy_metrics=$(free_port)
  mkdir -p "$NODE/cni/net.d" "$NODE/kubelet"
  if [ -d "$NODE_DEPS" ]; then
    write_base_spec
    base_spec="base_runtime_spec = \"$NODE/base-spec.json\""
  else
    log "no $NODE_DEPS: light images (hack/images --light) will not find their packages"
  fi
  cat >"$NODE/containerd.toml" <<EOF
version = 2
root = "$NODE/containerd/root"
state = "$NODE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$NODE/containerd-ttrpc.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$("$HACK_DIR/images" ref pause)"
  # the VM lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below its own
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      $base_spec
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE/cni/net.d"
EOF
  cat >"$NODE/cni/net.d/10-kubemaas.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "kubemaas", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$NODE/cni/ipam"}}]}
EOF
  cat >"$NODE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# this VM has cgroup v1 and no systemd
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
address: $ip
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
registerWithTaints:
- {key: $NODE_LABEL, value: "true", effect: NoSchedule}
maxPods: 30
# kube-proxy owns the iptables rules; the kubelet adds none of its own
makeIPTablesUtilChains: false
failSwapOn: false
volumePluginDir: $NODE/kubelet/volume-plugins
# a shared machine's disk: never evict for disk or garbage-collect the imported images
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
  cat >"$NODE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $NODE/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
healthzBindAddress: 127.0.0.1:$proxy_healthz
metricsBindAddress: 127.0.0.1:$proxy_metrics
nodePortAddresses: ["$ip/32"]
# 0: leave the machine's conntrack sysctls as they are
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  node_kubeconfig kubelet "$api_port"
  node_kubeconfig kube-proxy "$api_port"
  cat >"$STATE/cmd/containerd" <<EOF
containerd --config $NODE/containerd.toml
EOF
  cat >"$STATE/cmd/kubelet" <<EOF
$BIN_DIR/kubelet --config=$NODE/kubelet.yaml --kubeconfig=$NODE/kubelet.kubeconfig
 --root-dir=$NODE/kubelet --cert-dir=$NODE/kubelet/pki --hostname-override=$NODE_NAME
 --node-ip=$ip --node-labels=$NODE_LABEL=true
EOF
  cat >"$STATE/cmd/kube-proxy" <<EOF
$BIN_DIR/kube-proxy --config=$NODE/kube-proxy.yaml
EOF
}

# kube-apiserver flags the real node needs: an address pods reach (the host's, with endpoints
# for the kubernetes Service kept by the API server), the Node authorizer for the kubelet's
# identity, and a client certificate for logs/exec that dials kubelets by IP.
real_node_apiserver_flags() { # ip
  echo " --bind-address=0.0.0.0 --advertise-address=$1 --endpoint-reconciler-type=lease"
  echo " --authorization-mode=Node,RBAC --kubelet-preferred-address-types=InternalIP,Hostname"
  echo " --kubelet-client-certificate=$PKI/admin.crt --kubelet-client-key=$PKI/admin.key"
}

node_ready() {
  [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

node_up() {
  local ip; ip=$(cat "$STATE/node-ip")
  claim_node
  gen_node_pki
  [ -f "$STATE/cmd/kubelet" ] || write_node_config "$(cat "$STATE/apiserver-port")" "$ip"
  local pause; pause=$("$HACK_DIR/images" archive pause)
  [ -f "$pause" ] || "$HACK_DIR/images" build pause
  log "starting the real node $NODE_NAME (containerd, kubelet, kube-proxy; pods in $POD_CIDR)"
  start_component containerd
  wait_for "containerd" "$READY_TIMEOUT" ctr_ version
  ctr_ images import "$pause" >/dev/null
  start_component kubelet
  start_component kube-proxy
  wait_for "node $NODE_NAME Ready" "$READY_TIMEOUT" node_ready
}

node_load() { # archive... : import images into the node's containerd
  local a
  for a in "$@"; do
    [ -f "$a" ] || { log "error: no image archive $a"; return 1; }
    ctr_ images import "$a" | sed 's/^/  /' >&2
  done
}

# Everything machine-wide the node made, gone: pods (their netns, veths and CNI iptables rules
# through CNI DEL), kube-proxy's chains, the bridge, the kubepods cgroups, mounts under $STATE.
node_down() {
  if [ -f "$STATE/cmd/kubelet" ]; then node_stop_all; fi
  if [ -f "$NODE_OWNER" ] && [ "$(cat "$NODE_OWNER")" = "$STATE" ]; then rm -f "$NODE_OWNER"; fi
}

node_stop_all() {
  stop_component kubelet
  if pid_alive containerd; then
    crictl_ rmp --all --force >/dev/null 2>&1 || log "warning: crictl rmp failed"
  fi
  stop_component kube-proxy
  stop_component containerd
  clean_machine
}

clean_machine() {
  local pid m
  # shims of this node's containerd outlive it: end them by pid (their command line names our socket)
  for pid in $(grep -lsF "$NODE/containerd" /proc/[0-9]*/cmdline | cut -d/ -f3); do
    case $(cat "/proc/$pid/comm" 2>/dev/null) in containerd-shim*) kill -KILL "$pid" 2>/dev/null || true ;; esac
  done
  [ -x "$BIN_DIR/kube-proxy" ] && "$BIN_DIR/kube-proxy" --cleanup >/dev/null 2>&1 || true
  local ipt table
  for ipt in iptables ip6tables; do # the kubelet's own chains, should an older config have made them
    $ipt -D INPUT -j KUBE-FIREWALL 2>/dev/null || true
    $ipt -D OUTPUT -j KUBE-FIREWALL 2>/dev/null || true
    for table in filter nat mangle; do
      for m in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
        $ipt -t $table -F $m 2>/dev/null && $ipt -t $table -X $m 2>/dev/null || true
      done
    done
  done
  ip link delete "$BRIDGE" 2>/dev/null || true
  # every mount below the cluster dir (container rootfs, volumes, shm), deepest first
  for m in $(awk -v s="$STATE/" 'index($2, s) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for m in /sys/fs/cgroup/*/kubepods; do
    [ -d "$m" ] && find "$m" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}

node_status() {
  local c
  for c in "${NODE_COMPONENTS[@]}"; do
    if pid_alive "$c"; then echo "$c: running (pid $(cat "$STATE/pids/$c"))"; else echo "$c: stopped"; fi
  done
}
