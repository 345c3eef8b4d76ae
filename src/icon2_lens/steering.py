"""Steering: add ``gamma * u`` to the residual stream at a range of layers (METHOD.md section 4).

`steering_vectors` turns a criterion and gamma (one, or one per batch row) into per-layer vectors;
`steer` wraps them in a declarative `icon2_lens.gen.SteerSpec` and applies it, while active, on the
engines of `icon2_lens.gen`:

* ``"hf"``: torch forward hooks on the decoder layers of the fast engine's HF model
  (`icon2_lens.gen.hf_model`), used with HF ``generate``;
* ``"bridge"``: TransformerLens hooks on the bridge's hook points (``blocks.{l}.hook_resid_post``),
  for ``model.bridge(...)`` / ``model.bridge.generate(...)`` and analysis code;
* ``"both"`` (default): both.

Stages do not use `steer`: they pass a `SteerSpec` to `icon2_lens.gen.Generator.generate`.

**What gamma means** (`Scale`). The same vector family is added at *every* steering layer, and what
is added at an early layer is still in the residual stream at the later ones, so the pushes add up
(adjacent-layer directions are close to parallel). No scale makes one gamma "mean the same" across
models or layer ranges; state strengths in a unit you can check:

* ``"relative"`` (default): at layer ``l`` the vector is ``gamma * resid_norm[c, l] * u[c, l]``, a
  fraction ``gamma`` of that layer's mean residual norm at the read position. Summed over ``L``
  layers the push can be several times ``gamma`` of the last layer's residual norm.
* ``"unit"``: ``gamma * u[c, l]`` (``u`` is a unit vector): gamma is in the residual stream's own
  units, so its effect depends on the model's residual norms.
* ``"contrast"``: ``gamma * |proj_gap[c, l]| / L * u[c, l]``, where ``proj_gap`` is the mean
  projection of the criterion's ``h+ - h-`` (its P+/P- system-prompt gap) at layer ``l``. Summed
  over the ``L`` layers, gamma = 1 adds about one contrast gap (exactly one if the layer
  directions were parallel and the gap the same at every layer): gamma is in units of the
  criterion's own effect.

The Icon2 paper does not state its gamma scale (neither unit nor relative); its values (0.1, -0.05)
cannot be carried over as they are. `icon2_lens.math.gamma.cumulative_push` measures what a set of
vectors adds up to at the last steering layer (`icon2_lens.calibrate_gamma` reports it per gamma).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, Literal

from jaxtyping import Float
from torch import Tensor

from .activations import hook_kind
from .directions import SCALES, DirectionSet, Scale, steering_vectors
from .gen import PositionTracker, SteerAdder, SteerSpec, engine
from .gen.base import Positions
from .models import LoadedModel

__all__ = ["steer", "Steering", "steering_vectors", "steer_spec", "Scale", "SCALES", "Positions", "SteerPath"]

#: Which engine the hooks go on: the fast HF engine, the bridge, or both.
SteerPath = Literal["hf", "bridge", "both"]


class Steering:
    """A `SteerSpec` applied on one or both engines; a context manager (hooks removed on exit, also on error).

    Made by `steer`. ``reset()`` forgets the prompt length learnt from the last prefill (call it
    between two ``generate`` calls inside one context when ``positions="generated"`` and the new
    prompt could be mistaken for a continuation).
    """

    def __init__(self, model: LoadedModel, spec: SteerSpec, *, path: SteerPath) -> None:
        if path not in ("hf", "bridge", "both"):
            raise ValueError(f"Unknown path {path!r}; use 'hf', 'bridge' or 'both'.")
        spec.check_layers(model.n_layers, model.info.model_id)
        self.model, self.spec, self.path = model, spec, path
        self._adders: list[SteerAdder] = []
        self._stack: ExitStack | None = None
        self._calls = 0

    @property
    def vectors(self) -> dict[int, Tensor]:
        """Layer -> the added vectors (``[rows, d_model]``)."""
        return dict(self.spec.vectors)

    @property
    def positions(self) -> Positions:
        """``"all"`` or ``"generated"``."""
        return self.spec.positions

    @property
    def calls(self) -> int:
        """Hook calls that changed activations so far (for tests and diagnostics)."""
        return self._calls + sum(a.calls for a in self._adders)

    @property
    def trackers(self) -> list[PositionTracker]:
        """The position trackers of the active hooks (empty outside the context)."""
        return [a.tracker for a in self._adders]

    def reset(self) -> None:
        """Forget positions seen so far (start of a new generation)."""
        for a in self._adders:
            a.tracker.reset()

    def __enter__(self) -> Steering:
        if self._stack is not None:
            raise RuntimeError("This Steering is already active.")
        stack = ExitStack()
        try:
            for kind in (("hf", "bridge") if self.path == "both" else (self.path,)):
                self._adders += stack.enter_context(engine(self.model, kind).steering(self.spec))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        self._calls += sum(a.calls for a in self._adders)
        self._adders = []
        if stack is not None:
            stack.close()


def steer_spec(
    directions: DirectionSet,
    criterion: str | Sequence[str],
    gamma: float | Sequence[float] | Float[Tensor, " batch"],
    *,
    layers: Sequence[int] | range | None = None,
    scale: Scale = "relative",
    positions: Positions = "all",
) -> SteerSpec:
    """The declarative `SteerSpec` for ``gamma * u_criterion`` (one, or one per row) at ``layers``.

    ``scale`` says what gamma is measured in (``"relative"``, ``"unit"`` or ``"contrast"``; see
    `steering_vectors` and the module docs).

    Examples:
        >>> spec = steer_spec(dirs, ["helpful", "helpful"], [0.07, -0.02], layers=range(15, 25))  # doctest: +SKIP
        >>> spec.rows  # doctest: +SKIP
        2
    """
    kind = hook_kind(directions.hook)
    if kind not in ("resid_pre", "resid_post"):
        raise ValueError(f"Steering supports resid_pre and resid_post hooks, not {kind!r}.")
    vecs = steering_vectors(directions, criterion, gamma, layers=layers, scale=scale)
    return SteerSpec(vecs, hook=kind, positions=positions)  # type: ignore[arg-type]


def steer(
    model: LoadedModel,
    directions: DirectionSet,
    criterion: str | Sequence[str],
    gamma: float | Sequence[float] | Float[Tensor, " batch"],
    *,
    layers: Sequence[int] | range | None = None,
    scale: Scale = "relative",
    positions: Positions = "all",
    path: SteerPath = "both",
) -> Steering:
    """Add ``gamma * u_criterion`` to the residual stream at every layer of a range, while active.

    Args:
        model: from `icon2_lens.load_model`; must match the directions.
        directions: the `DirectionSet`; its hook kind (``resid_post`` or ``resid_pre``) is steered.
        criterion: a criterion name, or one per batch row.
        gamma: strength: one value, or one per batch row (a list or a 1-D tensor).
        layers: layer ids (default: the range the layer report suggested).
        scale: what gamma is measured in (module docs): ``"relative"`` (default: a fraction of each
            layer's mean residual norm at the read position, added at every layer, so the summed push
            at the last layer is larger than gamma), ``"unit"`` (gamma times the unit vector) or
            ``"contrast"`` (the criterion's P+/P- projection gap spread over the layers: gamma = 1
            adds about one gap in all). The paper does not state its scale.
        positions: ``"all"`` (default, as the paper) or ``"generated"`` (only tokens after the prompt).
        path: ``"both"`` (default: hooks on the HF generation model and on the bridge), ``"hf"`` or ``"bridge"``.

    Returns:
        A `Steering`; use it as a context manager. Hooks are removed on exit, also on error.

    Examples:
        >>> with il.steer(model, dirs, "helpful", 0.07, layers=range(15, 25)):  # doctest: +SKIP
        ...     out = il.gen.hf_model(model).generate(ids, max_new_tokens=40)
    """
    directions.check_compatible(model)
    return Steering(model, steer_spec(directions, criterion, gamma, layers=layers, scale=scale, positions=positions),
                    path=path)
