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
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from indexer.synth import stamp_photo_meta

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
PHOTO = {"taken_at": "2023-06-14T18:03:51", "camera_make": "Canon", "camera_model": "Canon EOS R5",
         "gps_lat": 48.8584, "gps_lon": 2.2945}


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
    for path in sorted((tmp / "corpus" / "test").glob("*.jpg"))[:2]:  # two photos with a camera, a date, a place
        stamp_photo_meta(path, taken_at=PHOTO["taken_at"], make=PHOTO["camera_make"], model=PHOTO["camera_model"],
                         gps=(PHOTO["gps_lat"], PHOTO["gps_lon"]))
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


def sent_by(page, action) -> dict:
    """The JSON body of the first-page search request that ``action()`` makes the page send."""
    with page.expect_request(new_search) as caught:
        action()
    return caught.value.post_data_json


def answered(page, **data) -> None:
    """Wait until a finished search's results are on the page, its ``#results`` carrying these data
    attributes (``terms``: the feedback chips its query had; ``mode``; ``query_kind``; ``to``)."""
    marks = "".join(f'[data-{name.replace("_", "-")}="{value}"]' for name, value in data.items())
    expect(page.locator(f'#results[data-state="ready"]{marks}')).to_be_visible()


def page_url(base: str, query: str = QUERY, **params) -> str:
    """The page's URL for a words search, then ``params`` in the order given."""
    return f"{base}/?" + urllib.parse.urlencode({"q": query, "to": "image", **params}, safe="*,")


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


# -- issue 13: the API's query power on the page ---------------------------------------------------

def test_less_and_more_like_this_chips_refine_the_query_and_removing_them_restores_it(watched):
    page = open_page(watched)
    sent = text_search(page, QUERY)
    assert sent["mode"] == "vector" and sent["hide_duplicates"] is False and "filters" not in sent
    results(page, "image", "text")
    original = http(watched.base, "/api/search", sent)
    k = sent["k"]
    assert shown_ids(page)[:k] == ids(original)
    less = original["hits"][1]

    # "Less like this" on the second result: a chip, and a terms query with that item at -0.5.
    tile = page.locator(f'#results .hit[data-id="{less["id"]}"]')
    tile.hover()
    body = sent_by(page, tile.get_by_role("button", name="Less like result 2: add it to the query").click)
    assert body["terms"] == [{"text": QUERY, "weight": 1}, {"item": less["id"], "weight": -0.5}]
    assert not {"text", "item", "mode"} & set(body)
    answered(page, query_kind="text", terms=1)
    chip = page.locator(f'#feedback .feedback-chip.is-less[data-id="{less["id"]}"]')
    expect(chip).to_be_visible()
    expect(chip.locator("img")).to_have_attribute("src", less["thumb"])
    answer = http(watched.base, "/api/search", body)
    assert shown_ids(page)[:k] == ids(answer)
    assert less["id"] not in shown_ids(page) and less["id"] not in ids(answer)  # a term is left out
    expect(page.locator("#mode")).to_be_disabled()  # a terms query ranks by vector only, and says so
    expect(page.locator("#mode-hint")).to_be_visible()
    expect(page).to_have_url(page_url(watched.base, less=less["id"]))

    # "More like this" on the new first result, by keyboard: a second chip at +0.5.
    more = int(page.locator("#results .hit").first.get_attribute("data-id"))
    page.locator("#results .hit").first.locator(".feedback-more").focus()
    body = sent_by(page, lambda: page.keyboard.press("Enter"))
    assert body["terms"] == [{"text": QUERY, "weight": 1}, {"item": less["id"], "weight": -0.5},
                             {"item": more, "weight": 0.5}]
    answered(page, query_kind="text", terms=2)
    expect(page.locator("#feedback .feedback-chip")).to_have_count(2)
    more_clear = page.locator(f'#feedback .feedback-chip[data-id="{more}"] .chip-clear')
    expect(more_clear).to_be_focused()  # the results were redrawn: the focus is on the new chip
    assert shown_ids(page)[:k] == ids(http(watched.base, "/api/search", body))
    assert more not in shown_ids(page)

    # The chip's remove button drops its term; without chips the words alone rank as at first.
    body = sent_by(page, chip.get_by_role("button", name=re.compile("^Remove")).click)
    assert body["terms"] == [{"text": QUERY, "weight": 1}, {"item": more, "weight": 0.5}]
    answered(page, query_kind="text", terms=1)
    expect(chip).to_have_count(0)
    expect(more_clear).to_be_focused()  # the next chip
    assert shown_ids(page)[:k] == ids(http(watched.base, "/api/search", body))
    body = sent_by(page, lambda: page.keyboard.press("Enter"))
    assert body == sent
    expect(page.locator("#q")).to_be_focused()  # no chips left
    answered(page, query_kind="text", terms=0)
    assert shown_ids(page)[:k] == ids(original)
    expect(page.locator("#feedback")).to_be_hidden()
    expect(page.locator("#mode")).to_be_enabled()
    expect(page.locator("#mode-hint")).to_be_hidden()
    expect(page).to_have_url(page_url(watched.base))

    # Back: the chip again, from the URL, with its picture.
    body = sent_by(page, page.go_back)
    assert body["terms"] == [{"text": QUERY, "weight": 1}, {"item": more, "weight": 0.5}]
    answered(page, query_kind="text", terms=1)
    expect(page.locator(f'#feedback .feedback-chip.is-more[data-id="{more}"] img')).to_have_attribute(
        "src", next(h["thumb"] for h in original["hits"] if h["id"] == more))
    # A new words search starts without chips.
    body = text_search(page, "a red circle")
    assert "terms" not in body
    answered(page, query_kind="text", terms=0)
    expect(page.locator("#feedback")).to_be_hidden()
    watched.check()


