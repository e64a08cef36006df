"""Config dataclasses as command-line flags (as vLLM's `EngineArgs.add_cli_args`).

Every field of `EngineConfig`, `SamplingParams` or the server's `ServerConfig` becomes one
flag named after it (`kv_cache_memory` -> `--kv-cache-memory`), typed from its annotation,
with the help text, choices and unit its field metadata gives (`config.config_field`). A
new field becomes a flag without edits here. A flag's value lands in
`args.<prefix><field>` only when the flag is given, so the dataclass's own default
applies otherwise (`collect` gathers them back into keyword arguments).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any

_UNITS = {"": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'8000000', '8e6', '512MiB', '2GiB', '1.5GB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 8000000, 512MiB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _optional_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


def add_dataclass_flags(group, cls, *, prefix: str, skip: set[str] = frozenset(),
                        defaults: dict[str, Any] | None = None) -> None:
    """One flag per field of `cls` (but `skip`); `defaults` overrides a field's default for
    this command (shown in the help and applied by `collect`)."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for field in dataclasses.fields(cls):
        name = field.name
        if name in skip:
            continue
        meta = field.metadata
        hint = hints[name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        optional = type(None) in args
        base = next((a for a in args if a is not type(None) and typing.get_origin(a) is not list),
                    hint) if args else hint
        listed = next((a for a in (args or (hint,)) if typing.get_origin(a) is list), None)
        help_text = meta.get("help", f"{cls.__name__}.{name}")
        default = defaults.get(name, field.default)
        shown = "" if "[default" in help_text else f" [default: {default}]"
        kw: dict[str, Any] = dict(dest=prefix + name, default=argparse.SUPPRESS, help=help_text + shown)
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif listed is not None and base is str:  # `str | list[str]`: the flag repeats
            kw.update(action="append", metavar="STR")
        elif listed is not None:
            item = typing.get_args(listed)[0]
            kw.update(nargs="+", type=item, metavar="ID" if item is int else "STR")
        elif meta.get("unit") == "bytes":
            kw.update(type=parse_bytes, metavar="BYTES")
        elif base is int:
            kw.update(type=_optional_int if optional else int, metavar="N")
        elif base is float:
            kw.update(type=float, metavar="X")
        else:
            kw.update(type=_optional_str if optional else str, metavar="STR")
        if meta.get("choices"):
            kw.update(choices=meta["choices"], metavar=None)
        group.add_argument(flag_name(name), **kw)


def collect(args: argparse.Namespace, prefix: str, defaults: dict[str, Any] | None = None) -> dict:
    """The keyword arguments given as flags with `prefix` (over `defaults`)."""
    got = dict(defaults or {})
    got.update({k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)})
    return got


def add_model_flag(parser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a Hugging Face model folder or a .gguf file [default: the embedded "
                             "SmolLM2-135M-Instruct]")


def add_engine_flags(parser) -> None:
    """`--model` and every `EngineConfig` field (values in `args.engine.<field>`)."""
    from jpaged.config import EngineConfig
    add_model_flag(parser)
    group = parser.add_argument_group("engine arguments (jpaged.EngineConfig)")
    add_dataclass_flags(group, EngineConfig, prefix="engine.")


def add_sampling_flags(parser, defaults: dict[str, Any] | None = None) -> None:
    """Every `SamplingParams` field but `seed`: on the command line `--seed` is the engine's,
    which makes a run reproducible just as well (values in `args.sampling.<field>`)."""
    from jpaged.sampling_params import SamplingParams
    group = parser.add_argument_group(
        "sampling (jpaged.SamplingParams; a flag left out takes the model's generation config)")
    add_dataclass_flags(group, SamplingParams, prefix="sampling.", skip={"seed"}, defaults=defaults)
