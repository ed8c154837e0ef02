"""The OpenAI-compatible server: every endpoint, streaming, validation, API key, queue, disconnects,
and the official ``openai`` client against a real uvicorn on a loopback port.

Uses the tiny random Llama with SmolLM2's tokenizer (gibberish text, real tokens).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import closing

import httpx
import pytest
from fastapi.testclient import TestClient

from eagle2.server import create_app, serve_in_thread

LOCAL = "http://127.0.0.1"  # TestClient's default Host, "testserver", is refused like any foreign name
MSG = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def client(tiny_chat_generator):
    with TestClient(create_app(tiny_chat_generator), base_url=LOCAL) as c:
        yield c


def sse(text: str) -> list:
    """Parsed `data:` payloads of an SSE body; the final [DONE] is kept as the string."""
    out = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                d = line[6:]
                out.append(d if d == "[DONE]" else json.loads(d))
    return out


def assert_error(r, status=400, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def relay(decode, hook):
    """A decode from ``generator.begin`` passed through, its forwards and their answers included, with
    ``hook(item)`` called on every item (a forward it asks for, or an event) before it goes on."""
    from eagle2.target import Forward

    with closing(decode):
        answer = None
        while True:
            try:
                item = decode.send(answer)
            except StopIteration:
                return
            hook(item, isinstance(item, Forward))
            answer = yield item


class Gated:
    """Wraps a generator: each generation waits for ``gate`` before its first round; counts rounds."""

    def __init__(self, real):
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.rounds = []  # rounds decoded, per generation
        self.started = threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def begin(self, prompt, settings=None, **kw):
        decode, result = self.real.begin(prompt, settings, **kw)
        self.rounds.append(0)
        idx = len(self.rounds) - 1

        def count(item, is_forward):
            if not is_forward:
                self.rounds[idx] += 1

        def wrapped():
            self.started.set()
            self.gate.wait(30)
            return (yield from relay(decode, count))

        return wrapped(), result


# ---- plain endpoints ---------------------------------------------------------------------------
def test_health_models_and_page(client, tiny_chat_generator):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["max_context"] == tiny_chat_generator.max_context
    assert h["queue"]["running"] == 0 and h["queue"]["max_queue"] == 16 and h["queue"]["parallel"] == 8
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["object"] == "model" and m["data"][0]["id"]
    assert "text/html" in client.get("/").headers["content-type"]
    e = assert_error(client.get("/v1/nope"), 404)
    assert e["code"] == "not_found"
    assert_error(client.get("/v1/chat/completions"), 405)


# ---- chat completions --------------------------------------------------------------------------
def test_chat_completion_matches_engine(client, tiny_chat_generator):
    r = client.post("/v1/chat/completions", json={"model": "whatever", "messages": MSG, "max_tokens": 24})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "chat.completion" and b["id"].startswith("chatcmpl-")
    ch = b["choices"][0]
    assert ch["message"]["role"] == "assistant" and ch["finish_reason"] == "length" and ch["index"] == 0
    ref = tiny_chat_generator.generate(MSG, max_new_tokens=24)
    assert ch["message"]["content"] == ref.text
    assert b["usage"] == {"prompt_tokens": len(ref.prompt_token_ids), "completion_tokens": 24,
                          "total_tokens": len(ref.prompt_token_ids) + 24,
                          "prompt_tokens_details": {"cached_tokens": ref.stats.reused_prefix}}
    st = b["eagle2"]
    assert st["method"] == "eagle2" and st["new_tokens"] == 24 and st["rounds"] >= 1
    assert st["mean_accept_len"] >= 1.0 and st["tokens_per_s"] > 0


def test_vanilla_method_is_lossless(client):
    a = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 20}).json()
    v = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 20, "method": "vanilla"}).json()
    assert v["eagle2"]["method"] == "vanilla" and v["eagle2"]["mean_accept_len"] == 1.0
    assert v["eagle2"]["rounds"] == 20
    assert a["choices"][0]["message"]["content"] == v["choices"][0]["message"]["content"]


def test_chat_stream(client):
    ref = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 20}).json()
    r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 20, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = sse(r.text)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = ""
    for c in chunks:
        if c["choices"] and "content" in c["choices"][0]["delta"]:
            piece = c["choices"][0]["delta"]["content"]
            text += piece
            if piece:  # a round: its draft_text is a prefix of the piece
                x = c["eagle2"]
                assert piece.startswith(x["draft_text"]) and 0 <= x["drafted"] < x["tokens"] + 1
                assert x["rounds"] >= 1 and x["tokens_per_s"] >= 0
    assert text == ref["choices"][0]["message"]["content"]
    fin = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(fin) == 1 and fin[0]["choices"][0]["finish_reason"] == "length"
    assert fin[0]["eagle2"]["new_tokens"] == 20
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])  # OpenAI: null until the last chunk


def test_stop_and_seed(client):
    base = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 30}).json()
    text = base["choices"][0]["message"]["content"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 30, "stop": [stop]}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"]["content"] == text[: text.find(stop)]
    body = {"messages": MSG, "max_tokens": 15, "temperature": 1.3, "top_p": 0.9, "seed": 1234}
    s1 = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    s2 = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert s1 == s2


def test_content_parts_and_roles(client):
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More", "name": "bob"}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "user": "u1",
                                                  "presence_penalty": 0, "n": 1, "logprobs": False})
    assert r.status_code == 200, r.text


# ---- completions -------------------------------------------------------------------------------
def test_completions(client, tiny_chat_generator):
    r = client.post("/v1/completions", json={"model": "x", "prompt": "Once upon a time", "max_tokens": 8})
    b = r.json()
    assert r.status_code == 200 and b["object"] == "text_completion"
    ids = tiny_chat_generator.tokenizer("Once upon a time")["input_ids"]
    assert b["choices"][0]["text"] == tiny_chat_generator.generate(ids, max_new_tokens=8).text
    assert b["usage"]["prompt_tokens"] == len(ids) and b["usage"]["completion_tokens"] == 8
    by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 8}).json()
    assert by_ids["choices"][0]["text"] == b["choices"][0]["text"]
    assert client.post("/v1/completions", json={"prompt": ["Once upon a time"], "max_tokens": 8}).json()[
        "choices"][0]["text"] == b["choices"][0]["text"]
    default = client.post("/v1/completions", json={"prompt": "Once upon a time"}).json()
    assert default["usage"]["completion_tokens"] == 16  # OpenAI's default
    s = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "stream": True,
                                             "method": "vanilla"})
    ev = sse(s.text)
    assert ev[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in ev[:-1]) == b["choices"][0]["text"]
    assert ev[-2]["choices"][0]["finish_reason"] == "length" and ev[-2]["eagle2"]["method"] == "vanilla"


# ---- bad input ---------------------------------------------------------------------------------
LONG = {"role": "user", "content": "word " * 1100}
BAD_CHAT = [
    ("{not json", None),
    ("", None),
    ("[1, 2]", None),
    ('"text"', None),
    (json.dumps({}), "messages"),
    (json.dumps({"messages": []}), "messages"),
    (json.dumps({"messages": "hi"}), "messages"),
    (json.dumps({"messages": [{"role": "user"}]}), "messages"),  # content None everywhere -> empty prompt
    (json.dumps({"messages": [{"role": "user", "content": ""}]}), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "   "}]}), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}), "messages"),
    (json.dumps({"messages": MSG, "max_tokens": 0}), "max_tokens"),
    (json.dumps({"messages": MSG, "max_tokens": -5}), "max_tokens"),
    (json.dumps({"messages": MSG, "max_tokens": "10"}), "max_tokens"),
    (json.dumps({"messages": MSG, "max_tokens": 2.5}), "max_tokens"),
    (json.dumps({"messages": MSG, "max_tokens": True}), "max_tokens"),
    (json.dumps({"messages": MSG, "max_tokens": 10**6}), "max_tokens"),
    (json.dumps({"messages": MSG, "max_completion_tokens": 0}), "max_completion_tokens"),
    (json.dumps({"messages": [LONG]}), "messages"),
    (json.dumps({"messages": MSG, "temperature": -0.1}), "temperature"),
    (json.dumps({"messages": MSG, "temperature": 2.01}), "temperature"),
    (json.dumps({"messages": MSG, "temperature": "hot"}), "temperature"),
    (json.dumps({"messages": MSG, "top_p": 0}), "top_p"),
    (json.dumps({"messages": MSG, "top_p": 1.5}), "top_p"),
    (json.dumps({"messages": MSG, "top_p": -1}), "top_p"),
    (json.dumps({"messages": MSG, "top_k": -1}), "top_k"),
    (json.dumps({"messages": MSG, "n": 2}), "n"),
    (json.dumps({"messages": MSG, "stream": "yes"}), "stream"),
    (json.dumps({"messages": MSG, "stop": 5}), "stop"),
    (json.dumps({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}), "stop"),
    (json.dumps({"messages": MSG, "seed": "abc"}), "seed"),
    (json.dumps({"messages": MSG, "method": "turbo"}), "method"),
    (json.dumps({"messages": MSG, "logprobs": True}), "logprobs"),
    (json.dumps({"messages": MSG, "frequency_penalty": 0.5}), "frequency_penalty"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT)
def test_bad_chat_requests(client, body, param):
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    e = assert_error(r, 400, param)
    assert e["type"] == "invalid_request_error"


@pytest.mark.parametrize("path,extra,message", [
    ("/v1/chat/completions", {"stop": ["s"] * 10}, "stop: List should have at most 4 items"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, 3]}]},
     "messages.0.content.1: Input should be a valid dictionary"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt: List should have at most 1 item"),
])
def test_a_field_of_several_types_reports_the_branch_that_fits(client, path, extra, message):
    """stop may be a string or a list, so pydantic reports a mismatch per type: the message shows the
    reason of the branch the value's type fits, with the field's path and no branch names."""
    body = ({"messages": MSG} if "chat" in path else {}) | extra
    e = assert_error(client.post(path, json=body), 400)
    assert e["message"].startswith(message), e["message"]
    assert "constrained" not in e["message"] and "[" not in e["message"].split(":")[0]
    assert "more invalid" not in e["message"]  # the field's other type branches are not other errors
    both = assert_error(client.post(path, json=body | {"top_p": 5}), 400)
    assert "(and 1 more invalid field)" in both["message"]


@pytest.mark.parametrize("body", [
    {}, {"prompt": ""}, {"prompt": []}, {"prompt": [1, "a"]}, {"prompt": [-1]}, {"prompt": [10**9]},
    {"prompt": ["a", "b"]}, {"prompt": "hi", "max_tokens": 0}, {"prompt": "hi", "temperature": 5},
    {"prompt": "hi", "echo": True}, {"prompt": "hi", "best_of": 3}, {"prompt": "hi", "max_tokens": 5000},
])
def test_bad_completion_requests(client, body):
    assert_error(client.post("/v1/completions", json=body), 400)


@pytest.mark.parametrize("extra,param", [
    ({"logit_bias": {"28": -100}}, "logit_bias"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"logprobs": True}, "logprobs"), ({"n": 2}, "n"),
])
def test_what_the_server_cannot_honour_is_refused_not_ignored(client, extra, param):
    """A client asking for a JSON answer, a banned token or a tool call must not get free text back as if it
    had not asked."""
    e = assert_error(client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2} | extra), 400, param)
    assert e["code"] == "unsupported_parameter" and "not supported" in e["message"]


def test_no_op_values_of_unsupported_fields_are_accepted(client):
    body = {"messages": MSG, "max_tokens": 2, "logit_bias": {}, "response_format": {"type": "text"}, "tools": [],
            "tool_choice": "none", "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False,
            "parallel_tool_calls": True, "unknown_field": 1, "n": 1}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "echo": False, "suffix": "",
                                                "n": 1, "best_of": 1}).status_code == 200
    e = assert_error(client.post("/v1/completions", json={"prompt": "hi", "best_of": 3}), 400, "best_of")
    assert e["code"] == "unsupported_parameter"
    tool_turn = [MSG[0], {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}]
    e = assert_error(client.post("/v1/chat/completions", json={"messages": tool_turn}), 400)
    assert e["code"] == "unsupported_parameter" and e["param"] == "messages.1.tool_calls"
    e = assert_error(client.post("/v1/chat/completions", json={"messages": MSG, "stream_options": {
        "include_usage": True}}), 400, "stream_options")
    assert "stream is true" in e["message"]


def test_model_retrieval_and_head_requests(client):
    name = client.get("/v1/models").json()["data"][0]["id"]
    assert client.get(f"/v1/models/{name}").json()["id"] == name
    e = assert_error(client.get("/v1/models/gpt-4o"), 404)
    assert e["code"] == "model_not_found"
    for path in ("/", "/health", "/v1/models"):
        r = client.head(path)
        assert r.status_code == 200 and not r.content, path


def test_no_500_on_wrong_content_type(client):
    r = client.post("/v1/chat/completions", content=b"messages=hi", headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500
    assert "error" in r.json()


# ---- API key -----------------------------------------------------------------------------------
def test_api_key(tiny_chat_generator):
    c = TestClient(create_app(tiny_chat_generator, api_key="k-123"), base_url=LOCAL)
    assert c.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k-123"}, {"Authorization": "Basic k-123"}):
        e = assert_error(c.get("/v1/models", headers=headers), 401)
        assert e["code"] == "invalid_api_key"
        assert_error(c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}, headers=headers), 401)
    ok = {"Authorization": "Bearer k-123"}
    assert c.get("/v1/models", headers=ok).status_code == 200
    assert c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}, headers=ok).status_code == 200


def test_cli_serve_options(monkeypatch):
    from eagle2.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key_file, args.max_queue, args.parallel) == ("127.0.0.1", 8000, None, 16, 8)
    assert (args.max_body_bytes, args.max_prompt_chars, args.allowed_hosts, args.docs) == (2 * 2**20, 100_000,
                                                                                           None, False)
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "9", "--api-key-file", "kf",
                                      "--max-queue", "3", "--model", "m", "--allowed-hosts", "a,b", "--docs"])
    assert (args.host, args.port, args.api_key_file, args.max_queue, args.model) == ("0.0.0.0", 9, "kf", 3, "m")
    assert args.allowed_hosts == ["a,b"] and args.docs
    assert main(["serve", "--port", "70000"]) == 2
    assert main(["serve", "--max-queue", "-1"]) == 2
    assert main(["serve", "--parallel", "0"]) == 2
    import socket

    with socket.socket() as s:  # a busy port fails fast, before loading the model
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["serve", "--port", str(s.getsockname()[1]), "--model", "/nonexistent"]) == 2


def test_serve_a_failed_load_is_one_error_line(capsys):
    """The load runs on a thread of its own (tests/test_compute.py); its failure is the CLI's one error line."""
    from eagle2.cli import main

    assert main(["serve", "--port", "0", "--model", "/nonexistent"]) == 2
    assert "error:" in capsys.readouterr().err


