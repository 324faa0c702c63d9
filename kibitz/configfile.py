"""A config as a JSON file: `config.json` in every run folder and inside every checkpoint, read back by
`--config FILE` and by the tools. Reading checks every value against its field's type and names the field."""

import dataclasses
import functools
import json
import subprocess
import types
import typing
from pathlib import Path

from config import ConfigError


def to_dict(cfg) -> dict:
    """A JSON-ready dict (paths as strings)."""

    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):  # JSON has lists only: the same text in config.json and a tracker
            return [plain(v) for v in value]
        return value

    return {
        k: (to_dict(v) if dataclasses.is_dataclass(v) else plain(v))
        for k, v in ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg))
    }


def fits(value, hint) -> bool:
    """Does a value read from a JSON config have the field's type? (An int is a float; a list, a tuple.)"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(fits(v, args[0]) for v in value[: None if args else 0])
    return True


RENAMED = {"checkpoint.monitor": "rank_by"}  # renamed on 2026-12-06: "monitor" now names the monitoring only


def from_dict(cls, values: dict, where: str = ""):
    """Rebuild a config dataclass from `to_dict` output, naming any unknown key or value of the wrong type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a section (a JSON object), got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        key = RENAMED.get(f"{where}{key}", key)  # a config saved before the field's new name
        if key not in names:
            raise ConfigError(f"{where}{key}: unknown config field (expected one of {', '.join(sorted(names))})")
        hint = hints[key]
        if typing.get_origin(hint) is tuple and isinstance(value, str):
            value = [value]  # a config saved when the field held one value (log.logger, until 2026-12-06)
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{where}{key}.")
            continue
        if not fits(value, hint):
            raise ConfigError(f"{where}{key}: expected {describe(hint)}, got {value!r}")
        if value is not None and _mentions_path(hint):
            kwargs[key] = [Path(v) for v in value] if isinstance(value, list) else Path(value)
        elif typing.get_origin(hint) is tuple:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def describe(hint) -> str:
    """A field's type in words, for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin in (list, tuple):
        return f"a list of {describe(args[0])}" if args else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path string"}
    return "null" if hint is type(None) else names.get(hint, getattr(hint, "__name__", str(hint)))


def _mentions_path(hint) -> bool:
    if hint is Path:
        return True
    return (
        any(_mentions_path(arg) for arg in typing.get_args(hint))
        if isinstance(hint, (types.UnionType, types.GenericAlias)) or typing.get_origin(hint)
        else False
    )


def load_json(path: Path, cls, task: str):
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text (binary bytes)
        raise ConfigError(f"--config {path}: cannot read a JSON config ({exc})") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply to be a config") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of config sections, got {type(values).__name__}")
    if values.get("task", task) != task:  # before the fields: another task's sections would be "unknown fields"
        raise ConfigError(f"--config {path}: a config of the {values['task']!r} task, expected {task!r}")
    values.pop("code", None)  # the commit of the code that ran it: a record, not a setting
    values.pop("resume", None)  # a saved config describes a run, not how it was started
    values.pop("init_from", None)
    return from_dict(cls, values)


def save_json(cfg, path: Path, code: dict | None = None) -> None:
    """The config as JSON; `code`: the commit of the code that ran it, kept beside the sections (--config skips it)."""
    from kibitz.storage import write_atomic

    write_atomic(path, json.dumps({**to_dict(cfg), **({"code": code} if code else {})}, indent=2) + "\n")


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The git commit of the trainer's code and whether its tracked files differed from it (Nones outside a git
    checkout): recorded in config.json and every checkpoint, so a result names the code that made it."""
    here = Path(__file__).resolve().parent
    try:
        commit, status = (
            subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
            for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])
        )
    except (OSError, subprocess.SubprocessError):  # no git, or a hung one
        return {"commit": None, "dirty": None}
    if commit.returncode or status.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
