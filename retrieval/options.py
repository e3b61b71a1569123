"""Options and error handling shared by every ``crossmodal`` command."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import click

from indexer.errors import CrossmodalError
from indexer.layout import DEFAULT_INDEX_DIR

# C0 and C1 controls, and the characters that make a terminal start a new line or reorder text.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def printable(value: object) -> str:
    """``value`` as text a terminal shows on one line as written: control characters escaped (\\n, \\t,
    \\x1b), so a file name cannot break a table or send escape sequences. JSON output stays exact."""
    return _UNPRINTABLE.sub(_escape, str(value))


def domain_errors(func):
    """Turn our errors into click's one-line error, leaving real bugs their traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CrossmodalError as exc:
            raise click.ClickException(printable(exc)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; what was committed is kept, run the same command to resume") \
                from None

    return wrapper


def index_option(func):
    """``--index DIR`` and ``--catalog URL``: a PostgreSQL catalog binds the folder to it (recorded there, so
    later commands on the folder need only ``--index``)."""

    @functools.wraps(func)
    def bound(*args, catalog_url=None, **kwargs):
        if catalog_url:
            from indexer.location import bind_catalog

            try:
                bind_catalog(kwargs["index_dir"], catalog_url)
            except CrossmodalError as exc:
                raise click.ClickException(printable(exc)) from None
        return func(*args, **kwargs)

    bound = click.option("--catalog", "catalog_url", metavar="URL",
                         help="A PostgreSQL catalog (postgresql://USER@HOST[:PORT]/DB) instead of the SQLite file "
                              "in the index folder; remembered by the folder. [env var: CROSSMODAL_CATALOG, "
                              "for folders that have no catalog yet]")(bound)
    return click.option("--index", "index_dir", type=click.Path(path_type=Path), envvar="CROSSMODAL_INDEX",
                        default=DEFAULT_INDEX_DIR, show_default=True, show_envvar=True,
                        help="Index directory.")(bound)


def precision_option(func):
    return click.option("--precision", type=click.Choice(("auto", "fp32", "bf16")), envvar="CROSSMODAL_PRECISION",
                        default="auto", show_default=True, show_envvar=True,
                        help="What the model computes in. auto: bf16 on a GPU, and on a CPU with bf16 matrix "
                             "units (AMX, AVX-512 BF16); fp32 elsewhere.")(func)


def model_options(func):
    func = precision_option(func)
    func = click.option("--device", envvar="CROSSMODAL_DEVICE", default="auto", show_default=True,
                        show_envvar=True, help="auto, cpu or cuda[:N].")(func)
    func = click.option("--pretrained", envvar="CROSSMODAL_PRETRAINED", show_envvar=True,
                        help="Pretrained tag, local checkpoint (.safetensors/.pt/.bin) or 'none'. "
                             "Default: laion2b_s34b_b79k for ViT-B-32, or the index's own weights.")(func)
    func = click.option("--model", envvar="CROSSMODAL_MODEL", show_envvar=True,
                        help="open_clip model name. Default: ViT-B-32, or the model the index was built with.")(func)
    return func


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(func)


# --index-type and its settings: (option, spec parameter, click type, help)
_SPEC_OPTIONS = (
    ("--nlist", "nlist", click.IntRange(1), "ivf/ivfpq: inverted lists [default: about 4*sqrt(n)]."),
    ("--nprobe", "nprobe", click.IntRange(1), "ivf/ivfpq: lists searched per query [default: 16, or tuned]."),
    ("--pq-bytes", "m", click.IntRange(1), "ivfpq: bytes per PQ code [default: up to 64, dividing the dim]."),
    ("--opq/--no-opq", "opq", None, "ivfpq: rotate with OPQ before PQ [default: on]."),
    ("--shards", "shards", click.IntRange(1), "ivf/ivfpq: build N shards merged on disk; search maps the lists "
     "from disk instead of reading them into RAM (indexes bigger than RAM)."),
    ("--rerank", "rerank", click.IntRange(1), "ivfpq/lsh/itq: candidates scored again exactly."),
    ("--hnsw-m", "M", click.IntRange(2, 256), "hnsw: links per node [default: 32]."),
    ("--ef-construction", "ef_construction", click.IntRange(1), "hnsw: build-time beam [default: 80]."),
    ("--ef-search", "ef_search", click.IntRange(1), "hnsw: search beam [default: 64, or tuned]."),
    ("--bits", "bits", click.IntRange(64, 1024), "lsh/itq: code length, a multiple of 8 [default: 256]."),
    ("--target-recall", "target_recall", click.FloatRange(0, 1, min_open=True),
     "Tune the search setting to this recall@10 against exact search [auto: 0.95]."),
    ("--memory-budget", "memory_budget", str, "auto: bytes the index may take, e.g. 4GB."),
)
INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw", "lsh", "itq", "auto")


def parse_bytes(text: str) -> int:
    units = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
             "T": 2**40, "TB": 2**40}
    number = text.strip().upper().rstrip("IB") if text.strip().upper().endswith("IB") else text.strip().upper()
    digits = number.rstrip("KMGTB")
    try:
        return int(float(digits) * units[number[len(digits):]])
    except (ValueError, KeyError):
        raise click.BadParameter(f"'{text}' is not a size; write bytes or e.g. 512MB, 4GB") from None