def test_the_mode_switch_sends_keyword_and_shows_the_apis_keyword_ranking(watched):
    page = open_page(watched)
    sent = text_search(page, QUERY)
    results(page, "image", "text")
    body = sent_by(page, lambda: page.locator("#mode").select_option("keyword"))
    assert body == {**sent, "mode": "keyword"}
    answered(page, query_kind="text", mode="keyword")
    keyword = http(watched.base, "/api/search", body)
    assert keyword["hits"] and ids(keyword) != ids(http(watched.base, "/api/search", sent))  # its own ranking
    assert shown_ids(page)[: body["k"]] == ids(keyword)
    expect(page).to_have_url(page_url(watched.base, mode="keyword"))

    # The URL keeps it: a reload searches by keywords again.
    assert sent_by(page, page.reload) == body
    answered(page, query_kind="text", mode="keyword")
    expect(page.locator("#mode")).to_have_value("keyword")

    # A feedback chip makes it a terms query: vector, the switch disabled; without it, keywords again.
    body = sent_by(page, page.locator("#results .hit").first.locator(".feedback-less").click)
    assert "mode" not in body and len(body["terms"]) == 2
    answered(page, query_kind="text", mode="vector", terms=1)
    expect(page.locator("#mode")).to_be_disabled()
    expect(page.locator("#mode")).to_have_value("vector")
    expect(page.locator("#mode-hint")).to_be_visible()
    assert sent_by(page, page.locator("#feedback .chip-clear").click) == body_without_terms(body, keyword=True)
    answered(page, query_kind="text", mode="keyword", terms=0)
    expect(page.locator("#mode")).to_be_enabled()
    expect(page.locator("#mode")).to_have_value("keyword")
    assert shown_ids(page)[: body["k"]] == ids(keyword)
    watched.check()


def body_without_terms(body: dict, keyword: bool) -> dict:
    """The words query a terms query came from (its first term), as the page sends it."""
    plain = {name: value for name, value in body.items() if name != "terms"}
    return {**plain, "text": body["terms"][0]["text"], "mode": "keyword" if keyword else "vector"}


