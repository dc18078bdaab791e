"""Search-space files: config keys mapped to distributions, checked against the config, narrowed between stages.

A search-space file is YAML mapping a key of the ``fit`` config to one distribution::

    model.init_args.lr: {log_uniform: [1.0e-4, 1.0e-1]}
    model.init_args.weight_decay: {choice: [0, 1.0e-5, 1.0e-4]}
    data.init_args.batch_size: {choice: [32, 64, 128]}
    model.init_args.momentum: {uniform: [0.8, 0.99]}
    trainer.callbacks.Cutout.length: {int: [2, 6]}

Keys are dotted paths into the complete config (what ``lightning-tricks fit --print_config`` shows);
``init_args`` may be left out (``model.lr``), and a callback is named by its class name
(``trainer.callbacks.Cutout.length`` or ``callbacks.Cutout.length``). Distributions: ``log_uniform``
and ``uniform`` (floats), ``int`` and ``log_int`` (integers, bounds included), ``choice`` (any values).
The lectures' advice is built in: sample learning rates and regularization strengths on a log scale.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_tricks.core.validation import ConfigError

KINDS = ("log_uniform", "uniform", "int", "log_int", "choice")
"""The distribution names a search-space file may use."""


@dataclass(frozen=True)
class Distribution:
    """One hyperparameter's range: ``kind`` is one of :data:`KINDS`; ``low``/``high`` or ``choices``."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    @property
    def log(self) -> bool:
        return self.kind in ("log_uniform", "log_int")

    @property
    def numeric(self) -> bool:
        return self.kind != "choice"

    def to_yaml(self) -> dict[str, list[Any]]:
        if self.kind == "choice":
            return {"choice": list(self.choices)}
        bounds = [int(self.low), int(self.high)] if self.kind in ("int", "log_int") else [self.low, self.high]
        return {self.kind: bounds}

    def describe(self) -> str:
        if self.kind == "choice":
            return "{" + ", ".join(map(repr, self.choices)) + "}"
        fmt = "{:d}" if self.kind in ("int", "log_int") else "{:.3g}"
        return f"[{fmt.format(type_cast(self, self.low))}, {fmt.format(type_cast(self, self.high))}]" + \
            (" log" if self.log else "")

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw a value through an Optuna ``trial`` (``suggest_float``/``suggest_int``/``suggest_categorical``)."""
        if self.kind in ("log_uniform", "uniform"):
            return trial.suggest_float(name, self.low, self.high, log=self.log)
        if self.kind in ("int", "log_int"):
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(name, list(self.choices))


def type_cast(dist: Distribution, value: float) -> Any:
    return int(round(value)) if dist.kind in ("int", "log_int") else float(value)


def parse_distribution(key: str, spec: Any) -> Distribution:
    """One distribution from its YAML form, e.g. ``{log_uniform: [1e-4, 1e-1]}``.

    Raises:
        ConfigError: an unknown kind, bounds that are not two numbers with low < high (> 0 on a log
            scale), or an empty choice list; the message names the key.
    """
    example = "e.g. {log_uniform: [1.0e-4, 1.0e-1]}, {uniform: [0.1, 0.9]}, {int: [2, 8]}, {choice: [32, 64]}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"search space key `{key}`: {spec!r} is not a distribution: expected one of "
                          f"{', '.join(KINDS)} with its values, {example}.")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"search space key `{key}`: unknown distribution {kind!r}{hint}; expected one of "
                          f"{', '.join(KINDS)}.")
    if kind == "choice":
        if not isinstance(values, Sequence) or isinstance(values, str) or not values:
            raise ConfigError(f"search space key `{key}`: `choice` needs a non-empty list of values, got {values!r}.")
        if any(isinstance(v, (Mapping, list)) for v in values):
            raise ConfigError(f"search space key `{key}`: `choice` values must be numbers, strings, booleans "
                              f"or null, got {values!r}.")
        return Distribution("choice", choices=tuple(values))
    ok = (isinstance(values, Sequence) and not isinstance(values, str) and len(values) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))
    if not ok:
        raise ConfigError(f"search space key `{key}`: `{kind}` needs [low, high] (two finite numbers), got {values!r}.")
    low, high = float(values[0]), float(values[1])
    if kind in ("int", "log_int") and not all(float(v).is_integer() for v in values):
        raise ConfigError(f"search space key `{key}`: `{kind}` bounds must be integers, got {values!r}.")
    if not low < high:
        raise ConfigError(f"search space key `{key}`: `{kind}` needs low < high, got {values!r}.")
    if kind.startswith("log") and low <= 0:
        raise ConfigError(f"search space key `{key}`: `{kind}` needs low > 0 (a log scale), got {values!r}; "
                          "use `choice` to include 0.")
    return Distribution(kind, low, high)


@dataclass(frozen=True)
class SearchSpace:
    """Resolved config paths (tuples of keys; a callback is ``("trainer", "callbacks", Name, arg)``) -> distributions.

    ``names`` keeps the keys as the user wrote them: they are the Optuna parameter names.
    """

    params: dict[str, Distribution]
    paths: dict[str, tuple[str, ...]]

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def to_yaml(self) -> dict[str, Any]:
        return {name: dist.to_yaml() for name, dist in self.params.items()}

    def with_params(self, params: Mapping[str, Distribution]) -> SearchSpace:
        return SearchSpace(dict(params), self.paths)


def load_search_space(source: str | Path | Mapping[str, Any]) -> dict[str, Distribution]:
    """Parse a search-space YAML file (or an already-loaded mapping) into name -> :class:`Distribution`.

    Raises:
        ConfigError: a missing or unreadable file, something other than a mapping, an empty space or a
            malformed distribution.
    """
    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"search space file {str(path)!r} does not exist.")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"search space file {str(path)!r} is not valid YAML: "
                              f"{str(err).splitlines()[0]}") from None
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"the search space must map config keys to distributions, e.g. "
                          f"`model.init_args.lr: {{log_uniform: [1.0e-4, 1.0e-1]}}`; got {data!r}.")
    return {str(k): parse_distribution(str(k), v) for k, v in data.items()}


# -- config paths ---------------------------------------------------------------------------------
def _callback_name(entry: Any) -> str | None:
    if isinstance(entry, Mapping) and isinstance(entry.get("class_path"), str):
        return entry["class_path"].rsplit(".", 1)[-1]
    return None


def config_keys(config: Mapping[str, Any]) -> list[str]:
    """Every settable dotted key of a complete config (callbacks by class name), for error messages."""
    keys: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, list) and prefix.endswith("callbacks"):
            for entry in node:
                name = _callback_name(entry)
                if name is not None:
                    walk(entry.get("init_args") or {}, f"{prefix}.{name}")
        else:
            keys.append(prefix)

    walk(config, "")
    return keys


def _callback_entry(config: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    matches = [c for c in callbacks if _callback_name(c) == name]
    return matches[0] if len(matches) == 1 else None


def resolve_key(config: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """The config path a search-space key denotes, or a ConfigError naming the valid keys nearby."""
    parts = tuple(key.split("."))
    if parts[0] == "callbacks":
        parts = ("trainer", *parts)
    if len(parts) >= 4 and parts[:2] == ("trainer", "callbacks"):
        entry = _callback_entry(config, parts[2])
        rest = parts[3:] if parts[3] != "init_args" else parts[4:]
        if entry is not None and len(rest) == 1 and rest[0] in (entry.get("init_args") or {}):
            return ("trainer", "callbacks", parts[2], rest[0])
    else:
        for candidate in (parts, (parts[0], "init_args", *parts[1:])):
            node: Any = config
            for p in candidate:
                node = node.get(p, _MISSING) if isinstance(node, Mapping) else _MISSING
            if node is not _MISSING and not isinstance(node, Mapping):
                return candidate
    valid = config_keys(config)
    close = difflib.get_close_matches(key, valid, n=4, cutoff=0.6)
    if not close:
        head = key.split(".")[0]
        close = [k for k in valid if k.startswith(head)][:6] or valid[:6]
    raise ConfigError(f"search space key `{key}` is not in the config; valid keys nearby: {', '.join(close)}"
                      " (a callback argument is trainer.callbacks.<ClassName>.<argument>).")


_MISSING = object()


def resolve_space(config: Mapping[str, Any], params: Mapping[str, Distribution]) -> SearchSpace:
    """Check every key against ``config`` (a complete config dict) and return the resolved space."""
    paths = {name: resolve_key(config, name) for name in params}
    return SearchSpace(dict(params), paths)


def apply_params(config: Mapping[str, Any], space: SearchSpace, values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``config`` with each parameter's value written at its path."""
    out = copy.deepcopy(dict(config))
    for name, value in values.items():
        path = space.paths[name]
        if path[:2] == ("trainer", "callbacks") and len(path) == 4:
            entry = _callback_entry(out, path[2])
            assert entry is not None  # resolve_key found it
            entry.setdefault("init_args", {})[path[3]] = value  # type: ignore[index]
            continue
        node = out
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return out