def index_type_options(required: bool = False):
    """--index-type and its settings, handed to the command as one ``spec`` (an IndexSpec or None)."""
    from indexer.spec import IndexSpec

    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            kind = kwargs.pop("index_type")
            settings = {param: kwargs.pop(param) for _, param, _, _ in _SPEC_OPTIONS}
            settings = {k: v for k, v in settings.items() if v is not None}
            if "memory_budget" in settings:
                settings["memory_budget"] = parse_bytes(settings["memory_budget"])
            if kind is None and settings:
                raise click.UsageError(f"{', '.join(sorted(settings))} set without --index-type")
            try:
                kwargs["spec"] = None if kind is None else IndexSpec(kind, params=settings)
            except CrossmodalError as exc:
                raise click.UsageError(str(exc)) from None
            return func(*args, **kwargs)

        for flag, param, kind, text in reversed(_SPEC_OPTIONS):
            if kind is None:
                wrapper = click.option(flag, param, default=None, help=text)(wrapper)
            else:
                wrapper = click.option(flag, param, type=kind, default=None, help=text)(wrapper)
        return click.option("--index-type", "index_type", type=click.Choice(INDEX_TYPES), required=required,
                            default=None, help="Vector index kind [new index: flat]. See README: index types.")(wrapper)

    return decorator


def engine_options(func):
    """--engine and --ray-address: where the heavy part of a command runs."""
    func = click.option("--ray-address", metavar="ADDR", envvar="CROSSMODAL_RAY_ADDRESS", default=None,
                        help="With --engine ray: the cluster (HOST:6379, or ray://HOST:10001) "
                             "[default: a local Ray].")(func)
    return click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                        help="ray: decode and encode on a Ray cluster, and write the shards of --shards in Ray "
                             "tasks (pip install 'crossmodal-search[distributed]').")(func)


class ProgressBars:
    """The library's progress reports, ``(stage, done, total)``, as tqdm bars on stderr (one per stage).

    With ``bars=False`` (``--no-progress``, ``--json``) only the answer to Ctrl-C is said: the user pressed a key
    and should learn that the run heard it.
    """

    def __init__(self, bars: bool = True) -> None:
        self.show = bars
        self.bars: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "stopping":
            click.echo("\nstopping after this batch (Ctrl-C again to stop at once)", err=True)
            return
        if not self.show:
            return
        bar = self.bars.get(stage)
        if bar is None:
            from tqdm import tqdm

            bar = self.bars[stage] = tqdm(total=total, unit="img", desc=stage, smoothing=0.1)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