def test_hide_duplicates_is_sent_and_the_apis_notes_are_shown(watched):
    page = open_page(watched)
    text_search(page, QUERY)
    results(page, "image", "text")
    sent = sent_by(page, page.locator("#target-texts").click)  # captions: many say the same
    results(page, "text", "text")
    expect(page.locator("#notes")).to_be_empty()
    body = sent_by(page, page.locator("#hide-duplicates").check)
    assert body == {**sent, "hide_duplicates": True}
    results(page, "text", "text")
    answer = http(watched.base, "/api/search", body)
    assert shown_ids(page)[: body["k"]] == ids(answer)
    assert any("near-duplicates" in note for note in answer["notes"])
    expect(page.locator("#notes")).to_contain_text(" · ".join(answer["notes"]))
    expect(page).to_have_url(page_url(watched.base, to="text", hide_duplicates=1))

    assert sent_by(page, page.locator("#hide-duplicates").uncheck) == sent
    results(page, "text", "text")
    expect(page.locator("#notes")).to_be_empty()
    assert shown_ids(page)[: sent["k"]] == ids(http(watched.base, "/api/search", sent))
    watched.check()


def test_filters_narrow_the_results_are_counted_cleared_and_bad_ones_show_the_apis_message(watched):
    page = open_page(watched)
    sent = text_search(page, QUERY)
    results(page, "image", "text")
    unfiltered = http(watched.base, "/api/search", sent)
    path_of = {hit["id"]: hit["path"] for hit in http(watched.base, "/api/search", {**sent, "k": 60})["hits"]}
    toggle, count = page.locator("#filters-toggle"), page.locator("#filters-count")
    expect(count).to_be_hidden()
    toggle.click()
    expect(page.locator("#filters-panel")).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")

    # A file type: only PNGs (a quarter of the corpus), all on one page.
    body = sent_by(page, page.locator('#filters-form input[name="format"][value="png"]').check)
    assert body == {**sent, "filters": {"formats": ["png"]}}
    results(page, "image", "text")
    answer = http(watched.base, "/api/search", body)
    assert not answer["has_more"] and shown_ids(page) == ids(answer)
    assert len(ids(answer)) == sum(path.endswith(".png") for path in path_of.values()) == 15
    assert all(path_of[i].endswith(".png") for i in shown_ids(page))
    expect(count).to_have_text("1")
    expect(toggle).to_have_attribute("aria-label", "Filters, 1 active")

    # And a file name glob: both must hold.
    page.locator("#f-paths").fill("00001*")
    body = sent_by(page, lambda: page.locator("#f-paths").press("Enter"))
    assert body == {**sent, "filters": {"paths": ["00001*"], "formats": ["png"]}}
    results(page, "image", "text")
    answer = http(watched.base, "/api/search", body)
    assert shown_ids(page) == ids(answer)
    assert sorted(path_of[i] for i in shown_ids(page)) == ["000011.png", "000015.png", "000019.png"]
    expect(count).to_have_text("2")
    expect(page).to_have_url(page_url(watched.base, paths="00001*", formats="png"))

    # The URL keeps them: a reload sends the same filters and fills the panel in.
    assert sent_by(page, page.reload) == body
    results(page, "image", "text")
    expect(count).to_have_text("2")
    expect(page.locator("#f-paths")).to_have_value("00001*")
    expect(page.locator('#filters-form input[value="png"]')).to_be_checked()

    # Clear filters: the unfiltered ranking again.
    page.locator("#filters-toggle").click()
    assert sent_by(page, page.locator("#filters-clear").click) == sent
    results(page, "image", "text")
    assert shown_ids(page)[: sent["k"]] == ids(unfiltered)
    expect(count).to_be_hidden()
    expect(page).to_have_url(page_url(watched.base))

    # A date range that ends before it starts: the API's own sentence.
    page.locator("#f-taken-from").fill("2024-05-01")  # nothing was taken after it: no results
    expect(page.locator("#empty")).to_be_visible()
    watched.allowed.append("/api/search")
    body = sent_by(page, lambda: page.locator("#f-taken-to").fill("2024-01-01"))
    assert body["filters"] == {"taken": "2024-05-01..2024-01-01"}
    status, said = http_error(watched.base, "/api/search", body)
    assert status == 400 and "ends before it starts" in said["error"]
    expect(page.locator("#error-text")).to_have_text(said["error"])
    expect(page.locator('#results[data-state="error"]')).to_be_attached()
    expect(count).to_have_text("1")
    assert sent_by(page, page.locator("#filters-clear").click) == sent
    results(page, "image", "text")
    expect(page.locator("#error")).to_be_hidden()
    watched.check()