# -- coarse to fine -------------------------------------------------------------------------------
def narrow(dist: Distribution, best_values: Sequence[Any], margin: float = 0.25, min_width: float = 0.05
           ) -> Distribution:
    """The range of ``dist`` narrowed around ``best_values`` (the best trials' values), inside ``dist``.

    Numeric: the span of the best values, widened by ``margin`` of that span on each side (at least
    ``min_width`` of the original width), measured in log space for log distributions, clipped to the
    original range. Choice: unchanged (Optuna keeps one set of choices per parameter in a study; a
    later stage still samples every choice, at random).

    Examples:
        >>> d = narrow(Distribution("log_uniform", 1e-4, 1e-1), [1e-2, 4e-2])
        >>> round(d.low, 4), round(d.high, 4)
        (0.0071, 0.0566)
    """
    if not best_values:
        return dist
    if dist.kind == "choice":
        return dist
    fwd = math.log if dist.log else float
    inv = math.exp if dist.log else float
    lo_full, hi_full = fwd(dist.low), fwd(dist.high)
    values = [fwd(float(v)) for v in best_values]
    lo, hi = min(values), max(values)
    pad = max(margin * (hi - lo), min_width * (hi_full - lo_full))
    low, high = max(lo_full, lo - pad), min(hi_full, hi + pad)
    # a clipped bound is the original one exactly (exp(log(x)) is not always x)
    low_v = dist.low if low <= lo_full else inv(low)
    high_v = dist.high if high >= hi_full else inv(high)
    if dist.kind in ("int", "log_int"):
        low_v, high_v = math.floor(low_v + 1e-9), math.ceil(high_v - 1e-9)
        low_v, high_v = max(low_v, dist.low), min(high_v, dist.high)
        if low_v >= high_v:  # one integer left: keep a range of two for Optuna
            low_v, high_v = (low_v, low_v + 1) if low_v + 1 <= dist.high else (low_v - 1, low_v)
    else:
        low_v, high_v = max(low_v, dist.low), min(high_v, dist.high)
    return Distribution(dist.kind, float(low_v), float(high_v))


def grid_values(dist: Distribution, points: int) -> list[Any]:
    """``points`` evenly spaced values of ``dist`` (log-spaced for log distributions); all choices for ``choice``."""
    if dist.kind == "choice":
        return list(dist.choices)
    if points == 1:
        centre = math.sqrt(dist.low * dist.high) if dist.log else (dist.low + dist.high) / 2
        return [type_cast(dist, centre)]
    fwd = math.log if dist.log else float
    inv = math.exp if dist.log else float
    lo, hi = fwd(dist.low), fwd(dist.high)
    inner = [inv(lo + (hi - lo) * i / (points - 1)) for i in range(1, points - 1)]
    values = [type_cast(dist, v) for v in (dist.low, *inner, dist.high)]  # exact ends: exp(log(x)) is not x
    return list(dict.fromkeys(values))


__all__ = ["KINDS", "Distribution", "SearchSpace", "apply_params", "config_keys", "grid_values",
           "load_search_space", "narrow", "parse_distribution", "resolve_key", "resolve_space"]
