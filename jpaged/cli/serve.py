"""`jpaged serve`: the OpenAI-compatible server (`ServerConfig` and `EngineConfig` flags)."""
from __future__ import annotations

import os
import sys

from jpaged.arg_utils import add_dataclass_flags, add_engine_flags, collect
from jpaged.entrypoints.openai.config import ServerConfig


def add_arguments(parser) -> None:
    group = parser.add_argument_group("server (jpaged.entrypoints.openai.config.ServerConfig)")
    add_dataclass_flags(group, ServerConfig, prefix="server.",
                        defaults={"api_key": os.environ.get("JPAGED_API_KEY")})
    add_engine_flags(parser)


def main(args) -> int:
    from jpaged.entrypoints.openai.launcher import serve
    from jpaged.exceptions import EngineDeadError
    server = collect(args, "server.", {"api_key": os.environ.get("JPAGED_API_KEY")})
    try:
        serve(args.model, **server, **collect(args, "engine."))
    except EngineDeadError as e:
        print(f"jpaged serve: error: {e}", file=sys.stderr)
        return 1
    return 0
