"""`eagle2 corpus`: show or import into the self-distilled corpus (token ids only; runs no model)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DESCRIPTION = """The corpus of self-distilled conversations that `eagle2 train` grows and trains on
(default: corpus/<model> in the repo for built-in models; format in eagle2/train/corpus.py).

  show     counts of conversations, turns and tokens per source (the manifest)
  import   add a responses JSONL ({"id", "prompt_ids", "response_ids"} per line, the format the
           responses stage wrote before the corpus) as first turns; ids already present are skipped

To grow it with the model's own answers: eagle2 train --stages responses [--prompts FILE...]"""


def register(sub) -> None:
    p = sub.add_parser("corpus", help="show or import into the self-distilled training corpus",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["show", "import"])
    p.add_argument("files", nargs="*", metavar="FILE", help="import: responses JSONL files")
    p.add_argument("--model", default="smollm2-135m", help="the model whose answers these are (default: %(default)s)")
    p.add_argument("--corpus", default=None, metavar="DIR",
                   help="corpus directory (default: where eagle2 train keeps it: corpus/<model> for a built-in model, "
                        "else $EAGLE2_CACHE/runs/<model>/corpus)")
    p.add_argument("--temperature", type=float, default=0.0, help="import: the answers' sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=256, help="import: the answers' length cap")
    p.add_argument("--max-prompt-tokens", type=int, default=320, help="import: the prompt length limit used")
    p.add_argument("--note", default="", help="import: a note recorded with the shard (e.g. the commit that made it)")
    p.set_defaults(handler=cmd_corpus)


def cmd_corpus(args) -> int:
    from ..train.corpus import Corpus, corpus_table, default_corpus_dir, import_responses
    from ..train.pipeline import default_run_dir

    # where `eagle2 train --model MODEL` keeps it: corpus/<model> for a built-in one, else in its run directory
    path = Path(args.corpus) if args.corpus else default_corpus_dir(args.model, default_run_dir(args.model))
    if args.action == "show":
        if args.files:
            raise ValueError("show takes no files")
        if not path.is_dir():
            raise ValueError(f"no corpus at {path} (not a directory)")
        c = Corpus(path)
        print(corpus_table(c.summary()))
        return 0
    if not args.files:
        raise ValueError("import needs at least one responses JSONL file")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0; got {args.temperature}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--corpus {path} is a file, not a corpus directory")
    c = Corpus(path)
    settings = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                    max_prompt_tokens=args.max_prompt_tokens, **({"note": args.note} if args.note else {}))
    c.check_model(args.model, settings)
    for f in args.files:
        r = import_responses(c, f, args.model, settings)
        print(json.dumps({"file": str(f), **r}))
    print(corpus_table(c.manifest))
    return 0
