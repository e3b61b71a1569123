"""The search page of ``crossmodal serve`` in a real browser (Chromium driven by Playwright).

A small real index (60 generated images, 180 captions, the bundled crossmodal-demo model) is served
by a real ``python -m retrieval serve`` subprocess on a free loopback port. Every check compares what
the page shows with what the API itself answers for the same request, and any console error or
warning, uncaught exception, failed request or 4xx/5xx answer the test did not provoke fails it.

Chromium: ``$CROSSMODAL_CHROMIUM`` or ``chromium`` on PATH (Debian's package; Playwright's own browser
download is not needed). Without one the tests skip, except under CI (``$CI`` set), where they fail.
Screenshots go to ``$CROSSMODAL_ARTIFACTS`` (else the test's tmp folder); with
``CROSSMODAL_DOCS_SCREENSHOT=1`` the search screenshot is also saved as ``docs/serve.jpg``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

try:
    from playwright import sync_api
except ImportError:  # the test extra installs it
    if os.environ.get("CI"):
        raise
    pytest.skip("the playwright package is not installed (pip install -e '.[test]')", allow_module_level=True)
expect = sync_api.expect

REPO = Path(__file__).resolve().parents[1]
QUERY = "a yellow hexagon in the top right corner"
TIMEOUT_MS = 20_000  # for one thing to appear on the page; a loaded CI machine is slow, never this slow
VISIBLE_IMAGES = """() => {
  const imgs = [...document.querySelectorAll('#results .hit img')].filter((img) => {
    const r = img.getBoundingClientRect();
    return r.width > 0 && r.bottom > 0 && r.top < window.innerHeight;
  });
  if (!imgs.length || !imgs.every((img) => img.complete)) return null;
  return imgs.map((img) => [img.closest('.hit').dataset.id, img.naturalWidth]);
}"""
IMAGE_LOADED = "(img) => img.complete && img.naturalWidth > 0"


def chromium() -> str:
    found = os.environ.get("CROSSMODAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not Path(found).exists():
        message = "no Chromium for the browser tests: install Debian's chromium or set CROSSMODAL_CHROMIUM"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_cli(*args, env):
    proc = subprocess.run([sys.executable, "-m", "retrieval", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def quiet_env(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp / "cache"),
            "CROSSMODAL_RUNTIME_DIR": str(tmp / "run"), "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the API, called directly ----------------------------------------------------------------------

def http(base: str, path: str, body: dict | None = None, *, data: bytes | None = None, headers=None):
    headers = dict(headers or {})
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(base + path, data=data, headers=headers, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def http_error(base: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    with pytest.raises(urllib.error.HTTPError) as caught:
        http(base, path, body)
    return caught.value.code, json.loads(caught.value.read())


def upload(base: str, image: bytes, filename: str, **fields) -> dict:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    data = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return http(base, "/api/search", data=data, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def ids(answer: dict) -> list[int]:
    return [hit["id"] for hit in answer["hits"]]


# -- the server ------------------------------------------------------------------------------------

@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def start_server(tmp: Path, *args, attempts: int = 3) -> Server:
    """``python -m retrieval serve ARGS --port P`` on a free loopback port, once /healthz answers."""
    for attempt in range(attempts):
        port = free_port()
        log = tmp / f"serve-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "retrieval", "serve", *map(str, args), "--host",
                                     "127.0.0.1", "--port", str(port), "--cache-dir", tmp / "thumbs"],
                                    stdout=out, stderr=subprocess.STDOUT, env=quiet_env(tmp), cwd=REPO)
        server = Server(f"http://127.0.0.1:{port}", proc, log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if http(server.base, "/healthz").get("status") == "ok":
                    return server
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(0.1)  # polling a starting process, not waiting on the page
        server.stop()
        said = log.read_text(errors="replace")
        if "address already in use" not in said.lower() or attempt == attempts - 1:
            pytest.fail(f"crossmodal serve did not become healthy (exit {proc.returncode}):\n{said}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("browser")
    env = quiet_env(tmp)
    run_cli("data", "synth", "--out", tmp / "corpus", "--n", 60, "--seed", 5, "--test", 60, "--val", 0, env=env)
    run_cli("index", tmp / "corpus" / "test", "--index", tmp / "index", "--model", "crossmodal-demo",
            "--no-progress", env=env)
    return {"tmp": tmp, "images": tmp / "corpus" / "test", "index": tmp / "index"}


@pytest.fixture(scope="module")
def server(corpus, request):
    served = start_server(corpus["tmp"], "--index", corpus["index"])
    request.addfinalizer(served.stop)
    return served


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    args = ["--disable-dev-shm-usage"] + (["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=args)
        yield launched
        launched.close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("CROSSMODAL_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Watched:
    """A page whose console errors and warnings, uncaught exceptions and failed requests are kept."""

    def __init__(self, page, base: str):
        self.page, self.base = page, base
        self.problems: list[str] = []
        self.allowed: list[str] = []  # URL parts of requests a test expects to fail (4xx on purpose)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"uncaught exception: {exc}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def _console(self, message) -> None:
        if message.type not in ("error", "warning"):
            return
        text = message.text
        if self.allowed and text.startswith("Failed to load resource: the server responded with a status of 4"):
            return  # the browser's own line for an answer this test provoked (checked in _response)
        self.problems.append(f"console {message.type}: {text} ({message.location.get('url')})")

    def _failed(self, request) -> None:
        if "ERR_ABORTED" not in (request.failure or ""):  # a picture replaced while loading is not a fault
            self.problems.append(f"request failed: {request.url} {request.failure}")

    def _response(self, response) -> None:
        if response.status >= 400 and not any(part in response.url for part in self.allowed):
            self.problems.append(f"HTTP {response.status} for {response.url}")

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)


@pytest.fixture
def watched(browser, server, artifacts, request):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light",
                                  accept_downloads=False)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    watched = Watched(page, server.base)
    yield watched
    try:
        page.screenshot(path=str(artifacts / f"{request.node.name}.png"))
    finally:
        context.close()
    watched.check()


# -- helpers on the page ---------------------------------------------------------------------------

def open_page(watched: Watched, query: str = ""):
    page = watched.page
    page.goto(watched.base + "/" + query)
    expect(page.locator("html")).to_have_attribute("data-ready", "true")
    return page


def results(page, to: str, kind: str):
    """Wait until the results of a finished search to ``to`` by a ``kind`` query are on the page."""
    done = page.locator(f'#results[data-state="ready"][data-to="{to}"][data-query-kind="{kind}"]')
    expect(done).to_be_visible()
    return page.locator("#results .hit")


def shown_ids(page) -> list[int]:
    return page.eval_on_selector_all("#results .hit", "nodes => nodes.map((n) => Number(n.dataset.id))")


def visible_thumbnails_load(page) -> list:
    loaded = page.wait_for_function(VISIBLE_IMAGES, timeout=TIMEOUT_MS).json_value()
    broken = [hit for hit, width in loaded if width <= 0]
    assert loaded and not broken, f"thumbnails that did not load: {broken}"
    return loaded


def text_search(page, text: str) -> dict:
    """Type a query, press Enter; the page's own first-page request (checked for its fields) is returned."""
    page.locator("#q").fill(text)
    with page.expect_request(new_search) as caught:
        page.locator("#q").press("Enter")
    body = caught.value.post_data_json
    assert body["text"] == text and body["offset"] == 0
    return body


