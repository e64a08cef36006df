"""Incremental detokenization that never emits half a UTF-8 character.

Decoding each new token alone breaks multi-byte characters and word spacing,
so each step decodes a short window of recent tokens twice (with and without
the new ones) and emits the difference, holding it back while the text ends
in U+FFFD (an incomplete byte sequence).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class DetokState:
    prefix_offset: int = 0
    read_offset: int = 0


def detokenize_incrementally(tokenizer, token_ids: list[int], state: DetokState,
                             skip_special_tokens: bool = True) -> str:
    """New text for `token_ids` (a sequence's output tokens) since the last call."""
    prefix = tokenizer.decode(token_ids[state.prefix_offset:state.read_offset],
                              skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(token_ids[state.prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        state.prefix_offset = state.read_offset
        state.read_offset = len(token_ids)
        return full[len(prefix):]
    return ""