def test_a_camera_filter_finds_the_photos_and_the_detail_view_shows_their_metadata(watched, corpus):
    page = open_page(watched)
    sent = text_search(page, QUERY)
    results(page, "image", "text")
    page.locator("#filters-toggle").click()
    page.locator("#f-camera").fill("canon eos")
    body = sent_by(page, lambda: page.locator("#f-camera").press("Enter"))
    assert body == {**sent, "filters": {"camera": "canon eos"}}
    results(page, "image", "text")
    answer = http(watched.base, "/api/search", body)
    stamped = [path.name for path in sorted(corpus["images"].glob("*.jpg"))[:2]]
    assert sorted(hit["path"] for hit in answer["hits"]) == stamped and shown_ids(page) == ids(answer)

    page.locator("#results .hit a.open").first.click()
    expect(page.locator("#detail")).to_have_attribute("data-id", str(ids(answer)[0]))
    item = http(watched.base, f"/api/items/{ids(answer)[0]}?index={answer['index']}")
    photo = item["photo"]
    assert photo["format"] == "JPEG" and photo["taken_at"] == PHOTO["taken_at"]
    assert photo["gps_lat"] == pytest.approx(PHOTO["gps_lat"], abs=1e-4)
    expect(page.locator("#detail-taken")).to_have_text("2023-06-14 18:03:51")
    expect(page.locator("#detail-camera")).to_have_text("Canon EOS R5")
    expect(page.locator("#detail-format")).to_have_text("JPEG")
    expect(page.locator("#detail-gps")).to_have_text(f"{photo['gps_lat']:.5f}, {photo['gps_lon']:.5f}")
    expect(page.locator("#detail-gps-label")).to_have_text("Location")

    # A PNG's header has its format only: the other facts stay hidden.
    page.keyboard.press("Escape")
    expect(page.locator("#detail")).to_be_hidden()
    page.locator("#f-camera").fill("")
    assert sent_by(page, lambda: page.locator("#f-camera").press("Enter")) == sent
    body = sent_by(page, page.locator('#filters-form input[value="png"]').check)
    assert body["filters"] == {"formats": ["png"]}
    results(page, "image", "text")
    png = int(page.locator("#results .hit").first.get_attribute("data-id"))
    page.locator("#results .hit a.open").first.click()
    expect(page.locator("#detail")).to_have_attribute("data-id", str(png))
    expect(page.locator("#detail-format")).to_have_text("PNG")
    expect(page.locator("#detail-taken")).to_be_hidden()
    expect(page.locator("#detail-camera")).to_be_hidden()
    expect(page.locator("#detail-gps")).to_be_hidden()
    watched.check()


def test_an_image_query_takes_feedback_chips_as_terms(watched, corpus):
    page = open_page(watched)
    image = sorted(corpus["images"].glob("*.png"))[3]
    dropped = read(image)
    with page.expect_request(new_search):
        page.dispatch_event("main", "drop", {"dataTransfer": data_transfer(page, dropped, image.name)})
    results(page, "image", "image")
    plain = upload(watched.base, dropped, image.name, to="image", k=30, offset=0)
    assert shown_ids(page)[:30] == ids(plain)
    expect(page.locator("#mode")).to_be_disabled()  # a picture: vector only

    less = plain["hits"][1]["id"]
    with page.expect_request(new_search):  # multipart: Chromium keeps the body to itself
        page.locator(f'#results .hit[data-id="{less}"] .feedback-less').click()
    answered(page, query_kind="image", terms=1)
    expect(page.locator("#query-chip-label")).to_have_text(image.name)  # still the picture's query
    expect(page.locator(f'#feedback .feedback-chip.is-less[data-id="{less}"]')).to_be_visible()
    answer = upload(watched.base, dropped, image.name, to="image", k=30, offset=0, hide_duplicates="false",
                    terms=json.dumps([{"item": less, "weight": -0.5}]))
    assert shown_ids(page)[:30] == ids(answer) != ids(plain)
    assert less not in shown_ids(page)
    watched.check()
