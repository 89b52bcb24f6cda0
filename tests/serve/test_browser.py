"""The web page at / in a real headless Chromium (Debian's, driven by Playwright): load it, submit a prompt, watch the
streamed text appear and the token count reach the requested number; the text equals the API's greedy answer.

Skips on a developer machine without a Chromium binary; in CI (CI=true, where scripts/ci/serve.sh installs Debian's
chromium) a missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil

import pytest

playwright = pytest.importorskip("playwright.sync_api")

CANDIDATES = [os.environ.get("CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")]
CHROMIUM = next((c for c in CANDIDATES if c and os.path.exists(c)), None)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="no Chromium binary (apt-get install chromium)")
def test_page_streams_a_completion(server):
    n = 200  # enough decoding time that the page shows partial text before the answer is complete
    expected = server.post("/v1/completions", {"prompt": "Once upon", "max_tokens": n, "temperature": 0}).json()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('DecodingSession')")
            page.fill("#prompt", "Once upon")
            page.wait_for_function("document.getElementById('prompt-tokens').textContent === '10'")  # BOS + 9 bytes
            page.fill("#max_tokens", str(n))
            page.fill("#temperature", "0")
            # every change of the output: (its length, the status line) at that moment
            page.evaluate("""window.seen = []; new MutationObserver(records => records.forEach(() => window.seen.push(
                [document.getElementById('output').textContent.length, document.getElementById('status').textContent])))
                .observe(document.getElementById('output'), {childList: true, characterData: true, subtree: true})""")
            page.click("#submit")
            page.wait_for_function("document.getElementById('status').textContent === '(done)'", timeout=60000)
            final = page.text_content("#output")
            assert final == expected["choices"][0]["text"] and page.text_content("#error") == ""
            assert page.text_content("#token-count") == str(n)
            seen = page.evaluate("window.seen")
            partial = [length for length, status in seen if 0 < length < len(final) and status == "(streaming)"]
            assert partial, seen  # text was on the page while the answer was still streaming
        finally:
            browser.close()
