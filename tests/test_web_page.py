"""The search page in a real browser: headless Chromium driven by Playwright.

Screenshots are kept in test-artifacts/ at the repo root (git-ignored).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from query_api.app import create_app
from query_api.server import BackgroundServer
from shared.components import Components
from tests.conftest import REPO, free_port
from tests.query_api_support import Bird, api_settings, bird_rows, index, pick, upload_item

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
API_KEY = "page-key-0123456789abcdef"


@dataclass
class Site:
    components: Components
    settings: Any
    indexed: list[Bird]
    inline: Bird


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, embedder: Any, mobilenet_weights: Path,
         data_dir: Path, birds: Path) -> Iterator[Site]:
    store = tmp_path_factory.mktemp("page-store")
    settings = api_settings(store, mobilenet_weights, [data_dir], api_warmup=False)
    components = Components.load(settings, embedder=embedder)
    rows = bird_rows(birds)
    indexed = pick(rows, train=2, test=1)
    inline = pick(rows, train=0, test=1, skip_test=1)[0]
    index(components, [upload_item(b, n) for n, b in enumerate(indexed)]
          + [upload_item(inline, 999, inline=True)])
    try:
        yield Site(components, settings, indexed, inline)
    finally:
        components.close()


@pytest.fixture(scope="module")
def chromium() -> str:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        message = f"Chromium is missing at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM_PATH)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def in_browser(scenario: Callable[[Any], Awaitable[None]]) -> None:
    """Run an async scenario with a fresh headless Chromium page. Playwright's async API:
    its sync API runs on greenlets, which must not meet the server thread's garbage
    collector (that crashes the interpreter)."""
    from playwright.async_api import async_playwright

    async def main() -> None:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1360, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await scenario(page)
                assert errors == [], f"JavaScript errors on the page: {errors}"
            finally:
                await browser.close()

    asyncio.run(main())


def _serve(site: Site, **overrides: Any) -> BackgroundServer:
    settings = site.settings.model_copy(update={"api_port": free_port(), **overrides})
    return BackgroundServer(create_app(site.components, settings=settings),
                            port=settings.api_port)


async def _card_ids(page: Any) -> list[str]:
    return await page.eval_on_selector_all(
        "#results li.card", "els => els.map(e => e.dataset.imageId)")


async def _wait_for_results(page: Any) -> None:
    await page.wait_for_selector("#results[data-state=done]", timeout=60_000)


async def _wait_for_thumbnails(page: Any, n: int) -> None:
    """The first n cards have either a loaded picture or their placeholder."""
    await page.wait_for_function(
        """n => [...document.querySelectorAll('#results li.card')].slice(0, n).every(li => {
               const img = li.querySelector('img'), thumb = li.querySelector('.thumb');
               return thumb.classList.contains('placeholder') ||
                      (img && img.complete && img.naturalWidth > 0);
           })""",
        arg=n, timeout=60_000,
    )


async def _placeholders(page: Any) -> int:
    return await page.eval_on_selector_all("#results .thumb.placeholder", "els => els.length")


def test_upload_a_photo_then_click_a_result(site: Site, chromium: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    query = site.indexed[31]
    with _serve(site) as server:
        with httpx.Client(base_url=server.url, timeout=60) as api:
            by_upload = api.post("/search", content=query.read(), params={"limit": 24},
                                 headers={"content-type": "image/jpeg"}).json()
            clicked = by_upload["hits"][1]["image_id"]
            by_click = api.get(f"/images/{clicked}/similar", params={"limit": 24}).json()

        async def scenario(page: Any) -> None:
            await page.goto(server.url + "/")
            await page.wait_for_function(
                "document.querySelector('#stats').textContent.includes('images')")
            assert f"{len(site.indexed) + 1} images" in await page.text_content("#stats")

            await page.set_input_files("#file-input", str(query.path))
            await _wait_for_results(page)
            shown = await _card_ids(page)
            assert shown[0] == query.image_id, "the photo itself should come first"
            assert shown == [h["image_id"] for h in by_upload["hits"]]
            first_score = await page.locator("#results li.card .value").first.text_content()
            assert first_score == f"{by_upload['hits'][0]['score']:.3f}"
            await _wait_for_thumbnails(page, 12)
            assert await _placeholders(page) == 0, "indexed birds have readable file:// sources"
            assert "Results for" in await page.text_content("#results-title")
            assert "embed" in await page.text_content("#timing")
            await page.screenshot(path=str(ARTIFACTS / "web-page-upload.png"), full_page=True)

            await page.locator(f"#results li.card[data-image-id='{clicked}'] button").click()
            await page.wait_for_function(
                "id => document.querySelector('#results-title').textContent === `Similar to ${id}`",
                arg=clicked)
            await _wait_for_results(page)
            similar = await _card_ids(page)
            assert similar == [h["image_id"] for h in by_click["hits"]]
            assert clicked not in similar
            await _wait_for_thumbnails(page, 12)
            await page.screenshot(path=str(ARTIFACTS / "web-page-similar.png"), full_page=True)

            await page.click("#more")
            await page.wait_for_function(
                "document.querySelectorAll('#results li.card').length === 48")
            assert len(set(await _card_ids(page))) == 48

            await page.fill("#filter", f"label={query.label}")
            await page.press("#filter", "Enter")
            await page.wait_for_function(
                """label => {
                     const labels = [...document.querySelectorAll('#results li.card .label')];
                     return labels.length > 0 &&
                            labels.every(e => e.textContent === label.replaceAll('_', ' '));
                   }""",
                arg=query.label, timeout=60_000)

        in_browser(scenario)


def test_placeholder_and_errors(site: Site, chromium: str) -> None:
    with _serve(site) as server:

        async def scenario(page: Any) -> None:
            await page.goto(server.url + "/")
            await page.set_input_files("#file-input", str(site.inline.path))
            await _wait_for_results(page)
            assert (await _card_ids(page))[0] == site.inline.image_id
            await _wait_for_thumbnails(page, 4)
            first_thumb = page.locator("#results li.card .thumb").first
            assert "placeholder" in (await first_thumb.get_attribute("class") or ""), \
                "an inline upload has no readable source: its card shows a placeholder"
            await page.screenshot(path=str(ARTIFACTS / "web-page-placeholder.png"))

            await page.set_input_files("#file-input", files=[
                {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"not a jpeg"}])
            await page.wait_for_selector("#error:not([hidden])")
            assert "undecodable" in await page.text_content("#error")

        in_browser(scenario)


def test_the_page_asks_for_an_api_key(site: Site, chromium: str) -> None:
    query = site.indexed[5]
    with _serve(site, api_keys=[SecretStr(API_KEY)]) as server:

        async def scenario(page: Any) -> None:
            await page.goto(server.url + "/")
            await page.wait_for_selector("#key-dialog[open]")
            await page.fill("#key-input", API_KEY)
            await page.click("#key-form button.primary")
            await page.wait_for_function(
                "document.querySelector('#stats').textContent.includes('images')")
            await page.set_input_files("#file-input", str(query.path))
            await _wait_for_results(page)
            assert (await _card_ids(page))[0] == query.image_id
            await _wait_for_thumbnails(page, 6)
            assert await _placeholders(page) == 0, "thumbnails must load with the key too"
            await page.screenshot(path=str(ARTIFACTS / "web-page-api-key.png"))

        in_browser(scenario)
