"""The HTTP API of ``crossmodal serve`` over a real index and the bundled demo model (in-process ASGI client)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.store import IndexStore

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from retrieval.searcher import Searcher  # noqa: E402
from retrieval.serve.app import create_app  # noqa: E402
from retrieval.serve.service import Service  # noqa: E402
from retrieval.serve.settings import ServeError, ServeSettings, check_exposure, parse_indexes  # noqa: E402

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def crossmodal(*args) -> None:
    result = subprocess.run([sys.executable, "-m", "retrieval", *map(str, args)], capture_output=True, text=True,
                            env=ENV)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A real index of 30 generated images with 3 captions each, built with the bundled demo model."""
    root = tmp_path_factory.mktemp("serve")
    crossmodal("data", "synth", "--out", root / "corpus", "--n", 30, "--seed", 5, "--test", 30, "--val", 0)
    crossmodal("index", root / "corpus" / "test", "--index", root / "index", "--model", "crossmodal-demo",
               "--workers", 0, "--no-progress")
    return root


@pytest.fixture(scope="module")
def service(demo):
    settings = ServeSettings({"shapes": demo / "index"}, cache_dir=demo / "thumbs", workers=1, queue=4)
    service = Service(settings)
    yield service
    service.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client


def search(client, **body):
    response = client.post("/api/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_indexes_describe_model_counts_and_type(client):
    [index] = client.get("/api/indexes").json()["indexes"]
    assert index["name"] == "shapes" and index["model"]["name"] == "crossmodal-demo"
    assert index["counts"] == {"image": 30, "caption": 90, "text": 0, "skipped": 0}
    assert index["index_type"] == "flat"


def test_text_search_ranks_like_the_library_and_pages_without_overlap(client, demo):
    query = "a large red circle in the center"
    first = search(client, text=query, k=5)
    with Searcher.open(demo / "index") as searcher:
        expected = searcher.answer_text(query, to="image", k=10).hits
    assert [h["id"] for h in first["hits"]] == [h.id for h in expected[:5]]
    assert [h["rank"] for h in first["hits"]] == [1, 2, 3, 4, 5] and first["has_more"]
    scores = [h["score"] for h in first["hits"]]
    assert scores == sorted(scores, reverse=True)
    hit = first["hits"][0]
    assert hit["kind"] == "image" and hit["image_id"] == hit["id"] and len(hit["captions"]) == 3
    assert (demo / "corpus" / "test" / hit["path"]).is_file() and (hit["width"], hit["height"]) == (128, 128)
    assert hit["thumb"].startswith(f"/thumbs/{hit['id']}?index=shapes")
    second = search(client, text=query, k=5, offset=5)
    assert [h["id"] for h in second["hits"]] == [h.id for h in expected[5:10]]
    assert [h["rank"] for h in second["hits"]] == [6, 7, 8, 9, 10]
    last = search(client, text=query, k=10, offset=25)
    assert len(last["hits"]) == 5 and not last["has_more"]
    assert set(first["timings_ms"]) == {"encode", "search", "catalog"}


def test_uploaded_image_finds_its_captions_and_itself(client, demo):
    path = sorted((demo / "corpus" / "test").glob("*.png"))[0]
    response = client.post("/api/search", files={"image": (path.name, path.read_bytes())}, data={"k": "3"})
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert response.json()["to"] == "text" and hits[0]["kind"] == "caption" and hits[0]["path"] == path.name
    images = client.post("/api/search", files={"image": ("q", path.read_bytes())}, data={"to": "image", "k": "1"})
    assert images.json()["hits"][0]["path"] == path.name


def test_fused_terms_answer_as_the_library_does_with_an_upload_too(client, service, demo):
    from retrieval.terms import Term

    top = search(client, text="a blue star", k=1)["hits"][0]
    terms = [{"text": "a yellow square", "weight": 2}, {"item": top["id"], "weight": -0.5}]
    answer = search(client, terms=terms, k=6)
    searcher = service.index("shapes").searcher
    expected = searcher.answer_terms([Term(text="a yellow square", weight=2), Term(item=top["id"], weight=-0.5)],
                                     k=6).hits
    assert [h["id"] for h in answer["hits"]] == [h.id for h in expected] and top["id"] not in [
        h["id"] for h in answer["hits"]]
    path = sorted((demo / "corpus" / "test").glob("*.png"))[1]
    upload = client.post("/api/search", files={"image": (path.name, path.read_bytes())},
                         data={"k": "4", "terms": '[{"text": "a red circle", "weight": -1}]'})
    assert upload.status_code == 200 and upload.json()["to"] == "image", upload.text
    alone = client.post("/api/search", files={"image": (path.name, path.read_bytes())}, data={"k": "4", "to": "image"})
    assert [h["id"] for h in upload.json()["hits"]] != [h["id"] for h in alone.json()["hits"]]
    for body, says in (({"terms": []}, "no terms"), ({"terms": [{"text": "x", "weight": -1}]}, "negative weight"),
                       ({"text": "x", "terms": [{"text": "y"}]}, "exactly one of"),
                       ({"terms": [{"text": "x"}, {"text": "x", "weight": -1}]}, "cancel out")):
        response = client.post("/api/search", json=body)
        assert response.status_code == 400 and says in response.json()["error"], (body, response.text)
    bad = client.post("/api/search", files={"image": ("a.png", path.read_bytes())}, data={"terms": "[oops"})
    assert bad.status_code == 400 and "JSON list" in bad.json()["error"]


def test_keyword_and_hybrid_modes_answer_text_queries_only(client, demo):
    name = sorted((demo / "corpus" / "test").glob("*.png"))[0].name
    hits = search(client, text=name, mode="keyword", k=3)["hits"]
    assert [h["path"] for h in hits] == [name] and hits[0]["captions"]
    assert search(client, text="a red circle", mode="hybrid", k=4)["hits"]
    plain, hiding = search(client, text="a red circle", k=8), search(client, text="a red circle", k=8,
                                                                      hide_duplicates=True)
    assert len(hiding["hits"]) == 8 and {h["id"] for h in hiding["hits"]} <= {h["id"] for h in search(
        client, text="a red circle", k=30)["hits"]} and plain["hits"]
    for body, says in (({"item": 1, "mode": "keyword"}, "takes a text query"),
                       ({"text": "x", "hide_duplicates": "yes"}, "true or false"),
                       ({"text": "x", "mode": "fuzzy"}, "unknown search mode")):
        response = client.post("/api/search", json=body)
        assert response.status_code == 400 and says in response.json()["error"], response.text


def test_filters_narrow_every_mode_and_an_upload_inside_the_search(client, demo):
    pngs = {p.name for p in (demo / "corpus" / "test").glob("*.png")}
    for body in ({"text": "a red circle"}, {"text": "jpg png", "mode": "keyword"}, {"text": "a red circle",
                                                                                   "mode": "hybrid"}):
        answer = client.post("/api/search", json={**body, "k": 30, "filters": {"formats": ["png"]}}).json()
        assert answer["hits"] and {h["path"] for h in answer["hits"]} <= pngs, body
    whole = client.post("/api/search", json={"text": "a red circle", "k": 30}).json()["hits"]
    only = client.post("/api/search", json={"text": "a red circle", "k": 30, "filters": {"formats": ["png"]}}).json()
    assert [h["id"] for h in only["hits"]] == [h["id"] for h in whole if h["path"] in pngs]  # same order, all of them
    assert len(only["hits"]) == len(pngs) and not only["has_more"]
    picked = sorted(pngs)[:2]
    image = (demo / "corpus" / "test" / sorted(pngs)[0]).read_bytes()
    answer = client.post("/api/search", files={"image": ("q.png", image)},
                         data={"to": "image", "filters": json.dumps({"paths": picked})}).json()
    assert sorted(h["path"] for h in answer["hits"]) == picked
    nothing = client.post("/api/search", json={"text": "x", "filters": {"camera": "leica"}}).json()
    assert nothing["hits"] == [] and "no image matches the filters" in nothing["notes"][0]
    detail = client.get(f"/api/items/{only['hits'][0]['id']}?index=shapes").json()
    assert detail["photo"] == {"format": "PNG"}


def test_more_like_this_leaves_the_item_out_and_items_list_their_captions(client):
    top = search(client, text="a blue star", k=1)["hits"][0]
    similar = client.get(f"/api/items/{top['id']}/similar", params={"k": 5}).json()["hits"]
    assert len(similar) == 5 and top["id"] not in [h["id"] for h in similar]
    assert similar == search(client, item=top["id"], k=5)["hits"]
    item = client.get(f"/api/items/{top['id']}").json()
    assert item["kind"] == "image" and len(item["captions"]) == 3 and item["size_bytes"] > 0
    caption = client.get(f"/api/items/{item['captions'][0]['id']}").json()
    assert caption["kind"] == "caption" and caption["image_id"] == top["id"]


def test_thumbnails_are_cached_jpegs_with_etags(client, demo):
    hit = search(client, text="a green triangle", k=1)["hits"][0]
    response = client.get(hit["thumb"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert "immutable" in response.headers["cache-control"]
    assert max(Image.open(io.BytesIO(response.content)).size) == 128  # never enlarged
    small = client.get(f"/thumbs/{hit['id']}", params={"index": "shapes", "size": 64})
    assert max(Image.open(io.BytesIO(small.content)).size) == 64
    again = client.get(f"/thumbs/{hit['id']}", params={"size": 64}, headers={"If-None-Match": small.headers["etag"]})
    assert again.status_code == 304
    assert list((demo / "thumbs").rglob("*.jpg"))  # outside the index
    assert client.get(f"/thumbs/{hit['id']}", params={"size": 5000}).status_code == 400


def test_files_are_found_by_id_only(client, demo):
    hit = search(client, text="a yellow square", k=1)["hits"][0]
    response = client.get(hit["file"])
    assert response.status_code == 200
    assert response.content == (demo / "corpus" / "test" / hit["path"]).read_bytes()
    caption_id = client.get(f"/api/items/{hit['id']}").json()["captions"][0]["id"]
    assert client.get(f"/files/{caption_id}").status_code == 404
    for attempt in ("/files/../../etc/passwd", "/thumbs/..%2f..%2fetc%2fpasswd", "/files/%2e%2e/%2e%2e/etc/passwd",
                    "/files/1%00", "/thumbs/-1", "/static/../../../../etc/passwd", "/static/%2e%2e/app.py",
                    "/files/1?path=/etc/passwd"):
        response = client.get(attempt)
        assert b"root:" not in response.content and b"import" not in response.content, attempt
        assert response.status_code in (200, 400, 404) and response.headers["content-type"] != "text/plain", attempt
        if response.status_code != 200:
            assert "error" in response.json(), attempt


def test_a_moved_or_redirected_file_is_refused_with_a_reason(client, demo, tmp_path):
    hits = search(client, text="a black cross", k=2)["hits"]
    gone, linked = (demo / "corpus" / "test" / h["path"] for h in hits)
    saved = {path: path.read_bytes() for path in (gone, linked)}
    outside = tmp_path / "outside.png"
    outside.write_bytes(saved[linked])
    try:
        gone.unlink()
        linked.unlink()
        linked.symlink_to(outside)  # a symlink planted under the root, pointing out of it
        response = client.get(hits[0]["file"])
        assert response.status_code == 404 and "gone from disk" in response.json()["error"]
        assert client.get(hits[0]["thumb"].replace("v=", "size=100&v=")).status_code == 404
        response = client.get(hits[1]["file"])
        assert response.status_code == 403 and "outside its indexed folder" in response.json()["error"]
        assert client.get(hits[1]["thumb"].replace("v=", "size=99&v=")).status_code == 403
    finally:
        linked.unlink(missing_ok=True)
        for path, data in saved.items():
            path.write_bytes(data)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height over one byte of pixels: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("request_", "status", "says"), [
    ({"json": {"text": "   "}}, 400, "empty text query"),
    ({"json": {"text": "x", "k": 0}}, 400, "k must be between 1 and 200"),
    ({"json": {"text": "x", "k": 5000}}, 400, "k must be between 1 and 200"),
    ({"json": {"text": "x", "offset": -1}}, 400, "offset"),
    ({"json": {"text": "x", "to": "video"}}, 400, "to must be image or text"),
    ({"json": {"text": "x", "item": 3}}, 400, "exactly one of"),
    ({"json": {"txt": "x"}}, 400, "unknown field 'txt'"),
    ({"json": {"text": "x", "nprobe": 8}}, 400, "nprobe applies to"),
    ({"json": {"text": "x", "rerank": 10**9}}, 400, "rerank must be between"),
    ({"json": {"vector": [0.1, 0.2]}}, 400, "dimensions"),
    ({"json": {"vector": ["a"]}}, 400, "list of numbers"),
    ({"json": {"item": 99999}}, 400, "no indexed item 99999"),
    ({"json": {"text": "x", "index": "nope"}}, 404, "no index named 'nope'"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"files": {"image": ("a.txt", b"just some text")}}, 400, "not an image"),
    ({"files": {"image": ("bomb.png", png_header_only(30000, 30000))}}, 400, "megapixel limit"),
    ({"files": {"image": ("e.png", b"")}}, 400, "empty"),
    ({"files": {"picture": ("a.png", b"x")}}, 400, "multipart field 'image'"),
    ({"json": {"text": "x", "filters": {"colour": "red"}}}, 400, "unknown filter 'colour'"),
    ({"json": {"text": "x", "filters": {"taken": "2024-01-01..2023-01-01"}}}, 400, "ends before it starts"),
    ({"json": {"text": "x", "filters": ["png"]}}, 400, "filters must be a JSON object"),
])
def test_bad_requests_get_a_4xx_with_a_sentence(client, request_, status, says):
    response = client.post("/api/search", **request_)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]
    assert "Traceback" not in response.text


