"""The engine seam: every stage generates, scores continuations and reads logits through a `Generator`.

    eng = il.gen.engine(model)                       # the HF fast path (shares the bridge's weights)
    eng = il.gen.engine(model, "bridge")             # TransformerLens hooks, the bridge's own loop
    rows = eng.generate(prompts, il.gen.Decoding(max_new_tokens=64), steer=spec, seed=0)
    with il.gen.PrefixReader(model) as r:          # last-token residuals, shared prefixes computed once
        h = r.read(token_id_lists)

A new engine is one module with a class that implements `Generator` (see docs/extending.md).
"""

from __future__ import annotations

from typing import Any, Literal, overload

from ..models import LoadedModel
from .base import Decoding, Generation, Generator, Positions, Seed, SteerHook, SteerSpec, row_seed, stop_ids
from .bridge import BridgeEngine
from .hf import HFEngine, decoder_layers
from .hooks import PositionTracker, SteerAdder
from .prefix import PrefixReader, common_prefix_length, last_token_reader

__all__ = ["BridgeEngine", "Decoding", "EngineKind", "Generation", "Generator", "HFEngine", "PositionTracker",
           "Positions", "PrefixReader", "Seed", "SteerAdder", "SteerHook", "SteerSpec", "common_prefix_length",
           "decoder_layers", "engine", "hf_model", "last_token_reader", "row_seed", "stop_ids"]

#: The built-in engines: ``"hf"`` (fast, default) and ``"bridge"`` (TransformerLens hooks).
EngineKind = Literal["hf", "bridge"]
_ENGINES = {"hf": HFEngine, "bridge": BridgeEngine}


@overload
def engine(model: LoadedModel, kind: Literal["hf"] = ...) -> HFEngine: ...
@overload
def engine(model: LoadedModel, kind: Literal["bridge"]) -> BridgeEngine: ...
@overload
def engine(model: LoadedModel, kind: EngineKind) -> HFEngine | BridgeEngine: ...


def engine(model: LoadedModel, kind: EngineKind = "hf") -> HFEngine | BridgeEngine:
    """The ``kind`` engine of ``model``, made once and kept on the model object.

    Examples:
        >>> eng = engine(model)  # doctest: +SKIP
        >>> eng is engine(model)  # doctest: +SKIP
        True
    """
    if kind not in _ENGINES:
        raise ValueError(f"Unknown engine {kind!r}; use one of {sorted(_ENGINES)}.")
    cache = model.engines
    if kind not in cache:
        cache[kind] = _ENGINES[kind](model)
    return cache[kind]


def hf_model(model: LoadedModel) -> Any:
    """The plain HF model of the fast engine (shares the bridge's weights), e.g. for ``generate`` in a notebook.

    Examples:
        >>> with il.steer(model, dirs, "helpful", 0.07):  # doctest: +SKIP
        ...     out = il.gen.hf_model(model).generate(ids, max_new_tokens=40)
    """
    return engine(model, "hf").hf_model
