"""Every key the run-config schema accepts is read by the code, or is listed in `UNREAD_KEYS` with the reason it
is accepted; a section can never stand for a key (typed access), and `freeze_vit: false` trains the ViT."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from autoparallel.config import SECTIONS, UNREAD_KEYS, ConfigError, RunConfig
from launch.config import load_run_config
from network.lora import LoraArgs

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("network", "placements", "autoparallel", "launch", "ckpt_tools")
CLASSES = {**SECTIONS, "lora": LoraArgs}


def _attribute_reads() -> set[str]:
    """Attribute names read anywhere in the packages, except inside the sections' own `__post_init__` (a range
    check alone does not make a key do anything)."""
    names = {cls.__name__ for cls in CLASSES.values()}
    reads = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            skip = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name in names:
                    for item in node.body:
                        if isinstance(item, ast.FunctionDef) and item.name == "__post_init__":
                            skip |= {id(sub) for sub in ast.walk(item)}
            reads |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and id(n) not in skip}
    return reads


def test_every_schema_key_is_read_or_marked():
    reads = _attribute_reads()
    unread = [f"{section}.{f.name}" for section, cls in CLASSES.items() for f in dataclasses.fields(cls)
              if f.name not in reads and f.name not in UNREAD_KEYS]
    assert unread == [], "keys the schema accepts but no code reads (read them, or mark them in UNREAD_KEYS)"


def test_unread_keys_are_schema_keys():
    keys = {f.name for cls in CLASSES.values() for f in dataclasses.fields(cls)}
    assert set(UNREAD_KEYS) <= keys


def test_sections_never_shadow_keys():
    cfg = load_run_config("lora", "tiny_lora", {"lora": "false"})
    assert cfg.lora.lora is False and not cfg.uses_lora  # the key, not the (always present) section
    assert isinstance(cfg.lora, LoraArgs)
    with pytest.raises(AttributeError):
        cfg.learning_rate  # noqa: B018 - flat access is gone: keys are read through their section


def test_freeze_vit_false_trains_the_vit():
    assert RunConfig.build("sft", [("test", {"freeze_vit": "false"})]).model.trainable().vit
    with pytest.raises(ConfigError, match="nothing would train"):
        RunConfig.build("sft", [("test", {"freeze_llm": "true"})])
