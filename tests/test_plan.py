import json
from pathlib import Path

import pytest

from indexer.catalog import ImageState, TextState
from indexer.plan import plan_images, plan_texts
from indexer.skips import PILLOW_VERSION, RetrySettings
from indexer.sources import ImageFile, SpecialFile, TextRecord, WalkReport


class Hasher:
    def __init__(self, hashes):
        self.hashes, self.calls = hashes, []

    def __call__(self, path: Path) -> str:
        self.calls.append(path.name)
        return self.hashes[path.name]


def f(rel, size=10, mtime=1):
    return ImageFile(rel, Path("/r") / rel, size, mtime)


def s(id_, rel, size=10, mtime=1, sha="h", error=None, skip_info=None):
    return ImageState(id_, rel, size, mtime, sha, error, skip_info)


def test_unchanged_files_are_not_hashed():
    hasher = Hasher({})
    plan = plan_images([f("a.jpg")], {"a.jpg": s(1, "a.jpg")}, hasher)
    assert [x.id for x in plan.unchanged] == [1] and not plan.encode and hasher.calls == []


def test_touched_file_with_same_hash_only_gets_new_stat():
    plan = plan_images([f("a.jpg", mtime=2)], {"a.jpg": s(1, "a.jpg", sha="h")}, Hasher({"a.jpg": "h"}))
    assert plan.restat == [(1, f("a.jpg", mtime=2))] and not plan.encode


def test_changed_content_is_reencoded_under_its_id():
    plan = plan_images([f("a.jpg", size=11)], {"a.jpg": s(1, "a.jpg", sha="h")}, Hasher({"a.jpg": "new"}))
    assert [(j.file.rel, j.item_id) for j in plan.encode] == [("a.jpg", 1)]


def test_move_keeps_id_and_new_files_are_hashed_only_on_size_collision():
    known = {"old.jpg": s(1, "old.jpg", size=10, sha="h1"), "gone.jpg": s(2, "gone.jpg", size=99, sha="h2")}
    hasher = Hasher({"moved.jpg": "h1", "fresh.jpg": "zz"})
    plan = plan_images([f("moved.jpg", size=10), f("fresh.jpg", size=7)], known, hasher)
    assert plan.moved == [(1, f("moved.jpg", size=10))]
    assert [j.file.rel for j in plan.encode] == ["fresh.jpg"]
    assert [g.id for g in plan.gone] == [2]
    assert hasher.calls == ["moved.jpg"]  # fresh.jpg's size matches nothing that vanished


def test_same_size_but_different_content_is_new_not_moved():
    known = {"old.jpg": s(1, "old.jpg", size=10, sha="h1")}
    plan = plan_images([f("new.jpg", size=10)], known, Hasher({"new.jpg": "other"}))
    assert not plan.moved and [g.id for g in plan.gone] == [1] and plan.encode[0].item_id is None


def test_failed_files_are_retried_only_when_changed():
    known = {"bad.jpg": s(1, "bad.jpg", sha=None, error="cannot decode")}
    plan = plan_images([f("bad.jpg")], known, Hasher({}))
    assert [x.id for x in plan.still_failing] == [1] and not plan.encode
    plan = plan_images([f("bad.jpg", mtime=5)], known, Hasher({}))
    assert [(j.file.rel, j.item_id) for j in plan.encode] == [("bad.jpg", 1)]


def test_rows_where_the_walk_could_not_look_are_kept_not_gone_or_moved():
    known = {"sub/a.jpg": s(1, "sub/a.jpg", sha="h1"), "b.jpg": s(2, "b.jpg", sha="h2"),
             "odd.jpg": s(3, "odd.jpg", sha="h3")}
    walk = WalkReport(unread_dirs={"sub/"}, unread_files={"odd.jpg"})
    plan = plan_images([f("copy.jpg")], known, Hasher({"copy.jpg": "h1"}), walk)
    assert [g.id for g in plan.gone] == [2]
    assert sorted(k.id for k in plan.kept_unseen) == [1, 3]
    assert not plan.moved and [(j.file.rel, j.item_id) for j in plan.encode] == [("copy.jpg", None)]


