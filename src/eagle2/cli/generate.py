"""`eagle2 generate` and `eagle2 chat`."""

from __future__ import annotations

import json
import re
import sys

from .common import _decode_args, _decode_settings, _load, _model_args, _stats_line


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate an answer to one prompt, streaming it",
                       description="Stream the answer to PROMPT (chat template applied where the model has one; else the "
                                   "text is continued as given), then print tokens/s and "
                                   "mean acceptance length (new tokens per target forward).")
    _model_args(g)
    _decode_args(g)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text, prompt_token_ids, token_ids, stats) instead of streaming")
    g.add_argument("prompt", metavar="PROMPT", help="the user message ('-' reads standard input)")
    g.set_defaults(handler=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn streaming chat in the terminal",
                       description="A multi-turn REPL. Commands: /reset clears the conversation, /exit quits "
                                   "(Ctrl-D too). Stats are shown after each answer.")
    _model_args(c)
    _decode_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(handler=cmd_chat)


def cmd_generate(args) -> int:
    settings = _decode_settings(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("prompt is empty")
    gen = _load(args)
    if args.raw:
        prompt = gen.tokenizer(prompt)["input_ids"]
    if args.json:
        r = gen.generate(prompt, settings)
        print(json.dumps({"text": r.text, "prompt_token_ids": r.prompt_token_ids, "token_ids": r.token_ids,
                          "finish_reason": r.finish_reason, "method": args.method, "stats": r.stats.as_dict()}))
        return 0
    events, result = gen.stream_events(prompt, settings)
    for ev in events:
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    print(_stats_line(result.stats), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    settings = _decode_settings(args)
    gen = _load(args)
    if not gen.tokenizer.chat_template:
        raise ValueError("this model has no chat template (a base model): chat needs one; `eagle2 generate` "
                         "continues a raw text prompt")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("eagle2 chat — /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        if re.fullmatch(r"/\w+", line.rstrip()):  # a mistyped command is not a message ("  /x" is sent as it is)
            print(f"unknown command {line}: /reset or /exit (a message that starts with '/': add a space "
                  "before it)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            events, result = gen.stream_events(system + history, settings)
            sys.stdout.write("assistant> ")
            for ev in events:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        except ValueError as e:  # e.g. the conversation outgrew the context
            history.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": result.text})
        print(_stats_line(result.stats), file=sys.stderr)


