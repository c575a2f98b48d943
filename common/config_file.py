"""Recipe files: YAML with `inherit:` chains and dotted `--set` overrides, checked against a dataclass schema.

The mechanics shared by the run config (`pretrain.config.load_config`, all sections), the shard
builder (`data_pipeline.config.load_data_config`, the `data:` section of the same file) and the Slurm
commands. It lives in the bottom package `common/` because every layer reads recipes.

OmegaConf structured configs do the typing and merging; this module adds `inherit:` (parents first,
the child overriding them, paths relative to the file), safe YAML loading (no object construction
from tags), and error messages that name the file, the key and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

INHERIT_KEY = "inherit"  # `inherit: other.yaml` (path relative to the file) or a list of them


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says where and what is allowed."""


Layer = tuple[str, dict]  # (where it came from: a file path or "--set", its nested mapping)


def read_layers(path: str | Path | None, overrides: list[str] | None) -> list[Layer]:
    """The file's `inherit:` ancestors first, then the file, then the `--set` overrides."""
    layers = _read_chain(Path(path), seen=()) if path is not None else []
    if overrides:
        layers.append(("--set", parse_overrides(overrides)))
    return layers


def merge_layers(schema: type, layers: list[Layer], prefix: str = "") -> Any:
    """Check every layer's keys against `schema`, merge them over its defaults, build the dataclass."""
    merged = OmegaConf.structured(schema)
    for origin, data in layers:
        check_keys(data, schema, origin, prefix=prefix)
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as e:
            raise ConfigError(_type_error_message(origin, e, schema, prefix)) from None
    return OmegaConf.to_object(merged)


def _missing_file_message(path: Path, inherited_by: Path | None) -> str:
    """Who names the missing file (an `inherit:`), or which recipes exist (the closest first)."""
    import difflib

    if inherited_by is not None:
        return (f"config file not found: {path}, named by `{INHERIT_KEY}:` in {inherited_by} "
                f"(paths there are relative to {inherited_by.parent})")
    root = next((d for d in (path.parent, Path("configs")) if d.is_dir() and d != Path(".")), None)
    if root is None:
        return f"config file not found: {path}"
    recipes = sorted(str(p) for p in root.rglob("*.yaml"))
    close = difflib.get_close_matches(str(path), recipes, n=3, cutoff=0.5)
    listed = ", ".join(recipes[:40]) + (f" (and {len(recipes) - 40} more)" if len(recipes) > 40 else "")
    return (f"config file not found: {path}"
            + (f"; did you mean {' or '.join(close)}?" if close else "")
            + (f"\nrecipes under {root}: {listed}" if recipes else f"; {root} holds no .yaml recipes"))


def _read_chain(path: Path, seen: tuple[Path, ...], inherited_by: Path | None = None) -> list[Layer]:
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(_missing_file_message(path, inherited_by))
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: `inherit:` forms a cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}  # safe_load: no object construction from tags
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    parents = data.pop(INHERIT_KEY, None)
    if isinstance(parents, str):
        parents = [parents]
    if parents is not None and not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise ConfigError(f"{path}: `{INHERIT_KEY}:` must be a file name or a list of file names")
    layers: list[Layer] = []
    for parent in parents or []:
        layers.extend(_read_chain(path.parent / parent, seen=(*seen, resolved), inherited_by=path))
    layers.append((str(path), data))
    return layers


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=c` items into a nested dict; values are parsed as YAML scalars (3e-4, true, [1, 2])."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # PyYAML reads 3e-4 (no dot) as a string; numbers are what users mean there.
        if isinstance(value, str) and any(c in value for c in "eE."):
            try:
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def section_type(schema: type, name: str) -> type | None:
    """The dataclass of a nested section `name` of `schema`, or None for a plain value."""
    for f in dataclasses.fields(schema):
        if f.name == name and f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
            f.default_factory
        ):
            return f.default_factory  # type: ignore[return-value]
    return None


def all_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (used for suggestions and docs)."""
    keys = []
    for f in dataclasses.fields(schema):
        sub = section_type(schema, f.name)
        keys.extend(all_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"])
    return keys


def check_keys(data: dict, schema: type, origin: str, prefix: str = "", root: type | None = None,
               root_prefix: str | None = None) -> None:
    """Every key must exist in the schema; otherwise name it and the closest valid key."""
    root = root or schema
    root_prefix = prefix if root_prefix is None else root_prefix
    fields = [f.name for f in dataclasses.fields(schema)]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(_unknown_key_message(origin, dotted, prefix, fields, all_keys(root, root_prefix)))
        sub = section_type(schema, key)
        if sub is None or value is None:
            continue
        if not isinstance(value, dict):
            names = [f.name for f in dataclasses.fields(sub)]
            raise ConfigError(
                f"{origin}: `{dotted}` is a section ({', '.join(names)}), not a single value; "
                f"set one of its keys, e.g. {dotted}.{names[0]}=..."
            )
        check_keys(value, sub, origin, f"{dotted}.", root, root_prefix)


def _unknown_key_message(origin: str, dotted: str, prefix: str, siblings: list[str], every_key: list[str]) -> str:
    leaf = dotted.rsplit(".", 1)[-1]
    # A key put in the wrong section (`n_layers` at the top) is found by its leaf name anywhere;
    # otherwise the closest sibling in the same section is the likely typo.
    same_leaf = [k for k in every_key if k.rsplit(".", 1)[-1] == leaf]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.0)
    suggestion = same_leaf[0] if same_leaf else f"{prefix}{close[0]}" if close else None
    msg = f"{origin}: unknown key `{dotted}`"
    if suggestion:
        msg += f"; the closest valid key is `{suggestion}`"
    section = prefix.rstrip(".") or "the top level"
    return msg + f". Valid keys in {section}: {', '.join(siblings)}"


def _type_error_message(origin: str, e: OmegaConfBaseException, schema: type, prefix: str) -> str:
    key = getattr(e, "full_key", None) or "?"
    value = getattr(e, "value", None)
    text = str(e).splitlines()[0]
    return f"{origin}: `{prefix}{key}` = {value!r} has the wrong type ({text}); expected {_field_type(schema, key)}"


def _field_type(schema: Any, dotted: str) -> str:
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(schema):
            return "?"
        match = [f for f in dataclasses.fields(schema) if f.name == part]
        if not match:
            return "?"
        schema = section_type(schema, part) or match[0].type
    return schema if isinstance(schema, str) else getattr(schema, "__name__", str(schema))
