"""Configuration loading: YAML -> environment overrides -> validated `AppConfig`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from configs.errors import UserError
from configs.schema import AppConfig

ENV_PREFIX = "SPADE__"
CONFIG_DIR = Path(__file__).resolve().parent


def builtin(name: str) -> Path:
    """Path of a config shipped with the package ('default', 'stc_paper')."""
    return CONFIG_DIR / f"{name}.yaml"


def resolve_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        return builtin("default")
    p = Path(path)
    if not p.exists() and builtin(str(path)).exists():
        return builtin(str(path))
    return p


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def apply_env(tree: dict, environ: Mapping[str, str]) -> dict:
    """SPADE__DETECTOR__K_GALLERY=5 sets detector.k_gallery; values are parsed as YAML scalars."""
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in key[len(ENV_PREFIX):].split("__") if k]
        if not keys:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_path(tree, keys, value)
    return tree


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"{origin}: {loc}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse(tree: Any, origin: str = "<config>") -> AppConfig:
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{origin}: expected a mapping of sections at the top level, got {type(tree).__name__}")
    try:
        return AppConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(format_validation_error(err, origin)) from None


def load(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Load a YAML config (a path or a built-in name); environment overrides apply on top."""
    p = resolve_path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found (expected a YAML file or one of: default, stc_paper)")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{p}: cannot read config: {err}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{p}: expected a mapping of sections at the top level, got {type(tree).__name__}")
    tree = apply_env(tree, os.environ if environ is None else environ)
    return parse(tree, str(p))


__all__ = ["AppConfig", "UserError", "load", "parse", "builtin"]
