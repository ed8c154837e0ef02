#!/usr/bin/env python
"""Load test for `eagle2 serve`: N concurrent clients send M chat requests (half streaming) over
loopback, check every answer, and report p50/p95 latency, throughput and server memory.

    python tools/loadtest.py --model smollm2-135m --clients 8 --requests 48 --max-tokens 32
    python tools/loadtest.py --url http://127.0.0.1:8000 --clients 8 --requests 48

With --model the server runs in this process (uvicorn on a free 127.0.0.1 port). Greedy decoding is
deterministic, so every answer to the same prompt must be identical (and, with --model, equal to the
engine's own output); streamed answers must equal the non-streamed ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion in one sentence.",
           "List three primary colours.", "Why is the sky blue?", "Give me a tip for learning Python.",
           "What does a CPU do?", "Name a famous painter."]


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20
    except ImportError:
        return float("nan")


async def _one(client: httpx.AsyncClient, i: int, max_tokens: int, method: str, headers: dict) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)]
    stream = i % 2 == 1
    body = {"model": "eagle2", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "method": method}
    t0 = time.perf_counter()
    first = None
    if not stream:
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
        ok = r.status_code == 200
        j = r.json() if ok else {}
        text = j["choices"][0]["message"]["content"] if ok else None
        tokens = j["usage"]["completion_tokens"] if ok else 0
        status = r.status_code
    else:
        text, tokens, status, done = "", 0, 0, False
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                d = line[6:]
                if d == "[DONE]":
                    done = True
                    break
                c = json.loads(d)
                if c.get("choices"):
                    piece = c["choices"][0]["delta"].get("content")
                    if piece:
                        first = first or time.perf_counter()
                        text += piece
                    if c["choices"][0]["finish_reason"]:
                        tokens = c["eagle2"]["new_tokens"]
        ok = status == 200 and done
    t1 = time.perf_counter()
    return {"i": i, "prompt": prompt, "stream": stream, "ok": ok, "status": status, "text": text, "tokens": tokens,
            "latency": t1 - t0, "ttft": (first - t0) if first else None}


async def run_load(url: str, clients: int = 8, requests: int = 48, max_tokens: int = 32, method: str = "eagle2",
                   api_key: str | None = None, expected: dict | None = None) -> dict:
    """Fire ``requests`` requests from ``clients`` concurrent workers; returns a summary dict."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    todo: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        todo.put_nowait(i)
    results = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker():
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            while True:
                try:
                    i = todo.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await _one(client, i, max_tokens, method, headers))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    by_prompt: dict = {}
    wrong = []
    for r in results:
        if not r["ok"]:
            wrong.append((r["i"], f"status {r['status']}"))
            continue
        want = (expected or {}).get(r["prompt"], by_prompt.setdefault(r["prompt"], r["text"]))
        if r["text"] != want:
            wrong.append((r["i"], "answer differs"))
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": requests, "ok": sum(r["ok"] for r in results), "wrong": wrong,
            "wall_s": round(wall, 3), "p50_s": round(pct(lat, 0.5), 3), "p95_s": round(pct(lat, 0.95), 3),
            "max_s": round(lat[-1], 3) if lat else None, "ttft_p50_s": round(pct(ttft, 0.5), 3),
            "req_per_s": round(len(results) / wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "mean_latency_s": round(statistics.mean(lat), 3) if lat else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", help="load this model and serve it in-process on a free loopback port")
    ap.add_argument("--head", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--method", default="eagle2")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole load this many times (memory check)")
    args = ap.parse_args(argv)
    if args.url:
        for _ in range(args.rounds):
            print(json.dumps(asyncio.run(run_load(args.url, args.clients, args.requests, args.max_tokens,
                                                  args.method, args.api_key))))
        return 0
    import eagle2
    from eagle2.server import create_app, serve_in_thread

    gen = eagle2.load(args.model, head=args.head, dtype=args.dtype, device=args.device)
    expected = {p: gen.generate([{"role": "user", "content": p}], max_new_tokens=args.max_tokens,
                                method=args.method).text for p in PROMPTS}
    print(f"model {gen.model_key} on {gen.device} ({gen.dtype}), head {gen.head_source}", file=sys.stderr)
    with serve_in_thread(create_app(gen, max_queue=max(16, args.clients))) as url:
        for k in range(args.rounds):
            rss0 = _rss_mb()
            res = asyncio.run(run_load(url, args.clients, args.requests, args.max_tokens, args.method,
                                       expected=expected))
            res["rss_mb_before"], res["rss_mb_after"] = round(rss0, 1), round(_rss_mb(), 1)
            res["round"] = k
            print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
