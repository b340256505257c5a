"""spec.runtime.compile (and a variant's compile): the builtin engine's compiled decode. Who may
ask for it, the env the pod gets, the revision, and the startup probe's allowance for it."""

from __future__ import annotations

import pytest
from kubemaas_operator import gpufit
from kubemaas_operator.api import describe_errors, rules
from kubemaas_operator.builders import build_children
from kubemaas_operator.builders.revision import variant_revisions
from kubemaas_operator.settings import OperatorSettings
from pydantic import ValidationError

from tests.unit.support import ENCODER, GGUF, LLM, make_ms
from tests.unit.support import engine_spec as spec

SETTINGS = OperatorSettings()  # startup_timeout_seconds 1800


def deployments(ms):
    return {c["metadata"]["name"]: c for c in build_children(ms, SETTINGS) if c["kind"] == "Deployment"}


def runtime_container(dep):
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def env_of(dep):
    return {e["name"]: e["value"] for e in runtime_container(dep)["env"]}


# --- the API: who may ask for it ----------------------------------------------------------------

def test_off_by_default_and_a_variant_overrides_the_runtimes():
    ms = make_ms(spec(GGUF, runtime={"compile": "decode"},
                      variants=[{"name": "a", "weight": 50}, {"name": "b", "compile": "off", "weight": 50}]))
    a, b = ms.spec.variants
    assert (ms.spec.compile_of(a), ms.spec.compile_of(b)) == ("decode", "off")
    assert make_ms(spec(GGUF)).spec.runtime.compile == "off"


@pytest.mark.parametrize("body", [
    spec(GGUF, runtime={"compile": "decode"}),                               # auto: builtin for GGUF
    spec(LLM, runtime={"compile": "decode"}),                                # auto: builtin on CPU
    spec(LLM, 1, runtime={"engine": "builtin", "compile": "decode"}),        # asked for on a GPU
    spec(LLM, 1, variants=[{"name": "vllm", "weight": 50},                   # auto (vllm) stays eager
                           {"name": "compiled", "engine": "builtin", "compile": "decode", "weight": 50}]),
    spec(LLM, 1, runtime={"engine": "vllm", "compile": "decode"},            # the vllm variant opts out
         variants=[{"name": "vllm", "compile": "off", "weight": 50},
                   {"name": "compiled", "engine": "builtin", "weight": 50}]),
    spec(ENCODER, runtime={"compile": "off"}),                               # off is always allowed
], ids=["gguf", "llm-cpu", "builtin-gpu", "variant-builtin", "vllm-variant-off", "encoder-off"])
def test_accepted_where_the_builtin_engine_decodes(body):
    make_ms(body)


@pytest.mark.parametrize(("body", "rule"), [
    (spec(LLM, 1, runtime={"engine": "vllm", "compile": "decode"}), rules.COMPILE_NEEDS_BUILTIN_ENGINE),
    (spec(LLM, 0, runtime={"engine": "vllm", "compile": "decode"}), rules.COMPILE_NEEDS_BUILTIN_ENGINE),
    (spec(LLM, 1, runtime={"compile": "decode"}), rules.COMPILE_NEEDS_BUILTIN_ENGINE),   # auto takes vllm
    (spec(LLM, 1, runtime={"compile": "decode", "engine": "builtin"},                    # a variant's vllm
          variants=[{"name": "a", "weight": 50}, {"name": "b", "engine": "vllm", "weight": 50}]),
     rules.COMPILE_NEEDS_BUILTIN_ENGINE),
    (spec(LLM, 1, variants=[{"name": "a", "compile": "decode"}]), rules.COMPILE_NEEDS_BUILTIN_ENGINE),
    (spec(ENCODER, runtime={"compile": "decode"}), rules.COMPILE_NEEDS_TEXT_GENERATION),
    (spec(ENCODER, variants=[{"name": "a", "compile": "decode"}]), rules.COMPILE_NEEDS_TEXT_GENERATION),
    (spec(LLM, runtime={"compile": "decode"}, adapters=[]), rules.COMPILE_NOT_WITH_ADAPTERS),
], ids=["vllm-gpu", "vllm-cpu", "auto-vllm", "variant-vllm", "variant-auto-vllm", "encoder",
        "variant-encoder", "adapters"])
