"""A generated image–caption corpus: coloured shapes on textured backgrounds, captions that pin them down.

Each scene has 1-3 shapes (kind, colour, size, one of 9 grid cells) on a background. Captions are
built from a structured :class:`Mention` list, so whether a caption fits a scene is decidable: that
is how :func:`ceiling` measures the share of captions that single out exactly one image of their
gallery, the best recall@1 any model could reach. Everything is a function of (seed, index): the
same arguments give the same files on every machine.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from PIL.TiffImagePlugin import IFDRational

KINDS = {  # kind -> words a caption may use for it
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
    "hexagon": ("hexagon",),
}
COLOURS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (240, 210, 40),
    "purple": (135, 60, 175), "orange": (245, 135, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SIZES = {"small": 0.12, "medium": 0.19, "large": 0.27}  # shape diameter / image side
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium", "medium-sized", "mid-sized"),
              "large": ("large", "big", "huge")}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_WORDS = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "at the top middle", "in the upper middle"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "at the middle left", "on the left side"),
    "center": ("in the center", "in the middle", "at the centre"),
    "right": ("on the right", "at the middle right", "on the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom middle", "in the lower middle"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (225, 205, 165), "teal": (40, 130, 130),
               "pink": (240, 170, 190), "brown": (110, 70, 40), "navy": (25, 35, 85)}
RELATIONS = {"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
             "above": ("above", "over"), "below": ("below", "under")}
NUMBERS = {2: "two", 3: "three"}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str

    @property
    def cell(self) -> tuple[int, int]:  # (row, column)
        return divmod(POSITIONS.index(self.position), 3)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str


@dataclass(frozen=True)
class Mention:
    """What a caption says of one shape; None means the caption leaves it open."""

    kind: str
    colour: str
    size: str | None = None
    position: str | None = None

    def fits(self, shape: Shape) -> bool:
        return (self.kind == shape.kind and self.colour == shape.colour
                and self.size in (None, shape.size) and self.position in (None, shape.position))


@dataclass(frozen=True)
class Caption:
    """A caption's text and its meaning: exactly the mentioned shapes, related as stated."""

    text: str
    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str, int], ...] = ()  # (mention a, relation, mention b)
    background: str | None = None

    def fits(self, scene: Scene) -> bool:
        if len(scene.shapes) != len(self.mentions) or self.background not in (None, scene.background):
            return False
        return any(
            all(m.fits(s) for m, s in zip(self.mentions, order))
            and all(_related(order[a], rel, order[b]) for a, rel, b in self.relations)
            for order in itertools.permutations(scene.shapes)
        )


def _related(a: Shape, relation: str, b: Shape) -> bool:
    (ra, ca), (rb, cb) = a.cell, b.cell
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


@dataclass
class Sample:
    index: int
    scene: Scene
    captions: list[Caption] = field(default_factory=list)


def make_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    shapes = tuple(
        Shape(str(rng.choice(list(KINDS))), str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES))),
              POSITIONS[int(cell)])
        for cell in sorted(cells)
    )
    return Scene(shapes, str(rng.choice(list(BACKGROUNDS))))


# --- captions ------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(rng, shape: Shape, with_size: bool, plural: bool = False) -> str:
    kind = _pick(rng, KINDS[shape.kind])
    if plural:
        kind = kind + ("es" if kind.endswith(("x", "s")) else "s")
    words = ([_pick(rng, SIZE_WORDS[shape.size])] if with_size else []) + [shape.colour, kind]
    return " ".join(words)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _with_background(rng, body: str, scene: Scene) -> tuple[str, str | None]:
    # A lone shape needs its background to single out its image among ~1,000.
    if len(scene.shapes) > 1 and rng.random() < 0.25:
        return body, None
    where = _pick(rng, ("on a {} background", "against a {} backdrop", "over a {} background"))
    return f"{body} {where.format(scene.background)}", scene.background


