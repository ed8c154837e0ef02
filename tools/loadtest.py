#!/usr/bin/env python
"""Load and abuse tests for `eagle2 serve`, over loopback.

    python tools/loadtest.py --model smollm2-135m --clients 8 --requests 48 --max-tokens 32
    python tools/loadtest.py --url http://127.0.0.1:8000 --clients 8 --requests 48
    python tools/loadtest.py --model smollm2-135m --abuse 300 --clients 8 --max-tokens 16
    python tools/loadtest.py --model smollm2-135m --dtype float32 --prefill 8000

Load (default): N concurrent clients send M chat requests (half streaming), every answer is
checked, p50/p95 latency, throughput and server memory are reported. Greedy decoding is
deterministic, and so is sampling with a seed (--temperature > 0 sends seed 0), so every answer to
the same prompt must be identical (and, with --model, equal to the engine's own output, however the
server interleaves its --parallel requests); streamed answers must equal the non-streamed ones.

--abuse N: N requests, at most --clients at a time, mixing normal requests (streaming or not) with
oversized bodies, malformed JSON, bad parameters, foreign Host headers and clients that drop
their request (waiting or running). Every normal answer must equal a single request's; every
request must end within its deadline; the server's RSS growth is reported (with --model).

--prefill N: one completion with an N-token prompt, while /health is polled; reports /health
latency percentiles during the prefill.

With --model the server runs in this process (uvicorn on a free 127.0.0.1 port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from urllib.parse import urlsplit

import httpx

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion in one sentence.",
           "List three primary colours.", "Why is the sky blue?", "Give me a tip for learning Python.",
           "What does a CPU do?", "Name a famous painter."]


SEED = 0  # of every sampled request: its answer is then fixed, however requests interleave


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20
    except ImportError:
        return float("nan")


async def _one(client: httpx.AsyncClient, i: int, max_tokens: int, method: str, headers: dict,
               temperature: float = 0.0) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)]
    stream = i % 2 == 1
    body = {"model": "eagle2", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "stream": stream, "method": method}
    if temperature > 0:
        body["seed"] = SEED
    t0 = time.perf_counter()
    first, error = None, None
    if not stream:
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
        ok = r.status_code == 200
        j = r.json() if ok else {}
        text = j["choices"][0]["message"]["content"] if ok else None
        tokens = j["usage"]["completion_tokens"] if ok else 0
        status = r.status_code
        error = None if ok else _error_code(r.text)
    else:
        text, tokens, status, done = "", 0, 0, False
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            status = r.status_code
            if status != 200:
                error = _error_code((await r.aread()).decode())
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                d = line[6:]
                if d == "[DONE]":
                    done = True
                    break
                c = json.loads(d)
                if "error" in c:  # an SSE error event: the stream failed after it began
                    error = c["error"].get("code") or c["error"].get("type")
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
            "latency": t1 - t0, "ttft": (first - t0) if first else None, "error": error}


def _error_code(text: str) -> str | None:
    """The ``code`` (else ``type``) of an OpenAI error body, or None when it is not one."""
    try:
        e = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return e.get("code") or e.get("type")


async def run_load(url: str, clients: int = 8, requests: int = 48, max_tokens: int = 32, method: str = "eagle2",
                   api_key: str | None = None, expected: dict | None = None, temperature: float = 0.0) -> dict:
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
                results.append(await _one(client, i, max_tokens, method, headers, temperature))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    by_prompt: dict = {}
    wrong = []
    for r in results:
        if not r["ok"]:
            wrong.append((r["i"], f"status {r['status']}" + (f" {r['error']}" if r["error"] else "")))
            continue
        want = (expected or {}).get(r["prompt"], by_prompt.setdefault(r["prompt"], r["text"]))
        if r["text"] != want:
            wrong.append((r["i"], "answer differs"))
    answered = [r for r in results if r["ok"]]  # a refusal's latency is not a generation's
    lat = sorted(r["latency"] for r in answered)
    ttft = sorted(r["ttft"] for r in answered if r["ttft"] is not None)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": requests, "ok": sum(r["ok"] for r in results), "wrong": wrong,
            "wall_s": round(wall, 3), "p50_s": round(pct(lat, 0.5), 3), "p95_s": round(pct(lat, 0.95), 3),
            "max_s": round(lat[-1], 3) if lat else None, "ttft_p50_s": round(pct(ttft, 0.5), 3),
            "req_per_s": round(len(answered) / wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "mean_latency_s": round(statistics.mean(lat), 3) if lat else None}


# ---- abuse mix ---------------------------------------------------------------------------------
# Of every 10 requests: 4 normal (_one: half streaming) and one of each abusive kind.
ABUSE_PATTERN = ("normal", "oversized", "normal", "malformed", "dropped", "normal", "bad_param", "foreign_host",
                 "normal", "dropped_stream")
BAD_PARAMS = ({"seed": 2**64}, {"seed": -(2**63) - 1}, {"stop": ""}, {"temperature": 5}, {"max_tokens": 0},
              {"messages": [{"role": "user", "content": "\ud800"}]})
REFUSAL_DEADLINE_S = 5.0  # a refusal needs no model time: it must come at once, even under load


def _http(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    """A raw HTTP/1.1 request head (and body) for ``url``'s server."""
    u = urlsplit(url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}", "Connection: close",
             "Content-Type: application/json"]
    head = {"Content-Length": str(len(body)), **(headers or {})}
    lines += [f"{k}: {v}" for k, v in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _raw(url: str, data: bytes, drop_after: float | None = None) -> int | None:
    """Send ``data`` on a fresh connection; the response status, or None when dropped after ``drop_after`` s."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        if drop_after is not None:
            await asyncio.sleep(drop_after)
            return None
        line = await reader.readline()
        return int(line.split()[1]) if line.startswith(b"HTTP/") else None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _chat_body(i: int, **extra) -> bytes:
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": 8, **extra}
    return json.dumps(body).encode()


async def _abusive(url: str, kind: str, i: int, headers: dict, long_tokens: int) -> tuple[bool, int | None]:
    """One abusive request; (whether the server answered as it must, the status seen)."""
    path = "/v1/chat/completions"
    if kind == "oversized":  # declared 20 MB; the server must refuse without reading it
        data = _http(url, "POST", path, headers={**headers, "Content-Length": str(20_000_000)})
        status = await _raw(url, data + b"{" * 65536)
        return status == 413, status
    if kind == "malformed":
        status = await _raw(url, _http(url, "POST", path, b'{"messages": [', headers))
        return status == 400, status
    if kind == "bad_param":
        status = await _raw(url, _http(url, "POST", path, _chat_body(i, **BAD_PARAMS[i % len(BAD_PARAMS)]), headers))
        return status == 400, status
    if kind == "foreign_host":
        data = _http(url, "POST", path, _chat_body(i), headers).replace(
            f"Host: {urlsplit(url).netloc}".encode(), b"Host: evil.example")
        status = await _raw(url, data)
        return status == 400, status
    stream = kind == "dropped_stream"  # dropped: a long request, gone after a moment (waiting or running)
    body = _chat_body(i, max_tokens=long_tokens, method="vanilla", stream=stream)
    await _raw(url, _http(url, "POST", path, body, headers), drop_after=0.3)
    return True, None


async def run_abuse(url: str, requests: int = 300, clients: int = 8, max_tokens: int = 16, method: str = "eagle2",
                    api_key: str | None = None, expected: dict | None = None, deadline_s: float = 120.0,
                    long_tokens: int = 400) -> dict:
    """The abuse mix (see the module docstring); returns a summary dict."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(clients)
    out: list[dict] = []

    async def one(client, i):
        kind = ABUSE_PATTERN[i % len(ABUSE_PATTERN)]
        deadline = deadline_s if kind == "normal" else REFUSAL_DEADLINE_S
        async with sem:
            t0 = time.perf_counter()
            try:
                if kind == "normal":
                    r = await asyncio.wait_for(_one(client, i, max_tokens, method, headers), deadline)
                    ok, status, text, prompt = r["ok"], r["status"], r["text"], r["prompt"]
                else:
                    ok, status = await asyncio.wait_for(_abusive(url, kind, i, headers, long_tokens), deadline)
                    text = prompt = None
            except asyncio.TimeoutError:
                ok, status, text, prompt = False, "deadline", None, None
            out.append({"i": i, "kind": kind, "ok": ok, "status": status, "text": text, "prompt": prompt,
                        "latency": time.perf_counter() - t0, "deadline": deadline})

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=deadline_s * 2,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # the last dropped requests' cancellations
        queue = (await client.get("/health")).json()["queue"]
    return {**_abuse_summary(out, expected, wall), "server_queue": queue}


def _abuse_summary(out: list[dict], expected: dict | None, wall: float) -> dict:
    first: dict = {}
    wrong = []
    for r in sorted(out, key=lambda r: r["i"]):
        if r["kind"] == "normal" and r["ok"]:
            want = (expected or {}).get(r["prompt"], first.setdefault(r["prompt"], r["text"]))
            r["ok"] = r["text"] == want
        if not r["ok"]:
            wrong.append((r["i"], r["kind"], r["status"]))
    normal = [r for r in out if r["kind"] == "normal"]
    return {"requests": len(out), "normal": len(normal), "normal_ok": sum(r["ok"] for r in normal),
            "abusive": len(out) - len(normal), "abusive_ok": sum(r["ok"] for r in out if r["kind"] != "normal"),
            "over_deadline": sum(r["latency"] > r["deadline"] for r in out), "wrong": wrong[:20],
            "max_normal_s": round(max((r["latency"] for r in normal), default=0.0), 3),
            "max_refusal_s": round(max((r["latency"] for r in out if r["kind"] not in ("normal",)), default=0.0), 3),
            "wall_s": round(wall, 3)}


# ---- /health during a long prefill -------------------------------------------------------------
async def health_during_prefill(url: str, n_tokens: int, vocab: int = 1000, api_key: str | None = None,
                                poll_s: float = 0.02) -> dict:
    """Send one completion with an ``n_tokens``-token prompt (ids below ``vocab``) and poll /health
    while it runs; /health latency percentiles over the request's lifetime."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ids = [(7 * k + 3) % vocab for k in range(n_tokens)]
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        job = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1},
                                                headers=headers))
        due = time.perf_counter()
        while not job.done():
            r = await client.get("/health")
            # from when the poll was due, not when it was sent: with the server in this process, a
            # frozen interpreter would also hold back the sending, and hide the wait otherwise
            end = time.perf_counter()
            lat.append(end - due)
            assert r.status_code == 200, r.text
            await asyncio.sleep(poll_s)
            due = end + poll_s
        r = job.result()
        wall = time.perf_counter() - t0
    lat.sort()

    def pct(q):
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 1) if lat else float("nan")

    return {"prompt_tokens": n_tokens, "status": r.status_code, "request_s": round(wall, 2), "health_polls": len(lat),
            "health_p50_ms": pct(0.5), "health_p99_ms": pct(0.99), "health_max_ms": round(lat[-1] * 1e3, 1) if lat else None}


def _args(argv):
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
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: sampled requests, each with seed 0 (load)")
    ap.add_argument("--parallel", type=int, default=8, help="the in-process server's --parallel (with --model)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole load this many times (memory check)")
    ap.add_argument("--abuse", type=int, default=0, metavar="N", help="run the abuse mix of N requests instead")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds a normal request may take (--abuse)")
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="measure /health latency during one N-token prefill instead")
    return ap.parse_args(argv)


def _measure(url: str, args, expected: dict | None = None, vocab: int = 1000) -> dict:
    if args.prefill:
        return asyncio.run(health_during_prefill(url, args.prefill, vocab, args.api_key))
    if args.abuse:
        return asyncio.run(run_abuse(url, args.abuse, args.clients, args.max_tokens, args.method, args.api_key,
                                     expected, args.deadline))
    return asyncio.run(run_load(url, args.clients, args.requests, args.max_tokens, args.method, args.api_key,
                                expected, args.temperature))


def main(argv=None) -> int:
    args = _args(argv)
    if args.url:
        for _ in range(args.rounds):
            print(json.dumps(_measure(args.url, args)))
        return 0
    import gc

    import eagle2
    from eagle2.server import create_app, serve_in_thread

    def prepare():
        gen = eagle2.load(args.model, head=args.head, dtype=args.dtype, device=args.device)
        sampled = dict(temperature=args.temperature, seed=SEED) if args.temperature > 0 and not args.abuse else {}
        return gen, {p: gen.generate([{"role": "user", "content": p}], max_new_tokens=args.max_tokens,
                                     method=args.method, **sampled).text for p in PROMPTS}

    # off the main thread: the reference answers run on the compute thread, as the server's rounds will (one pool)
    gen, expected = eagle2.load_off_thread(prepare)
    print(f"model {gen.model_key} on {gen.device} ({gen.dtype}), head {gen.head_source}", file=sys.stderr)
    with serve_in_thread(create_app(gen, max_queue=max(16, args.clients), parallel=args.parallel)) as url:
        for k in range(args.rounds):
            gc.collect()
            rss0 = _rss_mb()
            res = _measure(url, args, expected, gen.target.vocab_size)
            gc.collect()
            res["rss_mb_before"], res["rss_mb_after"] = round(rss0, 1), round(_rss_mb(), 1)
            res["rss_growth_mb"], res["round"] = round(res["rss_mb_after"] - rss0, 1), k
            print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