# ---- queue, disconnects, the openai client (real uvicorn) ---------------------------------------
def wait_for(cond, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_queue_overflow_is_503_and_fifo(tiny_chat_generator):
    gated = Gated(tiny_chat_generator)
    gated.gate.clear()
    app = create_app(gated, max_queue=2, parallel=1)
    results = {}

    def post(i):
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3 + i})
            results[i] = (r.status_code, time.perf_counter(), r.json())

    with serve_in_thread(app) as url:
        threads = [threading.Thread(target=post, args=(0,))]
        threads[0].start()
        assert gated.started.wait(10)  # request 0 is running (blocked on the gate)
        for i in (1, 2):  # two wait in the queue
            threads.append(threading.Thread(target=post, args=(i,)))
            threads[-1].start()
            assert wait_for(lambda: httpx.get(url + "/health").json()["queue"]["waiting"] == i)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 3}, timeout=10)
        e = assert_error(r, 503)
        assert e["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        rs = httpx.post(url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 3, "stream": True})
        assert_error(rs, 503)
        gated.gate.set()
        for t in threads:
            t.join(30)
        h = httpx.get(url + "/health").json()["queue"]
    assert all(results[i][0] == 200 for i in range(3))
    assert [results[i][2]["usage"]["completion_tokens"] for i in range(3)] == [3, 4, 5]
    assert results[0][1] <= results[1][1] <= results[2][1]  # first in, first out
    assert h["rejected"] == 2 and h["completed"] == 3 and h["waiting"] == 0 and h["running"] == 0


def test_a_short_request_is_not_held_behind_a_long_one(tiny_chat_generator):
    """Requests decode side by side, a round of each in turn: a short one sent while a long one runs
    ends first, and both get the answers they would get alone (sampled ones with a seed too)."""
    from test_server_abuse import Slow

    slow = Slow(tiny_chat_generator, 0.01)
    long_body = {"messages": MSG, "max_tokens": 300, "temperature": 1.0, "seed": 7, "method": "eagle2"}
    short_body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 1.0,
                  "seed": 3}
    alone = [tiny_chat_generator.generate(b["messages"], max_new_tokens=b["max_tokens"], temperature=1.0,
                                          seed=b["seed"]).text for b in (long_body, short_body)]
    done = {}

    def post(name, body):
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        done[name] = (time.perf_counter(), r.json()["choices"][0]["message"]["content"])

    with serve_in_thread(create_app(slow)) as url:
        first = threading.Thread(target=post, args=("long", long_body))
        first.start()
        assert wait_for(lambda: slow.rounds and slow.rounds[0] >= 3)
        post("short", short_body)
        first.join(60)
    assert done["short"][0] < done["long"][0]
    assert [done["long"][1], done["short"][1]] == alone
    assert len(slow.rounds) == 2 and slow.rounds[1] < slow.rounds[0]


