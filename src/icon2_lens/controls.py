"""Controls for a claimed effect of preference data (EVIDENCE.md, "Controls").

An effect of training on Icon2 pairs counts only next to the nulls that should remove or reverse it:

* **swapped** (`swap_pairs`): the same pairs with chosen and rejected exchanged. If training on the
  real pairs helps, training on the swapped ones should hurt by about as much: it shows the measure
  sees the direction of the data at all.
* **random** (`random_directions`): pairs generated exactly as the real ones (same instructions,
  gammas, layers, scale, decoding, seed) but steered along random directions: the real directions turned
  by one seeded random rotation, so each layer's added vector has the norm the real one would have and the
  pushes of successive layers add up as they do for the real directions. It separates what the
  criterion direction adds from what any push of that size does to the text (length, fluency).

`make_controls` generates and trains them beside a run; `icon2_lens.evaluate` evaluates them next to
the trained model (``controls=``) with the judge-free preference margin of `icon2_lens.preference`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .directions import DirectionSet
from .models import LoadedModel
from .pairs import PairsConfig, generate_pairs
from .runs.io import read_jsonl
from .training import TrainConfig, train

__all__ = ["ControlKind", "ControlsConfig", "swap_pairs", "random_directions", "make_controls", "CONTROL_KINDS"]

#: The controls `make_controls` can build.
ControlKind = Literal["swapped", "random"]
CONTROL_KINDS: tuple[str, ...] = ("swapped", "random")


@dataclass(frozen=True, kw_only=True)
class ControlsConfig:
    """Settings of `make_controls`: the one source of their defaults (library, CLI and pipeline).

    Attributes:
        kinds: which controls to build: ``"swapped"`` (chosen <-> rejected) and/or ``"random"`` (pairs
            steered along a random direction of the same per-layer norm).
        direction_seed: seed of the random directions.

    Examples:
        >>> ControlsConfig().kinds
        ['swapped', 'random']
    """

    kinds: list[ControlKind] = field(default_factory=lambda: ["swapped", "random"])
    direction_seed: int = 0

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in CONTROL_KINDS]
        if bad:
            raise ValueError(f"Unknown control kind(s) {bad}; use any of {list(CONTROL_KINDS)}.")
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"Control kinds repeat in {self.kinds}; name each once.")


def _rows(pairs: Any) -> list[dict[str, Any]]:
    if isinstance(pairs, (str, os.PathLike)):
        p = Path(pairs)
        p = p / "pairs.jsonl" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; pass a `generate` output folder or its pairs.jsonl.")
        return read_jsonl(p)
    return [dict(r) for r in pairs]


def swap_pairs(pairs: Any) -> list[dict[str, Any]]:
    """The pairs with ``chosen`` and ``rejected`` exchanged (their ``*_finished`` / ``*_tokens`` too).

    Examples:
        >>> swap_pairs([{"chosen": "a", "rejected": "b", "chosen_finished": True, "rejected_finished": False}])
        [{'chosen': 'b', 'rejected': 'a', 'chosen_finished': False, 'rejected_finished': True, 'control': 'swapped'}]
    """
    out = []
    for r in _rows(pairs):
        s = dict(r)
        for a, b in (("chosen", "rejected"), ("chosen_finished", "rejected_finished"),
                     ("chosen_tokens", "rejected_tokens")):
            if a in r or b in r:
                s[a], s[b] = r.get(b), r.get(a)
        s["control"] = "swapped"
        out.append(s)
    if not out:
        raise ValueError("No pairs to swap.")
    return out


def random_directions(directions: DirectionSet, *, seed: int = 0) -> DirectionSet:
    """A copy of ``directions`` turned by one seeded random rotation of the residual space: every vector
    ``u[c, l]`` becomes ``Q u[c, l]`` for the same orthogonal ``Q``. Norms, the cosines between layers (so
    how the per-layer pushes add up) and between criteria are kept exactly, while the directions point
    nowhere in particular; the statistics (residual norms, projection gaps) are kept too, so every steering
    scale adds vectors of the same norms as with the real directions.

    Examples:
        >>> rnd = random_directions(dirs, seed=0)  # doctest: +SKIP
        >>> float(rnd.vectors[0, 3].norm())  # doctest: +SKIP
        1.0
    """
    d = directions.vectors.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    v = (directions.vectors.double() @ q.T).to(directions.vectors.dtype)
    meta = {**directions.meta, "control": "random", "control_seed": seed}
    return dataclasses.replace(directions, vectors=v, meta=meta)


def make_controls(
    model: LoadedModel,
    directions: DirectionSet,
    pairs: Any,
    config: ControlsConfig | None = None,
    *,
    pairs_config: PairsConfig | None = None,
    train_config: TrainConfig | None = None,
    model_source: str | os.PathLike[str] | None = None,
    seed: int = 0,
    out: str | os.PathLike[str],
    progress: bool = True,
) -> dict[str, Path]:
    """Build and train the controls of a set of Icon2 pairs; return ``{kind: trained model folder}``.

    Each control goes to ``out/<kind>/``: ``pairs.jsonl`` (the control's pairs) and ``model/`` (trained
    with ``train_config``, exactly as the real pairs were). ``random`` regenerates the pairs' instructions
    with ``pairs_config`` (the settings the real pairs were made with) along `random_directions`. A control
    already built from the same pairs and settings (``<kind>/control.json`` holds a hash of them) is kept, so
    a rerun resumes; one built from other pairs or settings is rebuilt. Generation resumes batch by batch.

    Args:
        model: the base model (generates the random-direction pairs).
        directions: the real directions (with the suggested layers).
        pairs: the real pairs (`icon2_lens.generate_pairs` output, rows, or a ``generate`` folder).
        config: which controls (`ControlsConfig`).
        pairs_config: how the real pairs were generated (default: read from the rows' settings columns, else
            `PairsConfig` defaults).
        train_config: how the real model was trained (default: `TrainConfig` defaults).
        model_source: the base model's source for training (default: the one ``model`` was loaded from).
        seed: generation seed of the real pairs.
        out: the controls folder.
        progress: progress bars.

    Examples:
        >>> paths = make_controls(model, dirs, "runs/demo/generate", out="runs/demo/controls")  # doctest: +SKIP
        >>> controls = {k: il.load_model(p) for k, p in paths.items()}  # doctest: +SKIP
    """
    from .runs.io import atomic_write_text

    cfg = config or ControlsConfig()
    rows = _rows(pairs)
    if not rows:
        raise ValueError("No pairs to build controls for; generate pairs first.")
    pcfg = pairs_config or _pairs_config_of(rows)
    tcfg = train_config or TrainConfig()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    for kind in cfg.kinds:
        folder = root / kind
        target = folder / "model"
        recipe = json.dumps({"kind": kind, "pairs": [[r.get("instruction"), r.get("criterion"), r["chosen"],
                                                      r["rejected"]] for r in rows],
                             "pairs_config": dataclasses.asdict(pcfg), "train_config": dataclasses.asdict(tcfg),
                             "direction_seed": cfg.direction_seed, "seed": seed}, sort_keys=True, default=str)
        digest = hashlib.sha256(recipe.encode("utf-8")).hexdigest()
        stamp = folder / "control.json"
        if (target / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()).get(
                "sha256") == digest:
            result[kind] = target  # built earlier from the same pairs and settings
            continue
        if stamp.is_file():  # built from other pairs or settings: start this control afresh
            shutil.rmtree(folder)  # (an interrupted build has no stamp: its generation resumes batch by batch)
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "swapped":
            ctrl = swap_pairs(rows)
            atomic_write_text(folder / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in ctrl))
        else:
            table = [{"instruction": r["instruction"], "criterion": r["criterion"],
                      "consistency": r.get("consistency")} for r in rows]
            ds = generate_pairs(model, random_directions(directions, seed=cfg.direction_seed), table, pcfg, seed=seed,
                                out=folder / f"generation-seed{cfg.direction_seed}", progress=progress)
            ctrl = [{**dict(r), "control": "random"} for r in ds]
            atomic_write_text(folder / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in ctrl))
        source = model_source if model_source is not None else (None if model.info.kind == "embedded"
                                                                 else model.info.hf_path)
        train(ctrl, config=tcfg, model_source=source, output_dir=target, device=model.device.type,
              overwrite=True, progress=progress)
        atomic_write_text(stamp, json.dumps({"sha256": digest, "kind": kind, "direction_seed": cfg.direction_seed}))
        result[kind] = target
    return result


def _pairs_config_of(rows: Sequence[dict[str, Any]]) -> PairsConfig:
    """The `PairsConfig` recorded in the pairs' settings columns (defaults where a column is missing)."""
    first = rows[0]
    fields = {f.name for f in dataclasses.fields(PairsConfig)}
    # ``criterion`` is a whole-table override in PairsConfig; the rows' own criteria are what the pairs used
    given = {k: first[k] for k in fields - {"criterion"} if k in first and first[k] is not None}
    if "layers" in given and isinstance(given["layers"], list) and not given["layers"]:
        given.pop("layers")
    return PairsConfig(**given)
