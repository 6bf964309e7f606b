"""Configuration loading: YAML -> environment overrides -> validated `AppConfig`."""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
import stat
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

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


def apply_env(tree: dict, environ: Mapping[str, str], origins: dict | None = None) -> dict:
    """SPADE__DETECTOR__K_GALLERY=5 sets detector.k_gallery; values are parsed as YAML scalars.

    `origins`, when given, receives {("detector", "k_gallery"): "SPADE__DETECTOR__K_GALLERY", ...}: which
    variable set which config path, so an error in that value names the variable, not the file."""
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in key[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_path(tree, keys, value)
        if origins is not None:
            origins[tuple(keys)] = key
    return tree


# scheme://user:password@ -> scheme://***@ : a rejected URL is echoed without its credentials.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/?#@]*(?:@[^\s/?#@]*)*@")


def _one_line(text: str) -> str:
    """`text` with control characters (line breaks above all) escaped: one error, one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _loc_part(part) -> str:
    return part if isinstance(part, str) and part and part.isprintable() and "." not in part else repr(part)


def _is_model(t: Any) -> bool:
    try:  # list[...] is an instance of `type` on some Pythons, and issubclass refuses it
        return isinstance(t, type) and issubclass(t, BaseModel)
    except TypeError:
        return False


def _model_at(loc) -> type[BaseModel] | None:
    """The pydantic model that holds the field at `loc` (a path of keys and list indices), if any."""
    model: Any = AppConfig
    for part in loc:
        if isinstance(part, int):
            continue  # a list item: the list's item model was taken with the list field
        if not _is_model(model) or part not in model.model_fields:
            return None
        ann, model = model.model_fields[part].annotation, None
        todo = [ann]
        while todo:  # Optional[...], list[...], unions: the first model inside
            t = todo.pop(0)
            if _is_model(t):
                model = t
                break
            todo.extend(typing.get_args(t))
        if model is None:
            return None
    return model if _is_model(model) else None


def _not_a_setting(loc: tuple, dotted: str, from_env: bool) -> str:
    """`dotted` is not a field: say so, with the nearest real field name (difflib) or the choices."""
    parent = ".".join(str(p) for p in loc[:-1])
    model = _model_at(loc[:-1])
    fields = list(model.model_fields) if model is not None else []
    name = str(loc[-1])
    close = difflib.get_close_matches(name.lower(), fields, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    elif fields and len(fields) <= 12:
        hint = f"settings{' of ' + parent if parent else ''}: {', '.join(fields)}"
    elif model is not None:
        hint = f"see {model.__name__} in configs/schema.py for the settings{' of ' + parent if parent else ''}"
    else:
        hint = "see configs/schema.py"
    fix = "fix the variable's name or unset it" if from_env else "remove it or fix its name"
    return f"{dotted} is not a setting ({hint}); {fix}"


def _has_path(tree: Any, loc: tuple) -> bool:
    node = tree
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        else:
            return False
    return True


def _origin_of(loc: tuple, origin: str, env: Mapping[tuple, str] | None, file_tree: Any) -> tuple[str, bool]:
    """(where the value at `loc` came from, whether that is an environment variable alone)."""
    if not env:
        return origin, False
    above = [p for p in env if tuple(loc[: len(p)]) == p]
    if above:  # the variable set this value, or a section holding it
        return f"environment variable {env[max(above, key=len)]}", True
    below = sorted(env[p] for p in env if tuple(p[: len(loc)]) == tuple(loc))
    if below:  # variables set values inside this section
        names = ", ".join(below)
        plural = "s" if len(below) > 1 else ""
        if file_tree is not None and not _has_path(file_tree, tuple(loc)):
            return f"environment variable{plural} {names}", True
        return f"{origin} (with environment variable{plural} {names})", False
    return origin, False


def format_validation_error(
    err: ValidationError, origin: str, env: Mapping[tuple, str] | None = None, file_tree: Any = None
) -> str:
    """One line per problem, each naming where the value came from: `origin` (the file), or the
    SPADE__... variable that set it (`env`: config path -> variable, from `apply_env`; `file_tree`: the
    file's own tree, before the variables)."""
    lines = []
    for e in err.errors():
        loc = ".".join(_loc_part(p) if not isinstance(p, int) else str(p) for p in e["loc"]) or "<root>"
        where, from_env = _origin_of(tuple(e["loc"]), origin, env, file_tree)
        if e.get("type") == "extra_forbidden" and e["loc"]:
            lines.append(_one_line(f"{where}: {_not_a_setting(tuple(e['loc']), loc, from_env)}"))
            continue
        got = e.get("input")
        got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        if len(got_s) > 200:
            got_s = got_s[:200] + "...)"
        got_s = _USERINFO.sub(r"\1***@", got_s)
        fix = "; fix or unset the variable" if from_env else ""
        lines.append(_one_line(f"{where}: {loc}: {e['msg']}{got_s}{fix}"))
    return "\n".join(lines)


def parse(
    tree: Any, origin: str = "<config>", env: Mapping[tuple, str] | None = None, file_tree: Any = None
) -> AppConfig:
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{origin}: expected a mapping of sections at the top level, got {type(tree).__name__}")
    try:
        return AppConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(format_validation_error(err, origin, env, file_tree)) from None


def load(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Load a YAML config (a path or a built-in name); environment overrides apply on top."""
    p = resolve_path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found (expected a YAML file or one of: default, stc_paper)")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{p}: not valid YAML: {(str(err).splitlines() or [type(err).__name__])[0]}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{p}: cannot read config: {err}") from None
    except (ValueError, OverflowError, RecursionError, TypeError) as err:
        # PyYAML's resolvers raise plain ValueErrors, e.g. for a date like 2001-13-45
        raise UserError(f"{p}: not valid YAML: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{p}: expected a mapping of sections at the top level, got {type(tree).__name__}")
    file_tree = copy.deepcopy(tree)
    origins: dict[tuple, str] = {}
    tree = apply_env(tree, os.environ if environ is None else environ, origins)
    return parse(tree, str(p), origins, file_tree)


_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


def load_secrets(path: str | os.PathLike, environ: dict | None = None) -> list[str]:
    """Read a `.env`-style secrets file once: `NAME=value` per line (`export ` prefix, blank lines and
    `#` comments allowed; a value may be wrapped in single or double quotes, taken literally).

    The names are added to `environ` (default `os.environ`) unless already set there (the real
    environment wins), so every `*_env` config field can name them. Returns the names, never the values.

    A world-readable file is refused (UserError); a group-readable one is accepted with a warning.
    """
    p = Path(path).expanduser()
    where = f"pipeline.secrets_file: {p}"
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: cannot read ({type(err).__name__})") from None
    if mode & stat.S_IROTH:
        raise UserError(f"{where}: readable by every user (mode {stat.S_IMODE(mode):o}); run: chmod 600 {p}")
    if mode & stat.S_IRGRP:
        logging.getLogger(__name__).warning(
            "%s: readable by its group (mode %o); chmod 600 is safer", p, stat.S_IMODE(mode)
        )
    env = os.environ if environ is None else environ
    names = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _ENV_LINE.match(line)
        if m is None:  # never echo the line: it may be a secret
            raise UserError(f"{where}: line {n}: expected NAME=value")
        name, value = m.group(1), m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env.setdefault(name, value)
        names.append(name)
    return names


__all__ = ["AppConfig", "UserError", "load", "load_secrets", "parse", "builtin"]