def test_a_job_ends_in_the_turn_of_its_last_forward():
    """Its answer does not wait for the other jobs' next rounds: once its last forward is out, the
    worker finishes it before turning to the next job."""
    import asyncio
    import types

    from eagle2.engine import step_together
    from eagle2.server.scheduler import Scheduler

    log, both_queued = [], threading.Event()

    class Fake:  # decodes that need no target forward
        def begin(self, ids, settings):
            name, n = ids
            result = types.SimpleNamespace(finish_reason="length", token_ids=[])

            def events():
                for i in range(n):
                    both_queued.wait(10)
                    log.append(name)
                    result.token_ids.append(i)
                    yield types.SimpleNamespace(final=i == n - 1)  # (not streamed: nothing else is read)
                log.append(name + " end")
            return events(), result

        def step_together(self, decodes):
            return step_together(None, decodes)

        def end(self, decode):
            decode.close()

    loop = asyncio.new_event_loop()
    sched = Scheduler(Fake(), max_queue=4, parallel=2)
    jobs = []
    for name, n in (("long", 6), ("short", 2)):
        jobs.append(sched.reserve(loop))
        jobs[-1].ids, jobs[-1].settings = (name, n), types.SimpleNamespace(max_new_tokens=n)
        sched.start(jobs[-1])
    both_queued.set()
    try:
        assert wait_for(lambda: all(job.resolved for job in jobs), 10)
    finally:
        sched.stop(5)
        loop.close()
    last = max(i for i, x in enumerate(log) if x == "short")
    assert log[last + 1] == "short end" and log.count("long") == 6, log


