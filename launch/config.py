"""One config system: YAML files of flat PaddleMIX/PaddleNLP-style keys, then `--key value` overrides.

A run's configuration is a set of dataclass sections (model, data, training, parallel, LoRA). Keys are flat
and unique across sections, as in PaddleMIX's shell scripts, so `--learning_rate 1e-5` works whichever
section holds it. Unknown keys and values of the wrong type are errors naming the key and where it came from.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key and its source."""


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _convert(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Coerce a YAML or command-line value to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")) and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} ({source}): must be one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} ({source}): expected a list")
        item = args[0] if args else Any
        return [_convert(v, item, key, source) for v in value]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} ({source}): expected true/false")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} ({source}): expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} ({source}): expected {annotation.__name__}") from None
        if annotation is int:
            if number != int(number):
                raise ConfigError(f"{key}={value!r} ({source}): expected an integer")
            return int(number)
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} ({source}): expected a string")
        return str(value)
    return value


@dataclasses.dataclass
class RunConfig:
    """Named dataclass sections sharing one flat key space."""

    sections: dict[str, Any]

    @classmethod
    def build(cls, section_classes: dict[str, type], sources: list[tuple[str, dict[str, Any]]]) -> "RunConfig":
        """Instantiate every section from (source name, flat dict) layers; later layers win."""
        owner: dict[str, tuple[str, Any]] = {}
        for name, section_cls in section_classes.items():
            for key, annotation in _field_types(section_cls).items():
                if key in owner:
                    raise RuntimeError(f"config key {key!r} defined in two sections")  # programming error
                owner[key] = (name, annotation)
        values: dict[str, dict[str, Any]] = {name: {} for name in section_classes}
        for source, layer in sources:
            for key, raw in layer.items():
                if key not in owner:
                    close = difflib.get_close_matches(key, owner, n=3)
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    raise ConfigError(f"unknown config key {key!r} ({source}){hint}")
                section, annotation = owner[key]
                values[section][key] = _convert(raw, annotation, key, source)
        built = {}
        for name, section_cls in section_classes.items():
            try:
                built[name] = section_cls(**values[name])
            except TypeError as exc:  # a required field without a default
                raise ConfigError(f"section {name}: {exc}") from None
            except ValueError as exc:  # __post_init__ range checks
                raise ConfigError(str(exc)) from None
        return cls(built)

    def __getattr__(self, key: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if key in sections:
            return sections[key]
        for section in sections.values():
            if hasattr(section, key):
                return getattr(section, key)
        raise AttributeError(key)

    def to_flat_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for section in self.sections.values():
            flat.update(dataclasses.asdict(section))
        return flat

    def save_yaml(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_flat_dict(), sort_keys=False))


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped preset (`tiny_sft`, `qwen2vl_2b_sft_auto`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset; presets: {', '.join(names)}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value")
    base = data.pop("base", None)  # presets may extend another preset
    if base is None:
        return data
    merged = read_yaml(resolve_config_path(str(base)))
    merged.update(data)
    return merged


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`--key value` and `--key=value` pairs; a bare `--flag` means true."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: overrides are --key value")
        key = token[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        else:
            value = "true"
        overrides[key] = value
        i += 1
    return overrides


def load_run_config(section_classes: dict[str, type], config: str | None, overrides: dict[str, str],
                    default_config: str) -> RunConfig:
    """YAML (or the default preset) then command-line overrides."""
    path = resolve_config_path(config or default_config)
    return RunConfig.build(section_classes, [(str(path), read_yaml(path)), ("command line", overrides)])
