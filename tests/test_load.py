"""A modest load test: 8 concurrent clients, dozens of requests (half streaming) against a real
uvicorn on 127.0.0.1; every answer must be right, nothing rejected, memory flat.
The full-size run with the real model is ``python tools/loadtest.py --model smollm2-135m``."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _loadtest():
    spec = importlib.util.spec_from_file_location("eagle2_loadtest", ROOT / "tools" / "loadtest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_8_clients(tiny_chat_generator):
    psutil = pytest.importorskip("psutil")
    from eagle2.server import create_app, serve_in_thread

    lt = _loadtest()
    gen = tiny_chat_generator
    expected = {p: gen.generate([{"role": "user", "content": p}], max_new_tokens=8).text for p in lt.PROMPTS}
    proc = psutil.Process(os.getpid())
    with serve_in_thread(create_app(gen, max_queue=16)) as url:
        warm = asyncio.run(lt.run_load(url, clients=8, requests=8, max_tokens=8, expected=expected))
        assert warm["ok"] == 8 and not warm["wrong"], warm
        gc.collect()
        rss0 = proc.memory_info().rss
        res = asyncio.run(lt.run_load(url, clients=8, requests=32, max_tokens=8, expected=expected))
        gc.collect()
        grown = (proc.memory_info().rss - rss0) / 2**20
        print(f"\nload: {res}  rss growth {grown:.1f} MiB")
    assert res["ok"] == 32 and not res["wrong"], res
    assert 0 < res["tokens"] <= 32 * 8
    assert res["p95_s"] >= res["p50_s"] > 0
    assert grown < 40, f"server memory grew {grown:.1f} MiB over 32 requests"
