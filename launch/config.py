"""Where a run's configuration comes from: a YAML file or shipped preset (`launch/configs/*.yaml`, which may
extend another with `base:`), then `--key value` overrides. The schema and typing are `autoparallel.config`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autoparallel.config import ConfigError, RunConfig

PRESET_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIGS = {"sft": "tiny_sft", "lora": "tiny_lora"}


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
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)  # before the dash rule: a value keeps its dashes
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        else:
            value = "true"
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


# Launcher options a config file may set as defaults (the command line wins): the demo presets name their process
# count and leave data_parallel_degree to be derived from it, so `--tensor_parallel_degree 2` alone re-lays them.
LAUNCH_DEFAULTS = ("nproc_per_node",)


def load_run_config(command: str, config: str | None, overrides: dict[str, Any]) -> RunConfig:
    """YAML (or the command's default preset) then command-line overrides."""
    path = resolve_config_path(config or DEFAULT_CONFIGS[command])
    data = {k: v for k, v in read_yaml(path).items() if k not in LAUNCH_DEFAULTS}
    return RunConfig.build(command, [(str(path), data), ("command line", overrides)])


def launch_defaults(command: str, config: str | None) -> dict[str, str]:
    """The LAUNCH_DEFAULTS the config file (or the command's default preset) sets."""
    data = read_yaml(resolve_config_path(config or DEFAULT_CONFIGS[command]))
    return {k: str(data[k]) for k in LAUNCH_DEFAULTS if k in data}


def load_resolved(command: str, path: str | Path) -> RunConfig:
    """Worker side: the config the parent resolved and wrote (no further defaults applied)."""
    path = Path(path)
    return RunConfig.build(command, [(str(path), read_yaml(path))])
