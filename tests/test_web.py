"""Browser test of the web chat page: headless Debian Chromium driven by Playwright.

The page is served by a real uvicorn on a loopback port. The first answer comes from a scripted
generator (real SmolLM2 tokens grouped into rounds with known accepted drafts, so the highlighting
is checked exactly); the second from the tiny random model through the real engine, in vanilla mode.
Chromium comes from Debian (.ci/setup-chromium.sh); without it the test is skipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUT = Path(__file__).resolve().parents[1] / "test-output"

ANSWER = ("Speculative decoding lets a small draft head guess several tokens ahead. The target model then "
          "checks the whole tree of guesses in a single forward pass, keeps the longest accepted path and "
          "adds one token of its own, so the output is exactly what it would have produced alone.")


class ScriptedGenerator:
    """Looks like an Eagle2Generator to the server; replays ANSWER in rounds of k drafted + 1 bonus token."""

    def __init__(self, real, delay: float = 0.03):
        self.real = real
        self.tokenizer = real.tokenizer
        self.model_key = "scripted-smollm2"
        self.head_source = "scripted"
        self.device, self.dtype, self.max_context = "cpu", real.dtype, real.max_context
        self.delay = delay
        self.calls = []

    def encode_prompt(self, prompt):
        return self.real.encode_prompt(prompt)

    def step_together(self, decodes):
        from eagle2.engine import step_together

        return step_together(None, decodes)  # its decodes ask for no target forward

    def end(self, decode):
        decode.close()

    def begin(self, prompt, settings):
        max_new_tokens, method = settings.max_new_tokens, settings.method
        from eagle2.engine import GenerationResult, RoundEvent, Stats

        self.calls.append(method)
        full_ids = self.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
        ids = full_ids[:max_new_tokens]
        stats = Stats()
        result = GenerationResult([], "", stats, "length" if len(full_ids) > max_new_tokens else "stop", list(prompt))
        pattern = [0, 3, 1, 4, 2, 0, 5, 2, 3, 1]  # drafted tokens accepted per round (first = prefill)

        def events():
            t0, i, r = time.perf_counter(), 0, 0
            while i < len(ids):
                k = 0 if method == "vanilla" else min(pattern[r % len(pattern)], len(ids) - i - 1)
                toks = ids[i:i + k + 1]
                draft = self.tokenizer.decode(ids[:i + k])[len(self.tokenizer.decode(ids[:i])):]
                full = self.tokenizer.decode(ids[:i + k + 1])[len(self.tokenizer.decode(ids[:i])):]
                i += k + 1
                r += 1
                time.sleep(self.delay)
                result.token_ids.extend(toks)
                result.text += full
                stats.rounds, stats.new_tokens = r, i
                stats.accept_lengths.append(k)
                stats.seconds = time.perf_counter() - t0
                yield RoundEvent(toks, k, full, draft, stats)

        return events(), result


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: run .ci/setup-chromium.sh (apt-get install chromium)")
    pw_api = pytest.importorskip("playwright.sync_api")
    with pw_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_chat_page_streams_and_highlights_drafts(browser, tiny_chat_generator):
    from eagle2.server import create_app, serve_in_thread

    scripted = ScriptedGenerator(tiny_chat_generator)
    with serve_in_thread(create_app(scripted)) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 820}, device_scale_factor=1)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#status-dot.ok")
        assert "scripted-smollm2" in page.inner_text("#model-name")

        # EAGLE-2: streamed text with accepted drafts highlighted per round
        page.fill("#input", "How does speculative decoding work?")
        page.keyboard.press("Enter")
        first = page.wait_for_selector(".msg.assistant .bubble span")  # something streamed in ...
        assert page.locator(".msg.assistant[data-done]").count() == 0  # ... before the answer finished
        assert first is not None
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=20000)
        bubble = page.locator(".msg.assistant .bubble").first
        assert bubble.inner_text().strip() == ANSWER.strip()
        drafts = page.locator(".msg.assistant .bubble span.draft")
        assert drafts.count() >= 10
        assert page.locator(".msg.assistant .bubble span.bonus").count() >= 10
        assert float(page.inner_text("#stat-tau")) > 1.5
        assert float(page.inner_text("#stat-tps")) > 0
        assert "EAGLE-2" in page.inner_text(".msg.assistant .meta")
        assert scripted.calls == ["eagle2"]
        OUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUT / "web.png"))

        # vanilla: no drafts at all
        page.click("#method-switch button[data-method=vanilla]")
        page.fill("#input", "And without drafting?")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='1']\").length === 2",
                               timeout=20000)
        assert scripted.calls == ["eagle2", "vanilla"]
        last = page.locator(".msg.assistant").last
        assert last.locator("span.draft").count() == 0
        assert last.locator("span.bonus").count() > 10
        assert page.inner_text("#stat-tau") == "1.00"
        assert "vanilla" in last.locator(".meta").inner_text()
        assert not errors, errors
        page.close()


def test_chat_page_real_engine_and_api_key(browser, tiny_chat_generator):
    """The real engine behind the page; the page asks for the key on 401 and works once it is set."""
    from eagle2.server import create_app, serve_in_thread

    with serve_in_thread(create_app(tiny_chat_generator, api_key="s3cret")) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#status-dot.ok")
        assert page.is_visible("#settings")  # auth on, no key yet: settings open
        page.fill("#max-tokens", "12")
        page.dispatch_event("#max-tokens", "change")
        page.fill("#input", "hello")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant.error")
        assert "API key" in page.inner_text(".msg.assistant.error .bubble")
        assert page.evaluate("document.activeElement.id") == "api-key"  # where the fix goes
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        page.fill("#input", "hello")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=20000)
        assert page.inner_text("#stat-tokens") == "12"
        assert page.locator(".msg.assistant[data-done='1'] .bubble span").count() >= 1
        page.close()


def test_page_assets_served(tiny_chat_generator):
    from fastapi.testclient import TestClient

    from eagle2.server import create_app

    c = TestClient(create_app(tiny_chat_generator, api_key="k"), base_url="http://127.0.0.1")
    r = c.get("/")  # the page stays open with a key (the API does not)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "app.js" in r.text
    assert c.get("/static/app.js").status_code == 200
    assert c.get("/static/style.css").status_code == 200


class Recording(ScriptedGenerator):
    """ScriptedGenerator that records the messages of every request and streams slowly."""

    def __init__(self, real):
        super().__init__(real, delay=0.15)
        self.prompts = []

    def encode_prompt(self, prompt):
        self.prompts.append([(m["role"], m["content"]) for m in prompt])
        return super().encode_prompt(prompt)


def _done(page, n: int) -> None:
    page.wait_for_function(f"document.querySelectorAll(\".msg.assistant[data-done='1']\").length === {n}",
                           timeout=20000)


def test_chat_page_history_matches_the_screen(browser, tiny_chat_generator):
    """New chat, Stop and failures leave the conversation the model is sent equal to the one shown."""
    from eagle2.server import create_app, serve_in_thread

    rec = Recording(tiny_chat_generator)
    with serve_in_thread(create_app(rec)) as url:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#status-dot.ok")
        # "New chat" while a reply streams: the new chat's first request carries only its own message
        page.fill("#input", "first")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant .bubble span")
        page.click("#clear-btn")
        page.fill("#input", "  indented\n    code  \n")
        page.keyboard.press("Enter")
        _done(page, 1)
        assert rec.prompts[-1] == [("user", "  indented\n    code")]  # indentation kept, trailing blanks gone
        assert page.locator(".msg").count() == 2
        # Stop before a word came back: the message is taken back (bubble gone, text in the box)
        rec.delay = 2.0
        page.fill("#input", "never mind")
        page.keyboard.press("Enter")
        page.wait_for_selector("#stop:not([hidden])")
        page.click("#stop")
        page.wait_for_selector("#send:not([hidden])")
        assert page.locator(".msg").count() == 2 and page.input_value("#input") == "never mind"
        # an invalid Max tokens sends nothing and keeps the text
        rec.delay = 0.01
        sent = len(rec.prompts)
        page.click("#settings-btn")
        assert page.get_attribute("#settings-btn", "aria-expanded") == "true"
        page.fill("#max-tokens", "0")
        page.click("#send")
        assert len(rec.prompts) == sent and page.input_value("#input") == "never mind"
        assert page.evaluate("document.getElementById('max-tokens').validationMessage")
        page.fill("#max-tokens", "8")
        page.click("#send")
        _done(page, 2)
        assert rec.prompts[-1][-1] == ("user", "never mind") and len(rec.prompts[-1]) == 3
        assert "cut off at Max tokens" in page.locator(".msg.assistant .meta").last.inner_text()
        assert not errors, errors
        page.close()


def test_chat_page_failure_is_not_part_of_the_conversation(browser, tiny_chat_generator):
    from eagle2.server import create_app, serve_in_thread

    rec = Recording(tiny_chat_generator)
    with serve_in_thread(create_app(rec, max_prompt_chars=40)) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#status-dot.ok")
        page.fill("#input", "x" * 60)  # over --max-prompt-chars: a 400
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant.error")
        assert "prompt" in page.inner_text(".msg.assistant.error .error-text")
        assert "not sent" in page.inner_text(".msg.user.unsent .meta")
        assert page.input_value("#input") == "x" * 60  # back in the box, to shorten and send again
        page.fill("#input", "short")
        page.keyboard.press("Enter")
        _done(page, 1)
        assert rec.prompts[-1] == [("user", "short")]  # the refused message is not sent along
        page.close()
