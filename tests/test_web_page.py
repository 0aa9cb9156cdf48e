"""The search page in a real browser: headless Chromium driven by Playwright.

Every page runs with all requests to anything but the test's 127.0.0.1 server aborted
(and recorded: a page that tries one fails its test). Screenshots are kept in
test-artifacts/ at the repo root (git-ignored); the layout figures at each width are
printed and kept in test-artifacts/web-page-layout.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.parse
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
from shared.events import ImageUploaded
from shared.pipeline.stages import WorkItem
from tests.conftest import REPO, free_port
from tests.query_api_support import Bird, api_settings, bird_rows, index, pick, upload_item

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
API_KEY = "page-key-0123456789abcdef"
# A phone (iPhone SE/8 class), a tablet in portrait, a laptop.
PHONE = {"width": 375, "height": 667}
TABLET = {"width": 768, "height": 1024}
DESKTOP = {"width": 1280, "height": 800}
LONG_ID = ("uploads/2024/holiday-trip-to-the-northern-coast/day-03-morning/"
           "IMG_20240713_181502_HDR.jpg")


@dataclass
class Site:
    components: Components
    settings: Any
    indexed: list[Bird]
    inline: Bird
    long_id_bird: Bird


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, embedder: Any, mobilenet_weights: Path,
         data_dir: Path, birds: Path) -> Iterator[Site]:
    store = tmp_path_factory.mktemp("page-store")
    settings = api_settings(store, mobilenet_weights, [data_dir], api_warmup=False)
    components = Components.load(settings, embedder=embedder)
    rows = bird_rows(birds)
    indexed = pick(rows, train=2, test=1)
    inline = pick(rows, train=0, test=1, skip_test=1)[0]
    long_bird = pick(rows, train=0, test=1, skip_test=2)[3]
    long_item = WorkItem(LONG_ID, ImageUploaded(
        event_id="test-long", source="tests", image_id=LONG_ID, uri=long_bird.path.as_uri(),
        image_bytes=None, metadata={"label": long_bird.label, "split": "holiday"}))
    index(components, [upload_item(b, n) for n, b in enumerate(indexed)]
          + [upload_item(inline, 999, inline=True), long_item])
    try:
        yield Site(components, settings, indexed, inline, long_bird)
    finally:
        components.close()


@pytest.fixture(scope="module")
def chromium() -> str:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        message = f"Chromium is missing at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM_PATH)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    ARTIFACTS.mkdir(exist_ok=True)
    return CHROMIUM


def in_browser(scenario: Callable[[Any], Awaitable[None]], *,
               viewport: dict[str, int] | None = None, touch: bool = False,
               csp: bool = False) -> None:
    """Run an async scenario with a fresh headless Chromium page. Playwright's async API:
    its sync API runs on greenlets, which must not meet the server thread's garbage
    collector (that crashes the interpreter). The pages' Content-Security-Policy forbids
    eval, which Playwright's wait_for_function needs: it is bypassed unless ``csp``."""
    from playwright.async_api import async_playwright

    async def main() -> None:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context(
                    viewport=viewport or {"width": 1360, "height": 1000},
                    is_mobile=touch, has_touch=touch, bypass_csp=not csp)
                outside: list[str] = []

                async def only_loopback(route: Any) -> None:
                    host = urllib.parse.urlsplit(route.request.url).hostname
                    if host in ("127.0.0.1", None) or route.request.url.startswith(("data:", "blob:")):
                        await route.continue_()
                    else:
                        outside.append(route.request.url)
                        await route.abort()

                await context.route("**/*", only_loopback)
                page = await context.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await scenario(page)
                assert errors == [], f"JavaScript errors on the page: {errors}"
                assert outside == [], f"the page asked for outside addresses: {outside}"
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


async def _card_labels(page: Any) -> list[str]:
    return await page.eval_on_selector_all(
        "#results li.card .label", "els => els.map(e => e.textContent)")


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