def test_a_client_leaving_does_not_disturb_the_job_beside_it(tiny_chat_generator):
    gen = Gated(tiny_chat_generator)
    body = {"messages": MSG, "max_tokens": 300, "stream": True, "method": "vanilla"}
    kept = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 120, "temperature": 1.0,
            "seed": 5}
    alone = tiny_chat_generator.generate(kept["messages"], max_new_tokens=120, temperature=1.0, seed=5).text
    got = []
    with serve_in_thread(create_app(gen, parallel=2)) as url:
        with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            t = threading.Thread(target=lambda: got.append(httpx.post(url + "/v1/chat/completions", json=kept,
                                                                      timeout=60).json()))
            t.start()
            assert wait_for(lambda: len(gen.rounds) == 2 and gen.rounds[1] >= 2)
        t.join(60)  # the stream above was dropped at once
        assert wait_for(lambda: httpx.get(url + "/health").json()["queue"]["running"] == 0, 5)
        q = httpx.get(url + "/health").json()["queue"]
    assert q["cancelled"] == 1 and q["completed"] == 1 and gen.rounds[0] < 300
    assert got[0]["choices"][0]["message"]["content"] == alone


def test_parallel_1_decodes_one_at_a_time(tiny_chat_generator):
    gated = Gated(tiny_chat_generator)
    gated.gate.clear()
    with serve_in_thread(create_app(gated, max_queue=4, parallel=1)) as url:
        t = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions",
                                                       json={"messages": MSG, "max_tokens": 3}, timeout=30))
        t.start()
        assert gated.started.wait(10)
        t2 = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions",
                                                        json={"messages": MSG, "max_tokens": 3}, timeout=30))
        t2.start()
        assert wait_for(lambda: httpx.get(url + "/health").json()["queue"]["waiting"] == 1)
        assert httpx.get(url + "/health").json()["queue"]["running"] == 1
        gated.gate.set()
        t.join(30)
        t2.join(30)
    with pytest.raises(ValueError, match="parallel"):
        create_app(tiny_chat_generator, parallel=0)


