"""Which model made a set of vectors: the record stored in the catalog and checked on every open.

Kept apart from :mod:`indexer.encoder` so that reading an index (info, verify, export, eval) never
imports torch or open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ModelMismatch


def _installed_open_clip_version() -> str:
    # Asked only by identities made without a version, i.e. of a model just loaded (open_clip is in by then);
    # one read back from a catalog carries its own, so opening an index does not import open_clip.
    import open_clip

    return open_clip.__version__


@dataclass(frozen=True)
class ModelIdentity:
    """What makes vectors comparable: stored in the catalog, checked on every open.

    ``pretrained`` is the tag for downloaded weights, ``none`` for random init, or the checkpoint's
    file name for local weights, in which case ``checkpoint_sha256`` is what actually identifies them.
    """

    name: str
    pretrained: str
    embed_dim: int
    checkpoint_sha256: str | None = None
    checkpoint_path: str | None = None
    open_clip_version: str = field(default_factory=_installed_open_clip_version)

    def describe(self) -> str:
        weights = self.pretrained
        if self.checkpoint_sha256:
            weights = f"checkpoint {self.pretrained} (sha256 {self.checkpoint_sha256[:12]})"
        return f"{self.name} / {weights} ({self.embed_dim}-d)"

    def same_model(self, other: ModelIdentity) -> bool:
        if (self.name, self.embed_dim) != (other.name, other.embed_dim):
            return False
        if self.checkpoint_sha256 or other.checkpoint_sha256:
            return self.checkpoint_sha256 == other.checkpoint_sha256
        return self.pretrained == other.pretrained

    def require_same(self, other: ModelIdentity, action: str) -> None:
        if not self.same_model(other):
            raise ModelMismatch(
                f"cannot {action}: the index was built with {self.describe()}, "
                f"but the model given is {other.describe()}. Use the index's model, "
                "or build a new index (--index DIR) for the other model."
            )