def _listing(rng, scene: Scene) -> Caption:
    """Every shape with colour, kind, usually size, and position: "a small red circle in the center"."""
    mentions, parts = [], []
    for shape in rng.permutation(len(scene.shapes)):
        shape = scene.shapes[int(shape)]
        with_size = len(scene.shapes) == 1 or rng.random() < 0.85
        parts.append(f"{_article(_noun(rng, shape, with_size))} {_pick(rng, POSITION_WORDS[shape.position])}")
        mentions.append(Mention(shape.kind, shape.colour, shape.size if with_size else None, shape.position))
    body, background = _with_background(rng, _join(parts), scene)
    lead = _pick(rng, ("", "there is ", "a picture of ", "an image showing ", "this shows "))
    return Caption(lead + body, tuple(mentions), background=background)


def _relation(rng, scene: Scene) -> Caption:
    """Two shapes related to each other, the rest placed: "a big blue star above a red square"."""
    a, b = (int(i) for i in rng.permutation(len(scene.shapes))[:2])
    (ra, ca), (rb, cb) = scene.shapes[a].cell, scene.shapes[b].cell
    options = ([("left of" if ca < cb else "right of")] if ca != cb else []) + (
        [("above" if ra < rb else "below")] if ra != rb else [])
    relation = _pick(rng, options)
    mentions = [Mention(s.kind, s.colour, s.size) for s in (scene.shapes[a], scene.shapes[b])]
    text = (f"{_article(_noun(rng, scene.shapes[a], True))} {_pick(rng, RELATIONS[relation])} "
            f"{_article(_noun(rng, scene.shapes[b], True))}")
    rest = [s for i, s in enumerate(scene.shapes) if i not in (a, b)]
    for shape in rest:
        text += f", and {_article(_noun(rng, shape, True))} {_pick(rng, POSITION_WORDS[shape.position])}"
        mentions.append(Mention(shape.kind, shape.colour, shape.size, shape.position))
    body, background = _with_background(rng, text, scene)
    return Caption(body, tuple(mentions), relations=((0, relation, 1),), background=background)


def _counting(rng, scene: Scene) -> Caption:
    """Shapes grouped and counted, positions left out: "three shapes: two large red circles and ..."."""
    groups: dict[tuple[str, str, str], list[Shape]] = {}
    for shape in scene.shapes:
        groups.setdefault((shape.size, shape.colour, shape.kind), []).append(shape)
    parts, mentions = [], []
    for members in groups.values():
        n = len(members)
        noun = _noun(rng, members[0], True, plural=n > 1)
        parts.append(f"{NUMBERS[n]} {noun}" if n > 1 else _article(noun))
        mentions += [Mention(s.kind, s.colour, s.size) for s in members]
    total = len(scene.shapes)
    lead = f"{NUMBERS[total]} shapes: " if total > 1 and rng.random() < 0.5 else ""
    body, background = _with_background(rng, lead + _join(parts), scene)
    return Caption(body, tuple(mentions), background=background)


def make_captions(rng: np.random.Generator, scene: Scene, n: int = 3) -> list[Caption]:
    # Counting and relations only say something about several shapes; a lone shape is listed.
    styles = [_listing, _listing, _counting, _relation, _relation] if len(scene.shapes) > 1 else [_listing]
    return [_pick(rng, styles)(rng, scene) for _ in range(n)]


# --- rendering -----------------------------------------------------------------------------------