def test_answers_do_not_wait_for_delayed_acks(tiny_chat_generator):
    """Nagle's algorithm is off on the server's connections: a small answer, whose head and body are
    written apart, does not wait ~40 ms for the client's delayed ACK of the head."""
    with serve_in_thread(create_app(tiny_chat_generator)) as url, httpx.Client(base_url=url, timeout=5) as c:
        c.get("/health")
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            times.append(time.perf_counter() - t0)
    assert sorted(times)[5] < 0.02, [round(t * 1e3, 1) for t in times]


def test_disconnect_mid_stream_frees_the_slot(tiny_chat_generator):
    gated = Gated(tiny_chat_generator)
    app = create_app(gated, max_queue=0, parallel=1)  # one at a time, no waiting room
    with serve_in_thread(app) as url:
        body = {"messages": MSG, "max_tokens": 900, "stream": True, "method": "vanilla"}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                n = 0
                for line in r.iter_lines():
                    if line.startswith("data: ") and '"content"' in line:
                        n += 1
                        if n >= 3:
                            break
        # the client is gone: decoding stops within a round or so, the slot is free again
        assert wait_for(lambda: httpx.get(url + "/health").json()["queue"]["running"] == 0, 5)
        q = httpx.get(url + "/health").json()["queue"]
        assert q["cancelled"] == 1 and q["completed"] == 0
        stopped_at = gated.rounds[0]
        assert stopped_at < 900
        time.sleep(0.3)
        assert gated.rounds[0] == stopped_at  # really stopped
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4}, timeout=30)
        assert r.status_code == 200  # max_queue=0 would be 503 if the slot were still taken
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, "stream": True},
                       timeout=30)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        q = httpx.get(url + "/health").json()["queue"]
        assert q["cancelled"] == 1 and q["completed"] == 2  # a stream read to the end is not a cancel