def test_refused_where_it_cannot_run_on_the_field_named(body, rule):
    with pytest.raises(ValidationError) as caught:
        make_ms(body)
    assert describe_errors(caught.value) == [f"spec.runtime.compile: {rule.message}"]


# --- the pod: the env, and its revision -----------------------------------------------------------

def test_the_pod_is_told_decode_only_where_the_variant_compiles():
    ms = make_ms(spec(LLM, 1, runtime={"compile": "decode", "engine": "builtin"},
                      variants=[{"name": "a", "weight": 50}, {"name": "b", "compile": "off", "weight": 50}]))
    deps = deployments(ms)
    assert env_of(deps["m-a"])["KUBEMAAS_COMPILE"] == "decode"
    assert "KUBEMAAS_COMPILE" not in env_of(deps["m-b"])  # off, the runtime's default: not written
    assert "KUBEMAAS_COMPILE" not in env_of(deployments(make_ms(spec(GGUF)))["m-default"])


def test_compile_changes_the_revision_and_off_at_its_default_does_not():
    plain = variant_revisions(make_ms(spec(GGUF)), "img")
    assert variant_revisions(make_ms(spec(GGUF, runtime={"compile": "off"})), "img") == plain
    assert variant_revisions(make_ms(spec(GGUF, runtime={"compile": "decode"})), "img") != plain
    compiled_variant = make_ms(spec(GGUF, variants=[{"name": "default", "compile": "decode"}]))
    assert variant_revisions(compiled_variant, "img") != plain


# --- the startup probe and the Deployment's progress deadline -------------------------------------

@pytest.mark.parametrize(("body", "seconds"), [
    (spec(GGUF), 1800),                                                        # the operator setting
    (spec(GGUF, runtime={"compile": "decode"}), 1800 + 5 * 120),               # maxNumSeqs 16: 5 graphs
    (spec(GGUF, runtime={"compile": "decode", "maxNumSeqs": 32}), 1800 + 6 * 120),
    (spec(GGUF, runtime={"compile": "decode", "maxNumSeqs": 1}), 1800 + 1 * 120),
    (spec(GGUF, runtime={"compile": "decode", "maxNumSeqs": 4096}), 1800 + 13 * 120),
    # a model large enough to need more than the setting to load: the allowance comes on top
    (spec({**LLM, "parameterCount": "70B"}, 1, runtime={"engine": "builtin", "compile": "decode"}),
     600 + -(-140_000_000_000 // (100 * 2**20)) + 5 * 120),
    (spec(LLM, 1, runtime={"engine": "vllm"}), 1800 + 600),                    # vllm: its own extra
], ids=["eager", "decode-16", "decode-32", "decode-1", "decode-4096", "decode-70b", "vllm"])
def test_the_startup_probe_and_progress_deadline_allow_for_the_compile(body, seconds):
    (dep,) = deployments(make_ms(body)).values()
    probe = runtime_container(dep)["startupProbe"]
    assert probe["periodSeconds"] == 5
    assert probe["failureThreshold"] == seconds // 5
    assert dep["spec"]["progressDeadlineSeconds"] == seconds + 300


def test_each_variant_gets_its_own_budget():
    ms = make_ms(spec(GGUF, runtime={"compile": "decode"},
                      variants=[{"name": "a", "weight": 50}, {"name": "b", "compile": "off", "weight": 50}]))
    deps = deployments(ms)
    assert runtime_container(deps["m-a"])["startupProbe"]["failureThreshold"] == (1800 + 600) // 5
    assert runtime_container(deps["m-b"])["startupProbe"]["failureThreshold"] == 1800 // 5
    assert gpufit.compile_seconds(ms, ms.spec.variants[0]) == 5 * gpufit.COMPILE_SECONDS_PER_GRAPH
    assert gpufit.compile_seconds(ms, ms.spec.variants[1]) == 0
