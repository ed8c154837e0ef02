"""Screenshot the web chat page answering a real question with the real model (README's docs/web.png).

Serves the model on a free loopback port, asks one question through the page in headless Debian
Chromium (Playwright), waits for the answer and saves a PNG.

Usage: python tools/screenshot.py [--model smollm2-135m] [--out docs/web.png] [--question "..."]
"""

import argparse
import sys
import warnings

import eagle2
from eagle2.server import create_app, serve_in_thread

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="docs/web.png")
    ap.add_argument("--question", default="How do I reverse a list in Python? Show two ways.")
    ap.add_argument("--max-tokens", type=int, default=160)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from playwright.sync_api import sync_playwright

    gen = eagle2.load(args.model)
    gen.generate("warm up", max_new_tokens=8)
    with serve_in_thread(create_app(gen)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 820}, device_scale_factor=1)
        page.goto(url + "/")
        page.wait_for_selector("#status-dot.ok")
        page.evaluate(f"document.getElementById('max-tokens').value = '{args.max_tokens}'")
        page.fill("#input", args.question)
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=120000)
        page.screenshot(path=args.out)
        print(f"saved {args.out}: {page.inner_text('.msg.assistant .meta')}")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