def skip(cause, **info):
    return s(1, "bad.jpg", sha=None, error="failed", skip_info=json.dumps({"cause": cause, **info}))


NOW = RetrySettings(max_megapixels=100.0, decode_timeout=60.0)


@pytest.mark.parametrize("state,settings,retried", [
    (skip("too_large", max_megapixels=100.0), NOW, False),
    (skip("too_large", max_megapixels=50.0), NOW, True),
    (skip("too_large", max_megapixels=100.0), RetrySettings(None, 60.0), True),
    (skip("timeout", timeout=60.0, pillow=PILLOW_VERSION), NOW, False),
    (skip("timeout", timeout=30.0, pillow=PILLOW_VERSION), NOW, True),
    (skip("undecodable", pillow=PILLOW_VERSION), NOW, False),
    (skip("undecodable", pillow="1.0.0"), NOW, True),  # another Pillow may read it
    (skip("crashed", pillow="1.0.0"), NOW, True),
    (skip("unreadable"), NOW, True),  # permissions may have changed; a failed read is cheap
    (s(1, "bad.jpg", sha=None, error="failed"), NOW, False),  # before skip_info was recorded: as it always was
    (s(1, "bad.jpg", sha=None, error="failed"), RetrySettings(100.0, 60.0, retry_all=True), True),
    (skip("undecodable", pillow=PILLOW_VERSION), RetrySettings(100.0, 60.0, retry_all=True), True),
])
def test_an_unchanged_skipped_file_is_retried_when_what_it_depended_on_changed(state, settings, retried):
    plan = plan_images([f("bad.jpg")], {"bad.jpg": state}, Hasher({}), retry=settings)
    assert plan.retried == int(retried)
    assert [(j.file.rel, j.item_id) for j in plan.encode] == ([("bad.jpg", 1)] if retried else [])
    assert [x.id for x in plan.still_failing] == ([] if retried else [1])


def test_not_regular_files_are_recorded_once_and_replace_an_indexed_image():
    walk = WalkReport(special=[SpecialFile("pipe.jpg", Path("/r/pipe.jpg"), "FIFO", 0, 5),
                               SpecialFile("was-image.jpg", Path("/r/was-image.jpg"), "socket", 0, 5)])
    known = {"pipe.jpg": s(1, "pipe.jpg", size=0, mtime=5, sha=None, error="not a regular file (FIFO); skipped",
                           skip_info='{"cause": "not_regular", "type": "FIFO"}'),
             "was-image.jpg": s(2, "was-image.jpg")}
    plan = plan_images([], known, Hasher({}), walk)
    assert [x.id for x in plan.still_failing] == [1] and not plan.gone
    assert [(x.rel, item_id) for x, item_id in plan.not_regular] == [("was-image.jpg", 2)]


def rec(text, image=None, origin="sidecar:a.txt", line=1):
    return TextRecord(text, image, origin, line)


def test_texts_diff_as_multisets_and_only_synced_origins_are_removed():
    known = [
        TextState(1, "sidecar:a.txt", 10, "kept"),
        TextState(2, "sidecar:a.txt", 10, "dropped"),
        TextState(3, "captions:/c.jsonl", 10, "from a file not passed"),
        TextState(4, "sidecar:a.txt", 10, "dup"),
    ]
    records = [rec("kept", "a.jpg"), rec("dup", "a.jpg"), rec("dup", "a.jpg"), rec("new", "a.jpg"),
               rec("lonely", "missing.jpg", origin="captions:/d.jsonl", line=7)]
    problems = []
    plan = plan_texts(records, known, lambda o: o.startswith("sidecar:"), {"a.jpg": 10}, Path("/r"), problems)
    assert sorted(plan.remove) == [2]
    assert sorted((r.text, image_id) for r, image_id in plan.add) == [("dup", 10), ("new", 10)]
    assert plan.kept == 3
    assert [p.where for p in problems] == ["/d.jsonl:7"] and "missing.jpg" in problems[0].message