def test_openai_client(tiny_chat_generator):
    openai = pytest.importorskip("openai")
    with serve_in_thread(create_app(tiny_chat_generator, api_key="sk-test")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=30)
        models = client.models.list()
        name = models.data[0].id
        r = client.chat.completions.create(model=name, messages=MSG, max_tokens=12, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
        text = r.choices[0].message.content
        assert r.model_extra["eagle2"]["method"] == "eagle2"
        stream = client.chat.completions.create(model=name, messages=MSG, max_tokens=12, stream=True,
                                                stream_options={"include_usage": True})
        pieces, usage, finish = [], None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) == text and finish == "length" and usage.completion_tokens == 12
        v = client.chat.completions.create(model=name, messages=MSG, max_tokens=12, extra_body={"method": "vanilla"})
        assert v.choices[0].message.content == text and v.model_extra["eagle2"]["method"] == "vanilla"
        c = client.completions.create(model=name, prompt="Once upon a time", max_tokens=5)
        assert c.choices[0].text and c.usage.completion_tokens == 5
        cs = list(client.completions.create(model=name, prompt="Once upon a time", max_tokens=5, stream=True))
        assert "".join(x.choices[0].text for x in cs if x.choices) == c.choices[0].text
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(model=name, messages=MSG, temperature=3)
        assert ei.value.body["param"] == "temperature" if isinstance(ei.value.body, dict) else True
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_base_model_without_chat_template_points_to_completions():
    from conftest import ToyTokenizer, make_generator, make_tiny_model

    gen = make_generator(make_tiny_model("llama"), ToyTokenizer())
    c = TestClient(create_app(gen), base_url="http://127.0.0.1")
    e = assert_error(c.post("/v1/chat/completions", json={"messages": MSG}), 400, "messages")
    assert e["code"] == "no_chat_template" and "/v1/completions" in e["message"]
    assert c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}).status_code == 200


