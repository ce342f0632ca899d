"""Search spaces for Ray Tune, read from ``tune_spaces/*.yaml`` (by path or by name, :func:`resolve_space_path`).

A space file names the search algorithm and the parameters, as dotted keys of the training config::

    search: optuna            # grid | random | optuna
    num_samples: 24
    scheduler: asha           # optional: none | asha
    params:
      sampler.alpha: {type: uniform, low: 0.0, high: 1.0}
      loss.temperature: {type: loguniform, low: 0.01, high: 0.2}
    fixed:
      sampler.strategy: hybrid

Parameter types: ``uniform``, ``loguniform`` (low, high), ``int`` (low, high), ``choice`` (values) and
``grid`` (values; every value is run ``num_samples`` times). Errors name the file and the key::

    >>> space = parse_space({"search": "grid", "params": {"sampler.alpha": {"type": "grid", "values": [0, 1]}}})
    >>> space.search, space.params["sampler.alpha"].values
    ('grid', [0, 1])
    >>> parse_space({"search": "grid", "params": {"sampler.alpha": {"type": "uniform", "low": 0, "high": 1}}},
    ...             "my_space.yaml")
    Traceback (most recent call last):
    ...
    hbt_ray.tune.space.SpaceError: my_space.yaml: params.sampler.alpha.type: search: grid takes only type: grid parameters
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hbt_ray.config import ConfigError, read_yaml

#: The shipped spaces (``hbt_ray/tune_spaces``, a link to the top-level ``tune_spaces/`` in the repo and a
#: folder of package data once installed): space names resolve there, from any directory.
SPACES_DIR = Path(__file__).resolve().parents[1] / "tune_spaces"
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha")
PARAM_TYPES = ("uniform", "loguniform", "int", "choice", "grid")


class SpaceError(ConfigError):
    """A search-space file is wrong; the message names the file and the key."""


@dataclass
class ParamSpec:
    """One searched parameter: its distribution (``type``) and its range or values."""

    type: str
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    def to_tune(self) -> Any:
        """The Ray Tune domain (``tune.uniform(...)``, ``tune.grid_search([...])``, …)."""
        from ray import tune

        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "int":
            return tune.randint(int(self.low), int(self.high) + 1)
        if self.type == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def corner_values(self) -> list[Any]:
        """The values that bound what a trial can get: ``low`` and ``high``, or every listed value.

        >>> ParamSpec("int", low=1, high=8).corner_values(), ParamSpec("grid", values=[0, 0.5]).corner_values()
        ([1, 8], [0, 0.5])
        """
        if self.values is not None:
            return list(self.values)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


@dataclass
class SearchSpace:
    """A checked space file: the search algorithm, the searched and the fixed training keys."""

    search: str = "grid"
    num_samples: int = 1
    scheduler: str = "none"
    params: dict[str, ParamSpec] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = "<dict>"

    def param_space(self) -> dict[str, Any]:
        """The flat ``{dotted key: tune domain}`` dict for ``Tuner(param_space=...)``."""
        return {key: spec.to_tune() for key, spec in self.params.items()}

    @property
    def swept_keys(self) -> list[str]:
        """The searched dotted keys, in file order."""
        return list(self.params)


def _fail(source: str, key: str, message: str) -> SpaceError:
    return SpaceError(f"{source}: {key}: {message}")


def _number(source: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, key, f"{value!r} is not a finite number")
    return float(value)


def _parse_param(source: str, key: str, raw: Any) -> ParamSpec:
    if not isinstance(raw, dict):
        raise _fail(source, f"params.{key}", f"expected a mapping like {{type: uniform, low: 0, high: 1}}, got {raw!r}")
    unknown = sorted(set(raw) - {"type", "low", "high", "values"})
    if unknown:
        raise _fail(source, f"params.{key}.{unknown[0]}", "unknown field (known: type, low, high, values)")
    ptype = raw.get("type")
    if ptype not in PARAM_TYPES:
        raise _fail(source, f"params.{key}.type", f"{ptype!r} is not one of {list(PARAM_TYPES)}")
    if ptype in ("choice", "grid"):
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            raise _fail(source, f"params.{key}.values", "expected a non-empty list")
        return ParamSpec(ptype, values=values)
    if "low" not in raw or "high" not in raw:
        raise _fail(source, f"params.{key}", f"type {ptype} needs low and high")
    low = _number(source, f"params.{key}.low", raw["low"])
    high = _number(source, f"params.{key}.high", raw["high"])
    if not low < high:
        raise _fail(source, f"params.{key}", f"low ({low}) must be below high ({high})")
    if ptype == "loguniform" and low <= 0:
        raise _fail(source, f"params.{key}.low", "loguniform needs low > 0")
    return ParamSpec(ptype, low=low, high=high)


def parse_space(data: Any, source: str = "<dict>") -> SearchSpace:
    """Check a space given as data (a parsed file); ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: expected a mapping at the top level")
    known = {"search", "num_samples", "scheduler", "params", "fixed", "description"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _fail(source, unknown[0], f"unknown key (known: {', '.join(sorted(known))})")
    search = data.get("search", "grid")
    if search not in SEARCHES:
        raise _fail(source, "search", f"{search!r} is not one of {list(SEARCHES)}")
    scheduler = data.get("scheduler", "none") or "none"
    if scheduler not in SCHEDULERS:
        raise _fail(source, "scheduler", f"{scheduler!r} is not one of {list(SCHEDULERS)}")
    num_samples = data.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise _fail(source, "num_samples", f"{num_samples!r} is not a positive integer")
    params_raw = data.get("params") or {}
    if not isinstance(params_raw, dict) or not params_raw:
        raise _fail(source, "params", "expected a non-empty mapping of dotted config keys")
    params = {str(k): _parse_param(source, str(k), v) for k, v in params_raw.items()}
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _fail(source, "fixed", "expected a mapping of dotted config keys to values")
    clash = sorted(set(params) & set(fixed))
    if clash:
        raise _fail(source, f"fixed.{clash[0]}", "is also searched under params")
    has_grid = any(p.type == "grid" for p in params.values())
    if search == "grid" and not all(p.type == "grid" for p in params.values()):
        bad = next(k for k, p in params.items() if p.type != "grid")
        raise _fail(source, f"params.{bad}.type", "search: grid takes only type: grid parameters")
    if search == "optuna" and has_grid:
        bad = next(k for k, p in params.items() if p.type == "grid")
        raise _fail(source, f"params.{bad}.type", "optuna cannot take grid parameters (use choice)")
    return SearchSpace(
        search=search,
        num_samples=num_samples,
        scheduler=scheduler,
        params=params,
        fixed=dict(fixed),
        description=str(data.get("description", "")),
        source=source,
    )


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: no such search-space file")
    try:
        data = read_yaml(path)
    except ConfigError as err:  # read_yaml's message already names the file
        raise SpaceError(str(err)) from None
    return parse_space(data, str(path))


def resolve_space_path(space: str) -> Path:
    """A space given as a path, or by name (``quick``, ``tune_spaces/quick.yaml``) from the shipped ones::

        >>> shipped = (SPACES_DIR / "quick.yaml").resolve()
        >>> resolve_space_path("quick").resolve() == shipped == resolve_space_path("tune_spaces/quick.yaml").resolve()
        True
    """
    path = Path(space)
    shipped = [SPACES_DIR / f"{space}.yaml"] if path.name == space else []
    if path.parent.name == "tune_spaces" or path.parent == Path("."):
        shipped.append(SPACES_DIR / path.name)
    for candidate in [path, *shipped]:
        if candidate.is_file():
            return candidate
    return path
