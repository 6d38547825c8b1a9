"""YAML configuration: load, validate against the stages' typed declarations, dump, check.

Every error names the file and the key path (``engine.pe_lanes``, ``recipe.modifiers[1].bits``) and,
for an unknown key, suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from bitstream.params import BuildParams
from hw.params import AccelParams, EngineParams, TargetParams
from quant.recipe import MODIFIERS, ModelConfig, Prune, QuantizeWeights, Recipe
from sim.params import SimParams

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


class ConfigError(ValueError):
    """A configuration problem: where (file and key path) and what to do."""

    def __init__(self, where: str, key: str, message: str):
        self.where, self.key, self.message = where, key, message
        loc = f"{where}: " if where else ""
        super().__init__(f"{loc}{key or '<top>'}: {message}")


DEFAULT_RECIPE = "w2a8kv4"  # the product's default: AccLLM's recipe, defined once in configs/recipes/


def _default_recipe() -> Recipe:
    return load_recipe(DEFAULT_RECIPE)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: Recipe = field(default_factory=_default_recipe)
    engine: EngineParams = field(default_factory=EngineParams)
    accelerator: AccelParams = field(default_factory=AccelParams)
    target: TargetParams = field(default_factory=TargetParams)
    simulation: SimParams = field(default_factory=SimParams)
    build: BuildParams = field(default_factory=BuildParams)

    def problems(self) -> list[tuple[str, str]]:
        """Checks that span sections: combinations the engine cannot run."""
        out = []
        qw = self.recipe.get(QuantizeWeights)
        lanes = self.engine.pe_lanes
        if qw is not None:
            idx = self.recipe.modifiers.index(qw)
            if qw.group_size % lanes:
                out.append((f"recipe.modifiers[{idx}].quantize_weights.group_size",
                            f"{qw.group_size} is not a multiple of engine.pe_lanes = {lanes}: a "
                            f"group's scale is applied once per row after whole beats"))
            if self.recipe.get(Prune) is not None and qw.group_size % (2 * lanes):
                out.append((f"recipe.modifiers[{idx}].quantize_weights.group_size",
                            f"with 2:4 pruning a group of {qw.group_size} inputs has "
                            f"{qw.group_size // 2} kept weights, not a multiple of "
                            f"engine.pe_lanes = {lanes}"))
        return out


# ---------------------------------------------------------------------------------------------------
# generic (de)serialisation driven by dataclass declarations
# ---------------------------------------------------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, valid) -> str:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown key {key!r}{hint} Valid keys: {', '.join(valid)}"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        return _build(tp, value, path, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if all(is_dataclass(a) for a in args):  # a tagged modifier: {name: {...}}
            names = {n: c for n, c in MODIFIERS.items() if c in args}
            if isinstance(value, str) and value in names:
                value = {value: {}}
            if not isinstance(value, dict) or len(value) != 1:
                raise ConfigError(where, path, f"expected a single-key mapping naming one of: "
                                               f"{', '.join(names)}")
            (name, body), = value.items()
            if name not in names:
                raise ConfigError(where, path, _suggest(str(name), names))
            return _build(names[name], body or {}, f"{path}.{name}", where)
        if type(None) in args and value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(where, path, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, path, f"expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = typing.get_args(tp)
        return {_convert(k, kt, path, where): _convert(v, vt, f"{path}.{k}", where)
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, path, f"expected a string, got {value!r}")
        return value
    raise ConfigError(where, path, f"unsupported type {_type_name(tp)}")  # pragma: no cover


def _check_range(f: dataclasses.Field, value: Any, path: str, where: str) -> None:
    meta = f.metadata
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(where, path, f"{value!r} is not one of {list(choices)}")
    if lo is not None and value < lo:
        raise ConfigError(where, path, f"{value} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(where, path, f"{value} is above the maximum {hi}")


def _build(cls, data: Any, path: str, where: str, cross: bool = True):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where, path, f"expected a mapping for {cls.__name__}, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(where, sub, _suggest(str(key), names))
        f = next(f for f in fields(cls) if f.name == key)
        kwargs[key] = _convert(value, hints[key], sub, where)
        _check_range(f, kwargs[key], sub, where)
    obj = cls(**kwargs)
    if hasattr(obj, "problems") and (cross or cls is not Config):
        for key, message in obj.problems():
            raise ConfigError(where, f"{path}.{key}" if path else key, message)
    return obj


def to_plain(obj: Any) -> Any:
    """Config object -> plain YAML-able data (modifiers as single-key mappings)."""
    if is_dataclass(obj):
        out = {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
        tag = next((n for n, c in MODIFIERS.items() if type(obj) is c), None)
        return {tag: out} if tag else out
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def from_data(data: Any, where: str = "", cross: bool = True) -> Config:
    """Validate plain data into a Config; ``cross=False`` skips the checks across sections."""
    return _build(Config, data, "", where, cross)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def read_yaml(path: Path | str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), "", "file not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(p), "", f"malformed YAML: {at}{getattr(e, 'problem', e)}") from None


def load(*paths: Path | str, overrides: dict | None = None) -> Config:
    """Load and merge YAML files in order (later wins, section by section) onto the defaults."""
    data: dict = {}
    where = ""
    for p in paths:
        d = read_yaml(p)
        if not isinstance(d, dict):
            raise ConfigError(str(p), "", "the top level must be a mapping of sections")
        where = str(p)
        from_data(d, where, cross=False)  # each file alone, so errors name the right file
        data = _merge(data, d)
    if overrides:
        data = _merge(data, overrides)
    # checks across sections run on the merged result, naming every file that contributed
    return from_data(data, where if len(paths) == 1 else " + ".join(map(str, paths)))


def dump(cfg: Config | None = None) -> str:
    return yaml.safe_dump(to_plain(cfg or Config()), sort_keys=False)


def resolve_named(kind: str, name_or_path: str) -> Path:
    """A built-in name (``w2a8kv4``, ``ci-small``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(str(p), "", "file not found")
        return p
    builtin = CONFIGS / kind / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    names = sorted(q.stem for q in (CONFIGS / kind).glob("*.yaml"))
    near = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ConfigError("", kind, f"no built-in {kind[:-1] if kind.endswith('s') else kind} "
                                f"{name_or_path!r}{hint} Built-in: {', '.join(names)}; or give a YAML path")


def load_recipe(name_or_path: str) -> Recipe:
    return load(resolve_named("recipes", name_or_path)).recipe


def load_hw(name_or_path: str) -> Config:
    return load(resolve_named("hw", name_or_path))