async def _open(page: Any, url: str) -> None:
    await page.goto(url + "/")
    await page.wait_for_function(
        "document.querySelector('#stats').textContent.includes('images')")
    # The label list is filled from GET /facets once the count is in.
    await page.wait_for_function("document.querySelector('#label-filter').options.length > 1")


LAYOUT_JS = """() => {
  const cards = [...document.querySelectorAll('#results li.card')];
  const first = cards[0].getBoundingClientRect();
  const columns = cards.filter(c => Math.abs(c.getBoundingClientRect().top - first.top) < 2).length;
  const docs = document.querySelector('.docs-link').getBoundingClientRect();
  return {width: innerWidth, height: innerHeight,
          scrollWidth: document.documentElement.scrollWidth,
          pageHeight: document.documentElement.scrollHeight,
          firstCardTop: Math.round(first.top), firstCardBottom: Math.round(first.bottom),
          columns, cards: cards.length, docsLinkRight: Math.round(docs.right),
          scrollY: scrollY};
}"""


def test_upload_a_photo_then_click_a_result(site: Site, chromium: str) -> None:
    query = site.indexed[31]
    with _serve(site) as server:
        with httpx.Client(base_url=server.url, timeout=60) as api:
            by_upload = api.post("/search", content=query.read(), params={"limit": 24},
                                 headers={"content-type": "image/jpeg"}).json()
            clicked = by_upload["hits"][1]["image_id"]
            by_click = api.get(f"/images/{clicked}/similar", params={"limit": 24}).json()

        async def scenario(page: Any) -> None:
            await _open(page, server.url)
            assert f"{len(site.indexed) + 2} images" in await page.text_content("#stats")

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
            # Labels are shown as stored, so what a person reads is what a filter matches.
            assert (await _card_labels(page))[0] == query.label
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
            # A new search after "Load more" starts at the top of its results.
            await page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            await page.select_option("#limit", "12")
            await page.wait_for_function(
                "document.querySelectorAll('#results li.card').length === 12 && "
                "document.querySelector('#results').dataset.state === 'done'")
            assert await page.evaluate("scrollY") == 0

        in_browser(scenario)


def test_the_first_results_fit_the_first_screen_at_every_width(site: Site, chromium: str) -> None:
    """After a search the first results are on screen with no scrolling, and nothing is
    wider than the screen: phone (two columns at least), tablet, desktop."""
    query = site.indexed[40]
    figures: dict[str, Any] = {}
    with _serve(site) as server:
        for name, viewport, touch in (("phone", PHONE, True), ("tablet", TABLET, True),
                                      ("desktop", DESKTOP, False)):

            async def scenario(page: Any, name: str = name) -> None:
                await _open(page, server.url)
                await page.screenshot(path=str(ARTIFACTS / f"web-page-{name}-start.png"))
                await page.set_input_files("#file-input", str(query.path))
                await _wait_for_results(page)
                await _wait_for_thumbnails(page, 8)
                layout = await page.evaluate(LAYOUT_JS)
                figures[name] = layout
                await page.screenshot(path=str(ARTIFACTS / f"web-page-{name}.png"))
                await page.screenshot(path=str(ARTIFACTS / f"web-page-{name}-full.png"),
                                      full_page=True)
                assert layout["scrollWidth"] <= layout["width"], f"{name}: wider than the screen"
                assert layout["docsLinkRight"] <= layout["width"], f"{name}: header clipped"
                assert layout["scrollY"] == 0
                assert layout["firstCardBottom"] <= layout["height"], \
                    f"{name}: the first result is not wholly on the first screen: {layout}"
                assert layout["columns"] >= 2, f"{name}: one result per row"
                if name == "phone":  # the folded options open in place, within the width
                    await page.click("#options-box summary")
                    await page.wait_for_selector("#label-filter", state="visible")
                    await page.screenshot(path=str(ARTIFACTS / "web-page-phone-options.png"))
                    wide = await page.evaluate("document.documentElement.scrollWidth")
                    assert wide <= layout["width"]

            in_browser(scenario, viewport=viewport, touch=touch)
    print("\npage layout after a search (24 results):")
    for name, f in figures.items():
        print(f"  {name:8} {f['width']}x{f['height']}: first result at {f['firstCardTop']}-"
              f"{f['firstCardBottom']} px, {f['columns']} columns, page {f['pageHeight']} px "
              f"tall, {f['scrollWidth']} px wide")
    (ARTIFACTS / "web-page-layout.json").write_text(json.dumps(figures, indent=2))
    # 24 results on a phone: twelve rows of two, not 11,700 px of one per row.
    assert figures["phone"]["pageHeight"] < 4000


