"""Every decoding engine is a `Decoder`: the protocol's members, with its names, on each engine class (the vllm one
included, read without importing vllm), and the engine table that picks one by name keeps what it made."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from nested_reft.engines.choice import decoder_closed_after, decoder_for
from nested_reft.engines.compiled import CompiledDecoder
from nested_reft.engines.eager import EagerDecoder
from nested_reft.engines.interface import Decoder
from nested_reft.engines.vllm_engine import VLLMEngine

REPO = Path(__file__).resolve().parents[1]
ENGINE_CLASSES = [EagerDecoder, CompiledDecoder, VLLMEngine]


def protocol_members(protocol) -> set[str]:
    """The attributes and methods a class must have to be `protocol` (typing.get_protocol_members from 3.13)."""
    methods = {name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}
    return methods | set(protocol.__annotations__)


def test_the_protocol_declares_what_rollouts_and_the_trainer_use():
    assert protocol_members(Decoder) == {"sample", "close", "applies_skip_set", "applies_bridges"}


@pytest.mark.parametrize("engine", ENGINE_CLASSES, ids=lambda engine: engine.__name__)
def test_each_engine_has_the_protocols_members(engine):
    assert all(hasattr(engine, name) for name in protocol_members(Decoder))
    assert isinstance(engine.applies_skip_set, bool) and isinstance(engine.applies_bridges, bool)
    assert not (engine.applies_skip_set and engine.applies_bridges)  # one way of handing over the bridges
    assert inspect.signature(engine.close).parameters.keys() == {"self"}


@pytest.mark.parametrize("engine", ENGINE_CLASSES, ids=lambda engine: engine.__name__)
def test_each_engines_sample_takes_the_protocols_arguments_and_skip_set_or_bridges_if_it_applies_them(engine):
    ours = list(inspect.signature(engine.sample).parameters.values())
    declared = list(inspect.signature(Decoder.sample).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(declared)]] == [
        (p.name, p.kind, p.default) for p in declared]
    extra = [p.name for p in ours[len(declared):]]
    assert extra == (["skip_set", "bridges"] if engine.applies_skip_set else ["bridges"] if engine.applies_bridges
                     else [])
    assert all(p.default is not inspect.Parameter.empty for p in ours[len(declared):])


def test_choosing_an_engine_imports_no_vllm():
    code = "import sys, nested_reft.engines.choice, nested_reft.engines.rollout; print('vllm' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.split() == ["False"]


def test_a_closed_eager_decoder_is_kept_for_the_next_run():
    with decoder_closed_after("eager"):
        decoder = decoder_for("eager")
    assert decoder_for("eager") is decoder


def test_an_unknown_engine_is_refused_naming_the_known_ones():
    known = r"\('eager', 'compiled', 'vllm'\)"
    with pytest.raises(ValueError, match=rf"unknown decoding engine 'hf'; expected one of {known}"):
        decoder_for("hf")