def test_a_job_sends_one_terminal_event_and_nothing_after_it():
    """``close`` may end a running job (a 503) while its worker still sends rounds and then its own end:
    the event loop gets the first terminal event only."""
    import asyncio

    from eagle2.server.errors import shutting_down
    from eagle2.server.scheduler import Done, Failed, Job, Round

    loop = asyncio.new_event_loop()
    try:
        job = Job(loop)
        job.emit(Round("a", "", 1, 0, {}))
        job.emit(Failed(shutting_down()))
        job.emit(Round("b", "", 1, 0, {}))
        job.emit(Done(None))
        loop.run_until_complete(asyncio.sleep(0))  # the callbacks run
        got = [job.events.get_nowait() for _ in range(job.events.qsize())]
    finally:
        loop.close()
    assert [type(e).__name__ for e in got] == ["Round", "Failed"]


def test_requests_side_by_side_share_one_forward_and_keep_their_answers(smol_tokenizer, monkeypatch):
    """On a row-invariant target (bf16, exact numerics) the server runs its requests' target forwards as
    one pass over the weights: the forwards did run together, and every answer, greedy or seeded, is the
    one the request gets alone."""
    import torch
    from conftest import make_generator, make_tiny_model

    from eagle2 import fast

    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer), eos_token_id=2, max_position_embeddings=1024)
    gen = make_generator(model.to(torch.bfloat16), smol_tokenizer, exact=True)
    if not (gen.target.row_invariant and gen.target.stack.is_native):
        pytest.skip("needs the native, row-invariant lean forward")
    bodies = [{"messages": [{"role": "user", "content": f"Tell me about the number {i}."}], "max_tokens": 24 + 4 * i,
               "method": m, **extra} for i, (m, extra) in enumerate([("eagle2", {}), ("vanilla", {}),
                                                                    ("eagle2", {"temperature": 0.9, "seed": 5}),
                                                                    ("chain", {})])]
    alone = [gen.generate(b["messages"], max_new_tokens=b["max_tokens"], method=b["method"],
                          temperature=b.get("temperature", 0.0), seed=b.get("seed")).text for b in bodies]
    sizes = []
    together = fast.FastTarget._together
    monkeypatch.setattr(fast.FastTarget, "_together",
                        lambda self, calls: sizes.append(len(calls)) or together(self, calls))
    gated = Gated(gen)
    gated.gate.clear()  # the first request waits until all four are queued, then all run side by side
    got = {}

    def post(i):
        r = httpx.post(url + "/v1/chat/completions", json=bodies[i], timeout=60)
        got[i] = r.json()["choices"][0]["message"]["content"]

    with serve_in_thread(create_app(gated, parallel=4)) as url:
        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        def all_in():  # the four are queued or admitted (the first may have taken others in with it)
            q = httpx.get(url + "/health").json()["queue"]
            return gated.started.is_set() and q["waiting"] + q["running"] == 4

        assert wait_for(all_in, 30)
        gated.gate.set()
        for t in threads:
            t.join(60)
    assert [got[i] for i in range(4)] == alone
    assert sizes and max(sizes) == 4