def test_uploads_over_the_byte_limit_are_413(demo):
    settings = ServeSettings({"shapes": demo / "index"}, cache_dir=demo / "thumbs", max_upload_bytes=1000)
    service = Service(settings)
    try:
        with TestClient(create_app(service)) as client:
            image = sorted((demo / "corpus" / "test").glob("*.png"))[0].read_bytes()
            assert len(image) > 1000
            response = client.post("/api/search", files={"image": ("big.png", image)})
            assert response.status_code == 413 and "1,000-byte limit" in response.json()["error"]
    finally:
        service.close()


def test_a_full_queue_answers_503_with_retry_after(demo):
    service = Service(ServeSettings({"shapes": demo / "index"}, cache_dir=demo / "thumbs", workers=1, queue=0))
    release = threading.Event()
    try:
        with TestClient(create_app(service)) as client:
            blocker = service.submit(release.wait, 30)  # the one worker is busy, and no one may wait
            response = client.post("/api/search", json={"text": "a red circle"})
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert "try again" in response.json()["error"]
            release.set()
            blocker.result(timeout=30)
            assert client.post("/api/search", json={"text": "a red circle"}).status_code == 200
    finally:
        release.set()
        service.close()


def test_metrics_count_requests_and_time_each_stage(client):
    search(client, text="a purple hexagon", k=3)
    client.get("/api/items/999999")
    text = client.get("/metrics").text
    assert 'crossmodal_requests_total{route="/api/search",status="200"}' in text
    assert 'crossmodal_requests_total{route="/api/items/{item_id}",status="404"}' in text
    for stage in ("encode", "search", "catalog"):
        assert f'crossmodal_query_stage_seconds_count{{stage="{stage}"}}' in text
    assert "crossmodal_queue_depth 0.0" in text


