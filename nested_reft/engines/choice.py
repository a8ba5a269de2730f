"""The engine a run samples with, chosen by name in one place: `ENGINE_FACTORIES` (config.ENGINES' names) makes
the process's decoder of each engine on first use (`decoder_for`); `decoder_closed_after` closes it after a run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from nested_reft.engines.compiled import CompiledDecoder, default_compiled_mode
from nested_reft.engines.eager import EagerDecoder
from nested_reft.engines.interface import Decoder
from nested_reft.engines.vllm_engine import VLLMEngine  # imports vllm on first use only (the optional extra)


def _default_compiled() -> CompiledDecoder:
    return CompiledDecoder(mode=default_compiled_mode())


ENGINE_FACTORIES: dict[str, Callable[[], Decoder]] = {
    "eager": EagerDecoder,
    "compiled": _default_compiled,
    "vllm": VLLMEngine,
}

_DECODERS: dict[str, Decoder] = {}


def decoder_for(engine: str) -> Decoder:
    """The process's decoder of `engine` (config.ENGINES), made on first use: a compiled decoder keeps its
    compiled step and static caches for every later rollout of the run."""
    if engine not in _DECODERS:
        if engine not in ENGINE_FACTORIES:
            raise ValueError(f"unknown decoding engine {engine!r}; expected one of {tuple(ENGINE_FACTORIES)}")
        _DECODERS[engine] = ENGINE_FACTORIES[engine]()
    return _DECODERS[engine]


@contextlib.contextmanager
def decoder_closed_after(engine: str) -> Iterator[None]:
    """Close the process's decoder of `engine` after the body, also when it raises. What that releases is what a
    decoder holds beyond memory: the vllm engine's, whose process group accelerate's `end_training` would otherwise
    destroy under it, and whose requests, if the body stopped mid-generation, would otherwise meet the next run's
    (its next use builds a new one). The others keep what they hold (a compiled decoder keeps its graphs for the
    next run)."""
    try:
        yield
    finally:
        if engine in _DECODERS:
            _DECODERS[engine].close()