def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        points = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        points = [(x * 0.8, y * 0.8) for x, y in points]
    elif kind == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "diamond":
        points = [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    elif kind == "star":
        points = [((1 if i % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + i * math.pi / 5),
                   (1 if i % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    elif kind == "hexagon":
        points = [(math.cos(i * math.pi / 3), math.sin(i * math.pi / 3)) for i in range(6)]
    elif kind == "cross":
        t = 0.3
        points = [(t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
                  (-t, -t), (-t, -1)]
    else:
        raise ValueError(kind)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def _background(rng: np.random.Generator, name: str, side: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[name], dtype=np.float32) + rng.normal(0, 12, 3)
    ramp = np.linspace(-1, 1, side, dtype=np.float32)
    gradient = np.add.outer(ramp * rng.normal(0, 18), ramp * rng.normal(0, 18))[..., None]
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    period, theta = rng.uniform(6, 20) * side / 128, rng.uniform(0, math.pi)
    texture = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)[..., None]
    return base + gradient + texture * rng.uniform(4, 14)


def render(scene: Scene, rng: np.random.Generator, side: int = 128) -> Image.Image:
    canvas = Image.fromarray(np.clip(_background(rng, scene.background, side), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    cell = side / 3
    for shape in scene.shapes:
        row, col = shape.cell
        r = SIZES[shape.size] * side / 2 * rng.uniform(0.92, 1.08)
        slack = max(0.0, cell / 2 - r) * 0.8
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        colour = tuple(int(np.clip(c + rng.normal(0, 10), 0, 255)) for c in COLOURS[shape.colour])
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_polygon(shape.kind, cx, cy, r, rng.uniform(-0.25, 0.25)), fill=colour)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8)))
    noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0, rng.uniform(3, 10), (side, side, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


# --- corpus --------------------------------------------------------------------------------------

def _describe(seed: int, index: int, captions: int) -> tuple[Sample, np.random.Generator]:
    rng = np.random.default_rng([seed, index])
    scene = make_scene(rng)
    return Sample(index, scene, make_captions(rng, scene, captions)), rng


def sample(seed: int, index: int, captions: int = 3) -> tuple[Sample, Image.Image]:
    item, rng = _describe(seed, index, captions)
    return item, render(item.scene, rng)


def ceiling(samples: Sequence[Sample]) -> float:
    """Share of captions that fit exactly one scene of the gallery: the best achievable text->image R@1."""
    scenes = [s.scene for s in samples]
    captions = [c for s in samples for c in s.captions]
    if not captions:
        return 0.0
    unique = sum(1 for c in captions if sum(c.fits(scene) for scene in scenes) == 1)
    return unique / len(captions)


def split_sizes(n: int, test: int | None, val: int | None) -> dict[str, int]:
    test = min(1000, n // 5) if test is None else test
    val = min(500, n // 10) if val is None else val
    if test < 0 or val < 0 or test + val > n:
        raise ValueError(f"--test {test} and --val {val} do not fit in --n {n}")
    return {"train": n - test - val, "val": val, "test": test}


@dataclass
class CorpusSummary:
    out: str
    splits: dict[str, int]
    captions: int
    ceiling_test: float | None
    karpathy_json: str


def write_corpus(out: Path, n: int, seed: int = 0, *, test: int | None = None, val: int | None = None,
                 side: int = 128, captions_per_image: int = 3) -> CorpusSummary:
    """Write ``n`` images under ``out/{train,val,test}/`` with sidecar captions and a Karpathy JSON.

    Every fourth image is a PNG, the rest JPEG, so both decoders are exercised.
    """
    sizes = split_sizes(n, test, val)
    images, per_split, index = [], {"train": [], "val": [], "test": []}, 0
    for split, count in sizes.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            item, image = sample(seed, index, captions_per_image)
            name = f"{index:06d}." + ("png" if index % 4 == 3 else "jpg")
            image.save(out / split / name, **({"quality": 92} if name.endswith("jpg") else {}))
            (out / split / name).with_suffix(".txt").write_text("".join(c.text + "\n" for c in item.captions))
            images.append(_karpathy_entry(item, split, name, len(images)))
            per_split[split].append(item)
            index += 1
    dataset = out / "dataset_synth.json"
    dataset.write_text(json.dumps({"dataset": "crossmodal-synth", "seed": seed, "images": images}))
    return CorpusSummary(str(out), sizes, sum(len(s.captions) for s in itertools.chain(*per_split.values())),
                         round(ceiling(per_split["test"]), 4) if per_split["test"] else None, str(dataset))


def _karpathy_entry(item: Sample, split: str, name: str, imgid: int) -> dict:
    first = imgid * len(item.captions)
    return {
        "filepath": split, "filename": name, "split": split, "imgid": imgid,
        "sentids": list(range(first, first + len(item.captions))),
        "sentences": [{"raw": c.text, "tokens": c.text.replace(",", "").replace(":", "").split(),
                       "imgid": imgid, "sentid": first + i} for i, c in enumerate(item.captions)],
    }


def scenes_of(seed: int, indices: Iterable[int], captions: int = 3) -> list[Sample]:
    """The samples ``write_corpus`` would write at these indices, without rendering or writing them."""
    return [_describe(seed, index, captions)[0] for index in indices]


COPY_KINDS = ("resized", "recompressed", "cropped", "brighter")


def write_near_copies(images: Sequence[Path], out: Path, seed: int = 0) -> list[tuple[Path, Path, str]]:
    """One altered copy of each image in ``out``: resized to 60-80%, re-encoded as a low-quality JPEG,
    cropped by 4-8% a side, or brightened by 15-30%, in turn. Returns (original, copy, kind) triples:
    the ground truth of a near-duplicate search."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for n, path in enumerate(images):
        kind = COPY_KINDS[n % len(COPY_KINDS)]
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        w, h = image.size
        if kind == "resized":
            scale = rng.uniform(0.6, 0.8)
            image = image.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.LANCZOS)
        elif kind == "cropped":
            dx, dy = round(w * rng.uniform(0.04, 0.08)), round(h * rng.uniform(0.04, 0.08))
            image = image.crop((dx, dy, w - dx, h - dy))
        elif kind == "brighter":
            image = Image.fromarray(np.clip(np.asarray(image, np.float32) * rng.uniform(1.15, 1.3), 0, 255)
                                    .astype(np.uint8))
        copy = out / f"{path.stem}-{kind}.jpg"
        image.save(copy, quality=int(rng.integers(25, 45)) if kind == "recompressed" else 90)
        made.append((path, copy, kind))
    return made


def stamp_photo_meta(path: Path, taken_at: str | dt.datetime | None = None, make: str | None = None,
                     model: str | None = None, gps: tuple[float, float] | None = None,
                     orientation: int | None = None) -> Path:
    """Rewrite the JPEG at ``path`` (quality 92) with this EXIF, for corpora with cameras, dates and places.

    ``taken_at`` becomes DateTimeOriginal (a datetime or ISO text; other text is written as given, a
    broken date on purpose included), ``gps`` is (latitude, longitude) in degrees, south and west
    negative, ``orientation`` the EXIF tag 1..8 (the pixels are not turned). Other EXIF is kept.
    """
    with Image.open(path) as opened:
        image = opened.convert("RGB")
        exif = opened.getexif()
        exif_ifd, gps_ifd = exif.get_ifd(0x8769), exif.get_ifd(0x8825)
    for tag, value in ((0x010F, make), (0x0110, model), (0x0112, orientation)):
        if value is not None:
            exif[tag] = value
    if taken_at is not None:
        exif_ifd[0x9003] = _exif_date(taken_at)
    if gps is not None:
        lat, lon = gps
        gps_ifd.update({1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W", 4: _dms(lon)})
    image.save(path, format="JPEG", quality=92, exif=exif)
    return path


def _exif_date(value: str | dt.datetime) -> str:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    return value.strftime("%Y:%m:%d %H:%M:%S")


def _dms(degrees: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    # Whole degrees and minutes, seconds in 1/10000ths: exact integers, so seconds never round up to 60.
    units = round(abs(degrees) * 3600 * 10000)
    whole, rest = divmod(units, 3600 * 10000)
    minutes, seconds = divmod(rest, 60 * 10000)
    return IFDRational(whole, 1), IFDRational(minutes, 1), IFDRational(seconds, 10000)