def test_a_token_guards_the_api_but_not_the_page(demo):
    service = Service(ServeSettings({"shapes": demo / "index"}, cache_dir=demo / "thumbs", token="s3cret"))
    try:
        with TestClient(create_app(service)) as client:
            for path in ("/api/indexes", "/thumbs/1", "/files/1", "/metrics", "/api/items/1"):
                response = client.get(path)
                assert response.status_code == 401 and response.json()["login"] is True, path
            assert client.post("/api/search", json={"text": "x"}).status_code == 401
            assert client.get("/api/indexes", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get("/api/indexes", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert client.get("/").status_code == 200 and client.get("/healthz").status_code == 200
            assert client.post("/api/login", json={"token": "nope"}).status_code == 401
            assert client.post("/api/login", json={"token": "s3cret"}).status_code == 200
            assert client.get("/api/indexes").status_code == 200  # the cookie the login set
    finally:
        service.close()


def test_the_server_never_writes_the_index(client, demo):
    catalog = demo / "index" / "catalog.sqlite"
    before = catalog.read_bytes()
    search(client, text="a white square", k=3)
    assert catalog.read_bytes() == before
    with IndexStore.open(demo / "index", read_only=True) as store:
        with pytest.raises(Exception, match="readonly|read-only"):
            store.catalog.clear_meta()


def test_names_and_exposure_are_checked_before_anything_loads(tmp_path):
    assert list(parse_indexes(["photos=/a/b", str(tmp_path / "My Index")])) == ["photos", "My-Index"]
    with pytest.raises(ServeError, match="two indexes are named 'b'"):
        parse_indexes(["/x/b", "/y/b"])
    assert check_exposure(ServeSettings({"a": tmp_path})) is None
    with pytest.raises(ServeError, match="--token"):
        check_exposure(ServeSettings({"a": tmp_path}, host="0.0.0.0"))
    assert "WITHOUT a token" in check_exposure(ServeSettings({"a": tmp_path}, host="::", insecure_no_token=True))
    assert "token" in check_exposure(ServeSettings({"a": tmp_path}, host="192.168.1.5", token="t"))
    assert check_exposure(ServeSettings({"a": tmp_path}, host="::1")) is None


def test_searches_from_many_threads_agree_with_one_at_a_time(service, demo):
    served = service.index("shapes")
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((40, 128)).astype(np.float32)
    alone = [served.searcher.answer_vector(q, k=5).hits for q in queries]
    results: dict[int, list] = {}

    def worker(rows):
        for row in rows:
            results[row] = served.searcher.answer_vector(queries[row], k=5).hits

    threads = [threading.Thread(target=worker, args=(range(i, 40, 4),)) for i in range(4)]
    for thread in threads:
        thread.start()
    refresher = threading.Thread(target=lambda: [served.searcher.refresh() for _ in range(200)])
    refresher.start()
    for thread in [*threads, refresher]:
        thread.join()
    assert [results[row] for row in range(40)] == alone


def test_a_fault_of_ours_is_a_json_500_without_the_traceback(service, monkeypatch):
    def broken(_name):
        raise RuntimeError("secret internals at /srv/x.py line 3")

    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        monkeypatch.setattr(service, "index", broken)
        response = client.get("/api/items/1")
        assert response.status_code == 500
        assert response.json() == {"error": "the server failed to answer this request; its log says why"}
        assert "secret" not in response.text and response.headers["x-content-type-options"] == "nosniff"
        monkeypatch.undo()
        assert client.get("/api/items/999999").headers["x-content-type-options"] == "nosniff"
        assert 'crossmodal_errors_total{route="/api/items/{item_id}"} 1.0' in client.get("/metrics").text


def test_the_login_cookie_is_found_among_others(demo):
    service = Service(ServeSettings({"shapes": demo / "index"}, cache_dir=demo / "thumbs", token="s3cret"))
    try:
        with TestClient(create_app(service)) as client:
            headers = {"Cookie": "theme=dark; crossmodal_token=s3cret; odd"}
            assert client.get("/api/indexes", headers=headers).status_code == 200
            headers = {"Cookie": "crossmodal_token=s3cre; theme=dark"}
            assert client.get("/api/indexes", headers=headers).status_code == 401
    finally:
        service.close()


def test_query_threads_run_faiss_serially_and_the_model_encodes_in_its_own_thread(service):
    import faiss

    assert service.submit(faiss.omp_get_max_threads).result(30) == 1
    assert faiss.omp_get_max_threads() >= 1  # this thread's setting is its own
    encoder = service.index("shapes").searcher.encoder
    assert type(encoder).__name__ == "BatchingEncoder" and encoder._thread.is_alive()
