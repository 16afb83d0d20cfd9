"""The search page in a real headless browser: Debian's chromium driven by Playwright.

Playwright's own browser download cannot work offline, so the test launches /usr/bin/chromium
through `executable_path` (`make test` installs it where apt is available) and skips cleanly
without it. The screenshot goes to $KARMA_SCREENSHOT when set (the committed one:
KARMA_SCREENSHOT=benchmarks/results/serve_page_cpu.png pytest tests/test_serve_browser.py),
else to the test's tmp dir.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin"),
]
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


@pytest.fixture(scope="module")
def server_url(serve_service, debug_checkpoint: Path):
    """The app on a free loopback port, run by uvicorn in a thread."""
    import uvicorn

    from karma.config import load_config
    from karma.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(None, [f"serve.checkpoint={debug_checkpoint}"])
    server = uvicorn.Server(uvicorn.Config(
        create_app(cfg, serve_service), host="127.0.0.1", port=port, log_level="warning"
    ))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_search_page_shows_results_and_interest(server_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    shot = Path(os.environ.get("KARMA_SCREENSHOT", tmp_path / "serve_page.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server_url + "/")
            # pick a user, add one click through the catalog filter, type a query
            page.wait_for_selector("#user option[value='1']", state="attached")
            page.select_option("#user", "1")
            page.wait_for_selector("#history .chip")
            page.fill("#finder", "Star Wars")
            page.click("#found div >> nth=0")
            page.wait_for_selector("#history .chip.added")
            page.fill("#query", "Comedy")
            page.click("#search")
            page.wait_for_selector("#results .card", timeout=60_000)
            page.wait_for_function("document.getElementById('interest').textContent.length > 0",
                                   timeout=60_000)
            cards = page.locator("#results .card")
            assert cards.count() == 20  # the page's default k
            titles = cards.locator(".title").all_inner_texts()
            clicked = page.text_content("#history .chip.added").removeprefix("+ ")
            assert all(titles) and clicked not in titles  # seen items are hidden
            assert "items in" in page.text_content("#status")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
