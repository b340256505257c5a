"""Both engines implement the one interface the generation routes use (engine_api.py): the
same members, the same parameters, properties where the interface has properties."""

import inspect

import pytest
from kubemaas_runtime.generation import engine_api
from kubemaas_runtime.generation.engine import GenerationEngine, GenerationStream
from kubemaas_runtime.generation.vllm_engine import VllmEngine, VllmStream

PAIRS = [(engine_api.Engine, GenerationEngine), (engine_api.Engine, VllmEngine),
         (engine_api.Stream, GenerationStream), (engine_api.Stream, VllmStream)]


def members(protocol) -> list[str]:
    return sorted(n for n in vars(protocol) if not n.startswith("_") and n not in (
        "__parameters__",))


@pytest.mark.parametrize("protocol, implementation", PAIRS,
                         ids=lambda c: c.__name__)
def test_each_engine_has_every_member_with_the_same_parameters(protocol, implementation):
    assert members(protocol), protocol
    for name in members(protocol):
        wanted = inspect.getattr_static(protocol, name)
        given = inspect.getattr_static(implementation, name, None)
        assert given is not None, f"{implementation.__name__} lacks {name}"
        if isinstance(wanted, property):
            assert isinstance(given, property), f"{implementation.__name__}.{name}"
            continue
        expected = list(inspect.signature(wanted).parameters)
        actual = list(inspect.signature(given).parameters)
        assert actual == expected, f"{implementation.__name__}.{name}: {actual} != {expected}"


def test_the_interface_names_submit_and_stream_members():
    assert members(engine_api.Engine) == ["alive", "features", "start", "stop", "submit"]
    assert members(engine_api.Stream) == ["cancel", "chunks"]


def test_each_engine_lists_only_known_features():
    from kubemaas_runtime.generation.engine import GenerationEngine
    from kubemaas_runtime.generation.vllm_engine import VllmEngine
    for cls in (GenerationEngine, VllmEngine):
        assert isinstance(cls.__dict__["features"], property), cls
    assert engine_api.FEATURES == {"top_k", "penalties", "logprobs", "json_schema"}
    assert VllmEngine.__dict__["features"].fget(None) <= engine_api.FEATURES
