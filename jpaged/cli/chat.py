"""`jpaged chat`: an interactive chat that streams each reply as it is generated.

Each line of stdin is a user message; the conversation is kept (its oldest exchanges are
dropped when it no longer fits max_model_len). `/reset` clears it; `/exit` or end of input
quits.
"""
from __future__ import annotations

import sys

from jpaged.arg_utils import add_engine_flags, add_sampling_flags, collect
from jpaged.exceptions import ContextLengthExceededError
from jpaged.sampling_params import SamplingParams

from .generate import load_llm, sampling_params

CHAT_DEFAULTS = {"max_tokens": 512}


def add_arguments(parser) -> None:
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--quiet", action="store_true", help="no load message on stderr")
    add_engine_flags(parser)
    add_sampling_flags(parser, CHAT_DEFAULTS)


def stream_request(llm, prompt, params: SamplingParams, out=None):
    """Queue one request and step the engine until it finishes, writing its text to
    `out` as it grows. Text that could still turn out to be the start of a stop string
    is held back until it cannot. Returns the final RequestOutput."""
    out = out or sys.stdout
    request_id = llm.add_request(prompt, params)
    holdback = max((len(s) for s in params.stop), default=1) - 1
    printed = 0
    try:
        while True:
            for o in llm.step():
                if o.request_id != request_id:
                    continue
                text = o.outputs[0].text
                end = len(text) if o.finished else len(text) - holdback
                if end > printed:
                    out.write(text[printed:end])
                    out.flush()
                    printed = end
                if o.finished:
                    return o
            if request_id not in llm.requests:
                raise RuntimeError(f"request {request_id} left the engine without finishing")
    except BaseException:
        llm.abort_request(request_id)
        raise


def fit_history(llm, messages: list[dict]) -> list[int] | None:
    """Token ids of the conversation, dropping its oldest exchanges until the prompt
    fits max_model_len; None if even the last user message alone does not fit."""
    while True:
        ids = llm.input_processor.render_chat(messages)
        try:
            llm.input_processor.check_prompt_length(len(ids))
            return ids
        except ContextLengthExceededError:
            pass
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            return None
        del messages[first:first + 2]  # the oldest user message and its reply
        print("[history too long for max_model_len: dropped the oldest exchange]",
              file=sys.stderr, flush=True)


def chat_loop(llm, params: SamplingParams, system: str | None = None, stdin=None, stdout=None) -> list[dict]:
    """Read user lines until EOF or /exit, stream each reply, keep the conversation.
    Returns the conversation."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    if interactive:
        print("Type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ") if interactive and stdin is sys.stdin else stdin.readline()
        except EOFError:
            line = ""
        except KeyboardInterrupt:
            print(file=stdout)
            break
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        ids = fit_history(llm, messages)
        if ids is None:
            print(f"[message too long: over max_model_len={llm.max_model_len} tokens]",
                  file=sys.stderr, flush=True)
            messages.pop()
            continue
        try:
            final = stream_request(llm, {"prompt_token_ids": ids}, params, stdout)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr, flush=True)
            messages.pop()
            continue
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": final.outputs[0].text})
    return messages


def main(args) -> int:
    if SamplingParams(**collect(args, "sampling.", CHAT_DEFAULTS)).best_of != 1:
        raise ValueError("chat streams one reply: --n and --best-of must be 1")
    llm = load_llm(args)
    chat_loop(llm, sampling_params(args, llm, CHAT_DEFAULTS), args.system)
    return 0