def detail_src(thumb: str, base: str, size: int = 1024) -> str:
    """The detail view's image: the hit's thumbnail URL at ``size``."""
    return f"{base}{thumb}&size={size}"


def new_search(request) -> bool:
    """A request for the first page of a search (not the next page that scrolling asks for)."""
    if not (request.url.endswith("/api/search") and request.method == "POST"):
        return False
    if "multipart/form-data" in (request.headers.get("content-type") or ""):
        return True  # Chromium does not show an upload's body; the tests ask for no next page meanwhile
    return (request.post_data_json or {}).get("offset") == 0


def read(path: Path) -> bytes:
    return path.read_bytes()


def data_transfer(page, image: bytes, name: str):
    return page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: 'image/png' }));
            return transfer;
        }""",
        [base64.b64encode(image).decode(), name],
    )


# -- the tests -------------------------------------------------------------------------------------

def test_text_search_shows_the_apis_ranking_with_loaded_thumbnails_and_pages_on(watched, artifacts):
    page = open_page(watched)
    expect(page.locator("#welcome")).to_be_visible()
    expect(page.locator("#welcome-counts")).to_contain_text("60 images")
    expect(page.locator("#index-picker-wrap")).to_be_hidden()  # one index: no picker
    expect(page.locator("#q")).to_be_focused()

    sent = text_search(page, QUERY)
    assert sent["to"] == "image"
    first_page = http(watched.base, "/api/search", sent)
    assert first_page["has_more"] and len(first_page["hits"]) == sent["k"] < 60
    hits = results(page, "image", "text")
    expect(hits.first).to_have_attribute("data-id", str(first_page["hits"][0]["id"]))
    assert shown_ids(page)[: sent["k"]] == ids(first_page)
    visible_thumbnails_load(page)
    expect(page.locator("#status")).to_contain_text(" ms")
    expect(page).to_have_url(f"{watched.base}/?q={QUERY.replace(' ', '+')}&to=image")

    page.locator(".hit").nth(1).hover()
    page.screenshot(path=str(artifacts / "serve.png"), animations="disabled")
    if os.environ.get("CROSSMODAL_DOCS_SCREENSHOT"):  # the README's picture
        (REPO / "docs").mkdir(exist_ok=True)  # JPEG: the noisy demo pictures make a PNG of it 1 MB
        Image.open(artifacts / "serve.png").convert("RGB").save(REPO / "docs" / "serve.jpg", quality=82,
                                                                 optimize=True, progressive=True)

    # Paging: scrolling to the end loads the rest, in the API's order, and then stops.
    second_page = http(watched.base, "/api/search", {**sent, "offset": sent["k"]})
    page.locator("#sentinel").scroll_into_view_if_needed()
    expect(hits).to_have_count(60)
    assert shown_ids(page) == ids(first_page) + ids(second_page)
    assert not second_page["has_more"]
    expect(page.locator("#load-more")).to_be_hidden()
    expect(page.locator("#status")).to_contain_text("60 images")
    visible_thumbnails_load(page)
    watched.check()


def test_text_results_are_cards_that_open_their_image(watched):
    page = open_page(watched)
    sent = text_search(page, QUERY)
    results(page, "image", "text")
    with page.expect_request(new_search) as caught:
        page.locator("#target-texts").click()
    body = caught.value.post_data_json
    assert body["to"] == "text" and body["text"] == QUERY and body["k"] == sent["k"]
    expect(page.locator("#target-texts")).to_have_attribute("aria-pressed", "true")
    cards = results(page, "text", "text")
    answer = http(watched.base, "/api/search", body)
    assert page.locator("#results .text-hit").count() >= 1
    assert shown_ids(page)[: body["k"]] == ids(answer)
    top = answer["hits"][0]
    expect(cards.first.locator(".card-text")).to_have_text(top["text"])
    expect(cards.first.locator(".badge")).to_have_text(top["kind"])
    visible_thumbnails_load(page)

    cards.first.locator("a.open").click()
    detail = page.locator("#detail")
    expect(detail).to_be_visible()
    expect(page.locator("#detail-img")).to_have_attribute("src", detail_src(top["thumb"], watched.base))
    page.wait_for_function(f"() => ({IMAGE_LOADED})(document.querySelector('#detail-img'))")
    expect(page.locator("#detail-captions li.current")).to_have_text(top["text"])
    expect(page.locator("#detail-captions li")).to_have_count(len(top["captions"]))
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()
    watched.check()


def test_an_image_dropped_pasted_or_picked_is_the_query(watched, corpus):
    page = open_page(watched)
    images = sorted(corpus["images"].glob("*.png"))[:3]

    # Drag and drop anywhere on the page: the overlay shows, then image -> image results.
    dropped = read(images[0])
    transfer = data_transfer(page, dropped, images[0].name)
    page.dispatch_event("main", "dragenter", {"dataTransfer": transfer})
    expect(page.locator("#drop-overlay")).to_be_visible()
    with page.expect_request(new_search) as caught:
        page.dispatch_event("main", "drop", {"dataTransfer": transfer})
    expect(page.locator("#drop-overlay")).to_be_hidden()
    assert "multipart/form-data" in caught.value.headers["content-type"]
    hits = results(page, "image", "image")
    answer = upload(watched.base, dropped, images[0].name, to="image", k=30, offset=0)
    assert shown_ids(page)[:30] == ids(answer)
    assert answer["hits"][0]["path"] == images[0].name  # the image itself, first
    expect(hits.first.locator("img")).to_have_attribute("alt", answer["hits"][0]["captions"][0])
    expect(page.locator("#query-chip")).to_be_visible()
    expect(page.locator("#query-chip-label")).to_have_text(images[0].name)
    page.wait_for_function(f"() => ({IMAGE_LOADED})(document.querySelector('#query-chip-img'))")
    visible_thumbnails_load(page)

    # The same image to captions: text cards, as the API ranks them.
    page.locator("#target-texts").click()
    results(page, "text", "image")
    assert shown_ids(page)[:30] == ids(upload(watched.base, dropped, images[0].name, to="text", k=30, offset=0))
    page.locator("#target-images").click()
    results(page, "image", "image")

    # The file picker (button -> hidden input).
    with page.expect_file_chooser() as chooser:
        page.locator("#pick-image").click()
    chooser.value.set_files(images[1])
    expect(page.locator("#query-chip-label")).to_have_text(images[1].name)
    hits = results(page, "image", "image")
    expect(hits.first).to_have_attribute("data-id", str(upload(watched.base, read(images[1]), images[1].name,
                                                               to="image", k=30, offset=0)["hits"][0]["id"]))

    # Ctrl+V of an image: a paste event carrying the file.
    page.evaluate("(transfer) => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer, "
                  "bubbles: true, cancelable: true}))", data_transfer(page, read(images[2]), images[2].name))
    expect(page.locator("#query-chip-label")).to_have_text(images[2].name)
    hits = results(page, "image", "image")
    answer = upload(watched.base, read(images[2]), images[2].name, to="image", k=30, offset=0)
    expect(hits.first).to_have_attribute("data-id", str(answer["hits"][0]["id"]))
    assert shown_ids(page)[:30] == ids(answer)

    # Clearing the image query goes back to the start.
    page.locator("#query-chip-clear").click()
    expect(page.locator("#welcome")).to_be_visible()
    expect(page.locator("#query-chip")).to_be_hidden()
    watched.check()


def test_more_like_this_and_the_detail_view_by_keyboard(watched):
    page = open_page(watched)
    text_search(page, QUERY)
    first = results(page, "image", "text").first
    first_id = int(first.get_attribute("data-id"))
    first.hover()
    with page.expect_request(new_search) as caught:
        first.locator(".more-like-this").click()
    body = caught.value.post_data_json
    assert body["item"] == first_id and body["to"] == "image"
    results(page, "image", "item")
    answer = http(watched.base, "/api/search", body)
    assert shown_ids(page)[: body["k"]] == ids(answer)
    assert first_id not in ids(answer)  # more like it: the item itself is left out
    expect(page.locator("#query-chip")).to_be_visible()
    expect(page).to_have_url(f"{watched.base}/?item={first_id}&to=image")
    visible_thumbnails_load(page)

    # Tab from the search box reaches the results; Enter opens the detail view.
    page.locator("#q").focus()
    for _ in range(15):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.matches('#results .hit a.open')"):
            break
    focused = page.evaluate("() => Number(document.activeElement.closest('.hit')?.dataset.id)")
    assert focused == answer["hits"][0]["id"], "Tab did not reach the first result"
    page.keyboard.press("Enter")
    detail = page.locator("#detail")
    expect(detail).to_be_visible()
    expect(detail).to_have_attribute("data-id", str(answer["hits"][0]["id"]))
    big = page.locator("#detail-img")
    expect(big).to_have_attribute("src", detail_src(answer["hits"][0]["thumb"], watched.base))
    page.wait_for_function(f"() => ({IMAGE_LOADED})(document.querySelector('#detail-img'))")
    item = http(watched.base, f"/api/items/{answer['hits'][0]['id']}?index={answer['index']}")
    expect(page.locator("#detail-captions li")).to_have_text([c["text"] for c in item["captions"]])
    expect(page.locator("#detail-size")).to_contain_text(f"{item['width']} × {item['height']} px")
    expect(page.locator("#detail-path")).to_contain_text(item["path"])
    expect(page.locator("#detail-file")).to_have_attribute("href", item["file"])
    assert page.request.get(watched.base + item["file"]).body() == (Path(item["root"]) / item["path"]).read_bytes()

    # Arrow keys move between results; Esc closes and gives the focus back to the result.
    page.keyboard.press("ArrowRight")
    expect(detail).to_have_attribute("data-id", str(answer["hits"][1]["id"]))
    expect(big).to_have_attribute("src", detail_src(answer["hits"][1]["thumb"], watched.base))
    page.wait_for_function(f"() => ({IMAGE_LOADED})(document.querySelector('#detail-img'))")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowRight")
    expect(detail).to_have_attribute("data-id", str(answer["hits"][1]["id"]))
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()
    expect(page.locator(f'#results .hit[data-id="{answer["hits"][1]["id"]}"] a.open')).to_be_focused()

    # "More like this" inside the detail view, then the back button returns to the first search.
    page.keyboard.press("Enter")
    expect(detail).to_be_visible()
    with page.expect_request(new_search) as caught:
        page.locator("#detail-more").click()
    assert caught.value.post_data_json["item"] == answer["hits"][1]["id"]
    expect(detail).to_be_hidden()
    results(page, "image", "item")
    expect(page).to_have_url(f"{watched.base}/?item={answer['hits'][1]['id']}&to=image")
    page.go_back()
    expect(page).to_have_url(f"{watched.base}/?item={first_id}&to=image")
    results(page, "image", "item")
    expect(page.locator("#results .hit").first).to_have_attribute("data-id", str(answer["hits"][0]["id"]))
    watched.check()


def test_the_servers_error_message_is_shown(watched):
    code, said = http_error(watched.base, "/api/search", {"item": 999999, "to": "image", "k": 30, "offset": 0})
    assert 400 <= code < 500 and said["error"]
    watched.allowed.append("/api/search")
    page = open_page(watched, "?item=999999&to=image")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_have_text(said["error"])
    expect(page.locator('#results[data-state="error"]')).to_be_attached()
    page.locator("#error-close").click()
    expect(page.locator("#error")).to_be_hidden()
    # A good search afterwards clears the error state.
    text_search(page, QUERY)
    results(page, "image", "text")
    visible_thumbnails_load(page)
    watched.check()


def test_a_token_server_asks_to_log_in_and_the_picker_lists_its_indexes(browser, corpus, artifacts):
    token = "s3cret-" + uuid.uuid4().hex[:8]
    served = start_server(corpus["tmp"], "--index", f"shapes={corpus['index']}", "--index",
                          f"again={corpus['index']}", "--token", token)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        watched = Watched(page, served.base)
        watched.allowed += ["/api/indexes", "/api/login"]
        page.goto(served.base + "/")
        login = page.locator("#login")
        expect(login).to_be_visible()
        page.locator("#login-token").fill("wrong")
        page.locator("#login-token").press("Enter")
        expect(page.locator("#login-error")).to_be_visible()
        expect(login).to_be_visible()
        page.locator("#login-token").fill(token)
        page.locator("#login-submit").click()
        expect(login).to_be_hidden()
        expect(page.locator("html")).to_have_attribute("data-ready", "true")

        picker = page.locator("#index-picker")
        expect(picker).to_be_visible()
        expect(picker.locator("option")).to_have_count(2)
        expect(picker.locator("option").first).to_contain_text("60 images")
        text_search(page, QUERY)
        results(page, "image", "text")
        visible_thumbnails_load(page)  # the thumbnails ride on the login cookie
        with page.expect_request(new_search) as caught:
            picker.select_option("again")
        assert caught.value.post_data_json["index"] == "again"
        hits = results(page, "image", "text")
        expect(hits.first.locator("img")).to_have_attribute("src", re.compile(r"[?&]index=again(&|$)"))
        visible_thumbnails_load(page)
        page.screenshot(path=str(artifacts / "login-and-picker.png"))
        watched.check()
    finally:
        context.close()
        served.stop()
