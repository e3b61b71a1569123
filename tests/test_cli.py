"""The CLI as a user drives it, with the fake encoder standing in for open_clip."""

import json
import subprocess
import sys

import pytest


def test_index_json_summary_then_incremental(invoke, photo_dir):
    first = invoke("index", photo_dir, "--workers", "0", "--no-progress", "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output)
    for key in ("added", "updated", "removed", "moved", "unchanged", "skipped", "seconds"):
        assert key in summary
    assert summary["added"] == 6
    second = json.loads(invoke("index", photo_dir, "--workers", "0", "--no-progress", "--json").output)
    assert (second["added"], second["unchanged"]) == (0, 6)


def test_human_index_output_names_counts_and_stages(invoke, photo_dir):
    out = invoke("index", photo_dir, "--workers", "0", "--no-progress").output
    assert "6 added" in out and "decode" in out and "encode" in out


def test_search_text_to_images_json(invoke, photo_dir):
    invoke("index", photo_dir, "--workers", "0", "--no-progress")
    result = invoke("search", "anything", "-k", "3", "--json")
    hits = json.loads(result.output)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(h["kind"] == "image" and h["path"].startswith(str(photo_dir.resolve())) for h in hits)
    assert all({"rank", "score", "kind", "path", "text", "id"} <= set(h) for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_search_image_finds_itself_and_captions(invoke, photo_dir):
    invoke("index", photo_dir, "--workers", "0", "--no-progress")
    hits = json.loads(invoke("search", "--image", photo_dir / "img2.png", "--to", "image", "--json").output)
    assert hits[0]["path"] == str(photo_dir.resolve() / "img2.png") and hits[0]["score"] == pytest.approx(1, abs=1e-5)
    texts = json.loads(invoke("search", "--image", photo_dir / "img0.png", "--json").output)
    assert {h["kind"] for h in texts} == {"caption"} and {h["text"] for h in texts} == {
        "a first caption", "another caption for img0"}
    table = invoke("search", "a first caption", "--to", "text").output
    assert "'a first caption'" in table and "rank" in table


def test_search_adds_up_terms_and_leaves_liked_items_out(invoke, photo_dir):
    invoke("index", photo_dir, "--workers", "0", "--no-progress")
    [me] = json.loads(invoke("search", "--image", photo_dir / "img2.png", "--to", "image", "-k", "1", "--json").output)
    fused = json.loads(invoke("search", "--image", f"2:{photo_dir / 'img2.png'}", "--text", "0.5:a first caption",
                              "--not", "another caption for img0", "--to", "image", "--json").output)
    assert fused[0]["id"] == me["id"]  # weighted twice as much as the rest: the image still leads
    liked = json.loads(invoke("search", "--like", str(me["id"]), "--to", "image", "--json").output)
    assert liked and me["id"] not in [h["id"] for h in liked]
    both = json.loads(invoke("search", "anything", "--like", str(me["id"]), "--json").output)
    assert me["id"] not in [h["id"] for h in both]


def test_search_by_keywords_finds_a_file_by_name(invoke, photo_dir):
    invoke("index", photo_dir, "--workers", "0", "--no-progress")
    hits = json.loads(invoke("search", "img2.png", "--mode", "keyword", "--json").output)
    assert [h["path"] for h in hits] == [str(photo_dir.resolve() / "img2.png")]
    texts = json.loads(invoke("search", "another caption", "--mode", "keyword", "--to", "text", "--json").output)
    assert [t["text"] for t in texts] == ["another caption for img0", "a first caption"]  # two words, then one
    both = json.loads(invoke("search", "another caption", "--mode", "hybrid", "--to", "text", "--json").output)
    assert {t["text"] for t in both} == {"another caption for img0", "a first caption"}
    result = invoke("search", "x", "--not", "y", "--mode", "keyword")
    assert result.exit_code != 0 and "--mode keyword takes a text QUERY alone" in result.output


def test_info_json_and_human(invoke, photo_dir):
    (photo_dir / "bad.png").write_bytes(b"nope")
    invoke("index", photo_dir, "--workers", "0", "--no-progress")
    info = json.loads(invoke("info", "--json", "--skipped").output)
    assert info["model"]["name"] == "fake" and info["model"]["embed_dim"] == 32
    assert info["counts"]["image"] == 7 and info["counts"]["caption"] == 2 and info["counts"]["skipped"] == 1
    assert info["vectors"] == {"image": 6, "text": 2}
    assert info["index_spec"]["kind"] == "flat" and info["schema_version"] >= 1
    assert info["disk_bytes"]["catalog.sqlite"] > 0 and info["skipped"][0]["path"].endswith("bad.png")
    assert "fake / none" in invoke("info").output


@pytest.mark.parametrize("args,message", [
    (["search", "x"], "no index at"),
    (["info"], "no index at"),
])
def test_missing_index_is_one_line(invoke, args, message):
    result = invoke(*args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_user_errors_are_one_line(invoke, photo_dir, tmp_path):
    invoke("index", photo_dir, "--workers", "0", "--no-progress")
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    bad_caps = tmp_path / "caps.csv"
    bad_caps.write_text("a,b\n")
    cases = [
        (["search", "   "], "empty text query"),
        (["search", "--image", not_image], "cannot read query image"),
        (["search", "--image", tmp_path / "nope.jpg"], "not found"),
        (["search", "x", "-k", "0"], "k must be a positive"),
        (["search"], "give a text QUERY, --image PATH, or terms"),
        (["search", "x", "--like", "cat"], "--like takes an item id"),
        (["search", "--not", "x"], "every query term has a negative weight"),
        (["search", "x", "--text", "0:y"], "term 2 (text): the weight must be a non-zero number"),
        (["index", photo_dir, "--captions", bad_caps, "--no-progress"], "needs 'image' and 'caption' columns"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_python_dash_m_and_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "retrieval", "search", "x", "--index", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: no index at {tmp_path / 'none'}: build one with `crossmodal index FOLDER --index "
        f"{tmp_path / 'none'}` (or set CROSSMODAL_INDEX)"]


def test_an_overlong_query_is_cut_with_a_note(invoke, photo_dir):
    invoke("index", photo_dir, "--workers", "0", "--no-progress")
    long = invoke("search", " ".join(["word"] * 25))
    assert long.exit_code == 0 and "note: the query is 5 tokens longer than the model reads" in long.output
    assert "note:" not in invoke("search", "a short query").output


def test_files_of_other_types_are_counted_most_common_first(invoke, photo_dir):
    for name in ["a.mp4", "b.mp4", "c.mp4", "d.pdf", "e.pdf", *(f"f.e{i}" for i in range(1, 9))]:
        (photo_dir / name).write_bytes(b"x")
    (photo_dir / "captions.jsonl").write_text('{"image": "img1.png", "caption": "listed"}\n')
    args = ("index", photo_dir, "--captions", photo_dir / "captions.jsonl", "--workers", "0", "--no-progress")
    out = invoke(*args, ok=True).output  # img0.txt is a sidecar and captions.jsonl an input: neither is counted
    assert "  13 files of other types not indexed: .mp4 3, .pdf 2, .e1 1, .e2 1, .e3 1, .e4 1, .e5 1, .e6 1, ...\n" \
        in out
    summary = json.loads(invoke(*args, "--json", ok=True).output)
    assert list(summary["other_types"].items())[:3] == [(".mp4", 3), (".pdf", 2), (".e1", 1)]
    assert sum(summary["other_types"].values()) == 13


def test_a_changed_setting_retries_skipped_files_and_says_so(invoke, photo_dir):
    first = json.loads(invoke("index", photo_dir, "--workers", "0", "--no-progress", "--max-megapixels", "0.001",
                              "--json", ok=True).output)
    assert (first["skipped"], first["retried"]) == (6, 0)  # 40x30 pixels is over 0.001 megapixels
    out = invoke("index", photo_dir, "--workers", "0", "--no-progress", ok=True).output
    assert "6 updated" in out and "0 skipped" in out
    assert "  retried 6 skipped files (a setting they depended on changed, or --retry-skipped)\n" in out
    again = json.loads(invoke("index", photo_dir, "--workers", "0", "--no-progress", "--retry-skipped", "--json",
                              ok=True).output)
    assert (again["retried"], again["unchanged"]) == (0, 6)


def test_control_characters_in_file_names_are_escaped_in_human_output(invoke, tmp_path):
    from conftest import make_image

    root = tmp_path / "ph\noto"
    make_image(root / "new\nline.png", seed=1)
    (root / "esc\x1b[31mape.png").write_bytes(b"not an image")
    out = invoke("index", root, "--workers", "0", "--no-progress", ok=True).output
    assert "\x1b" not in out and "new\nline" not in out and "ph\noto" not in out
    warnings = [line for line in out.splitlines() if "ape.png" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert "/ph\\noto/esc\\x1b[31mape.png: cannot decode image" in warnings[0]
    escaped_root = str(root.resolve()).replace("\n", "\\n")
    assert f"indexed {escaped_root} into" in out
    table = invoke("search", "anything", "-k", "5", ok=True).output.splitlines()
    assert len(table) == 2 and table[1].endswith("ph\\noto/new\\nline.png")
    hits = json.loads(invoke("search", "anything", "-k", "5", "--json", ok=True).output)
    assert hits[0]["path"] == str(root.resolve() / "new\nline.png")  # JSON stays exact
    listed = invoke("info", "--skipped", ok=True).output
    assert "\x1b" not in listed and "esc\\x1b[31mape.png: cannot decode image" in listed


def test_what_could_not_be_read_is_kept_and_said(invoke, photo_dir, tmp_path):
    from conftest import make_image

    make_image(tmp_path / "disk" / "x.png", seed=9)
    (photo_dir / "ext").symlink_to(tmp_path / "disk", target_is_directory=True)
    invoke("index", photo_dir, "--workers", "0", "--no-progress", ok=True)
    (tmp_path / "disk").rename(tmp_path / "unplugged")  # the disk the link leads to is not mounted
    out = invoke("index", photo_dir, "--workers", "0", "--no-progress", ok=True).output
    assert "0 removed, 6 unchanged" in out
    assert "  could not read 1 folder or file (see the warnings); kept 1 image indexed there\n" in out
    assert f"warning: {photo_dir}/ext: broken symlink, its target is missing; what was indexed under this name " \
           "is kept\n" in out
