"""Write Spec-Bench's 48-question slice used in the README: 8 first turns per Spec-Bench category.

Spec-Bench has six categories; in ``spec_bench_question.jsonl`` its MT-bench part is split into MT-bench's
eight categories, so that part contributes one question of each. The rest: the first 8 questions of
translation, summarization, qa, math_reasoning and rag.

    python tools/spec_bench_48.py ../shared/data/eval/spec_bench_question.jsonl > /tmp/spec48.jsonl
    eagle2 bench --questions /tmp/spec48.jsonl --turns 1 --max-new-tokens 128 ...
"""

import json
import sys
from collections import Counter

BIG = ("translation", "summarization", "qa", "math_reasoning", "rag")


def main(path: str) -> None:
    taken: Counter = Counter()
    for line in open(path):
        q = json.loads(line)
        cat = q["category"]
        if taken[cat] < (8 if cat in BIG else 1):
            taken[cat] += 1
            sys.stdout.write(json.dumps(q) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/eval/spec_bench_question.jsonl")