def test_error_empty_and_loading_states(site: Site, chromium: str) -> None:
    query = site.inline  # stored from inline bytes: no source to preview
    with _serve(site) as server:

        async def scenario(page: Any) -> None:
            searches: list[str] = []
            page.on("request", lambda r: searches.append(r.url) if "/search" in r.url else None)
            await _open(page, server.url)

            # Loading: the answer is held back, the page shows placeholders and says so.
            release = asyncio.Event()

            async def slow(route: Any) -> None:
                await asyncio.wait_for(release.wait(), 30)
                await route.continue_()

            await page.route("**/search?*", slow)
            await page.set_input_files("#file-input", str(query.path))
            await page.wait_for_selector("#results[data-state=loading] li.skeleton")
            assert await page.get_attribute("#results", "aria-busy") == "true"
            assert "Searching" in await page.text_content("#timing")
            await page.screenshot(path=str(ARTIFACTS / "web-page-loading.png"))
            release.set()
            await _wait_for_results(page)
            await page.unroute("**/search?*")
            assert await page.get_attribute("#results", "aria-busy") == "false"
            assert await page.is_visible("#more")
            assert (await _card_ids(page))[0] == site.inline.image_id
            await _wait_for_thumbnails(page, 4)
            first_thumb = page.locator("#results li.card .thumb").first
            assert "placeholder" in (await first_thumb.get_attribute("class") or ""), \
                "an inline upload has no readable source: its card shows a placeholder"
            await page.screenshot(path=str(ARTIFACTS / "web-page-placeholder.png"))

            # Empty: a filter nothing matches is not an error, and says how to get out.
            await page.click("#options-box summary") if not await page.is_visible("#filter") else None
            await page.fill("#filter", "label=No_Such_Bird")
            await page.press("#filter", "Enter")
            await page.wait_for_selector("#results[data-state=empty]", state="attached")
            assert await page.is_hidden("#error")
            empty = await page.text_content("#empty")
            assert "No matching images" in empty and "label=No_Such_Bird" in empty
            assert await page.is_hidden("#more")
            await page.screenshot(path=str(ARTIFACTS / "web-page-empty.png"))
            await page.click("#empty button:has-text('Clear the filters')")
            await _wait_for_results(page)
            assert await page.is_hidden("#empty")

            # Error: a file that is not an image. Human words, what to do, no stale controls.
            await page.set_input_files("#file-input", files=[
                {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"not a jpeg"}])
            await page.wait_for_selector("#error:not([hidden])")
            await page.wait_for_selector("#query-frame.unreadable")
            error = await page.text_content("#error")
            assert await page.get_attribute("#error", "data-code") == "undecodable"
            assert "isn’t a photo the service can read" in error
            assert "Choose a JPEG" in error
            for raw in ("Error", "OSError", "API_", "IMAGE_MAX", "not a recognised"):
                assert raw not in error, f"raw text {raw!r} shown: {error}"
            assert await page.is_hidden("#more"), "no Load more that would send the bad file again"
            assert (await page.text_content("#timing")).strip() == ""
            assert await _card_ids(page) == []
            assert await page.is_visible("#error button:has-text('Choose another photo')")
            await page.screenshot(path=str(ARTIFACTS / "web-page-error.png"))
            # Changing an option now must not send the bad file again.
            sent = len(searches)
            await page.select_option("#limit", "12")
            await page.wait_for_timeout(500)
            assert len(searches) == sent

        in_browser(scenario)

    # The same at phone width, with an image over the upload limit.
    big = site.indexed[3]
    with _serve(site, api_max_upload_bytes=64 * 1024) as server:

        async def phone(page: Any) -> None:
            await _open(page, server.url)
            await page.set_input_files("#file-input", files=[
                {"name": "huge.jpg", "mimeType": "image/jpeg",
                 "buffer": big.read() * (1 + 70_000 // len(big.read()))}])
            await page.wait_for_selector("#error:not([hidden])")
            text = await page.text_content("#error")
            assert "too large" in text and "64 KB" in text, text
            assert "API_MAX_UPLOAD_BYTES" not in text
            layout = await page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
            assert layout[0] <= layout[1]
            await page.screenshot(path=str(ARTIFACTS / "web-page-phone-error.png"))

        in_browser(phone, viewport=PHONE, touch=True)


def test_a_label_chosen_from_the_stored_values_returns_only_that_label(
        site: Site, chromium: str) -> None:
    query = site.indexed[10]
    with _serve(site) as server:
        facets = httpx.get(f"{server.url}/facets", params={"key": "label"}, timeout=30).json()
        wanted = next(v for v in facets["values"] if v["value"] != query.label)
        stored = sum(1 for b in [*site.indexed, site.inline, site.long_id_bird]
                     if b.label == wanted["value"])
        assert wanted["count"] == stored

        async def scenario(page: Any) -> None:
            await _open(page, server.url)
            options = await page.eval_on_selector_all(
                "#label-filter option", "els => els.map(e => [e.value, e.textContent])")
            assert [wanted["filter"], f"{wanted['value']} ({wanted['count']})"] in options
            await page.set_input_files("#file-input", str(query.path))
            await _wait_for_results(page)
            assert len(set(await _card_labels(page))) > 1
            await page.click("#options-box summary") if not await page.is_visible("#label-filter") else None
            await page.select_option("#label-filter", wanted["filter"])
            await page.wait_for_function(
                """label => {
                     const labels = [...document.querySelectorAll('#results li.card .label')];
                     return document.querySelector('#results').dataset.state === 'done' &&
                            labels.length > 0 && labels.every(e => e.textContent === label);
                   }""",
                arg=wanted["value"], timeout=60_000)
            labels = await _card_labels(page)
            assert set(labels) == {wanted["value"]} and len(labels) == wanted["count"]
            await page.screenshot(path=str(ARTIFACTS / "web-page-facet.png"))

        in_browser(scenario)


def test_the_first_click_after_typing_a_filter_opens_that_result(site: Site, chromium: str) -> None:
    query = site.indexed[20]
    with _serve(site) as server:

        async def scenario(page: Any) -> None:
            await _open(page, server.url)
            await page.set_input_files("#file-input", str(query.path))
            await _wait_for_results(page)
            target = (await _card_ids(page))[1]
            await page.fill("#filter", f"label={query.label}")  # typed, not applied
            await page.locator(f"#results li.card[data-image-id='{target}'] button").click()
            await page.wait_for_function(
                "id => document.querySelector('#results-title').textContent === `Similar to ${id}`",
                arg=target, timeout=10_000)
            await _wait_for_results(page)
            # The typed filter applies to the search the click started.
            assert set(await _card_labels(page)) == {query.label}

            # The keyboard works the same: a result is a button with a name that says what
            # it is; Enter opens it.
            third = page.locator("#results li.card button").nth(2)
            name = await third.get_attribute("aria-label")
            third_id = await page.locator("#results li.card").nth(2).get_attribute("data-image-id")
            assert third_id in name and "score" in name
            await third.focus()
            await page.keyboard.press("Enter")
            await page.wait_for_function(
                "id => document.querySelector('#results-title').textContent === `Similar to ${id}`",
                arg=third_id, timeout=10_000)

        in_browser(scenario)


def test_long_ids_keep_their_file_name(site: Site, chromium: str) -> None:
    with _serve(site) as server:

        async def scenario(page: Any) -> None:
            await _open(page, server.url)
            await page.set_input_files("#file-input", str(site.long_id_bird.path))
            await _wait_for_results(page)
            card = page.locator(f"#results li.card[data-image-id='{LONG_ID}']")
            assert await card.count() == 1
            parts = await card.evaluate("""li => {
                const head = li.querySelector('.id-head'), tail = li.querySelector('.id-tail');
                return {title: li.querySelector('.id').title, tail: tail.textContent,
                        tailCut: tail.scrollWidth > tail.clientWidth,
                        headCut: head.scrollWidth > head.clientWidth};
            }""")
            assert parts["title"] == LONG_ID, "the whole id on hover"
            assert "IMG_20240713_181502_HDR.jpg".endswith(parts["tail"])
            assert len(parts["tail"]) >= 16 and parts["tail"].endswith("_HDR.jpg")
            assert parts["headCut"] and not parts["tailCut"], parts
            # A long press shows it whole, and does not open the result.
            button = card.locator("button")
            await button.dispatch_event("pointerdown", {"pointerType": "touch", "isPrimary": True})
            await page.wait_for_timeout(700)
            await button.dispatch_event("pointerup", {"pointerType": "touch", "isPrimary": True})
            await button.dispatch_event("click")
            assert "show-id" in (await card.get_attribute("class") or "")
            assert "Results for" in await page.text_content("#results-title")
            await card.scroll_into_view_if_needed()
            await page.screenshot(path=str(ARTIFACTS / "web-page-phone-long-id.png"))

        in_browser(scenario, viewport=PHONE, touch=True)


def test_api_docs_render_with_every_outside_request_blocked(site: Site, chromium: str) -> None:
    with _serve(site) as server:
        operations = len([op for path in httpx.get(f"{server.url}/openapi.json", timeout=30)
                          .json()["paths"].values() for op in path])

        async def scenario(page: Any) -> None:
            refused: list[str] = []
            page.on("console", lambda m: refused.append(m.text) if "Content Security Policy"
                    in m.text else None)
            await page.goto(server.url + "/docs")
            await page.wait_for_selector(".opblock", timeout=30_000)
            shown = await page.eval_on_selector_all(".opblock", "els => els.length")
            assert shown == operations
            assert await page.is_visible("text=/facets")
            await page.screenshot(path=str(ARTIFACTS / "api-docs-swagger.png"))
            await page.goto(server.url + "/redoc")
            await page.wait_for_selector("[data-section-id^='tag/']", timeout=30_000)
            await page.wait_for_selector("h2:has-text('Find stored images that look like the uploaded one')")
            await page.screenshot(path=str(ARTIFACTS / "api-docs-redoc.png"))
            # ReDoc always shows Redocly's logo from its CDN; the page's policy stops it in
            # the browser, before any request.
            assert all("cdn.redoc.ly" in text for text in refused), refused
            refused.clear()
            # The search page works under its own policy (nothing inline, nothing outside).
            await page.goto(server.url + "/")
            await page.wait_for_selector("#label-filter option:nth-child(2)", state="attached")
            await page.set_input_files("#file-input", str(site.indexed[2].path))
            await page.wait_for_selector("#results[data-state=done] li.card")
            assert refused == [], refused

        in_browser(scenario, csp=True)


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
            await page.wait_for_function(
                "document.querySelector('#label-filter').options.length > 1")
            await page.set_input_files("#file-input", str(query.path))
            await _wait_for_results(page)
            assert (await _card_ids(page))[0] == query.image_id
            await _wait_for_thumbnails(page, 6)
            assert await _placeholders(page) == 0, "thumbnails must load with the key too"
            await page.screenshot(path=str(ARTIFACTS / "web-page-api-key.png"))

        in_browser(scenario)
