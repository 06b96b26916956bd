"""Text corpora, the train/validation split by file, and the token-window stream.

Legend: B batch (sequences), S sequence length, N windows of S+1 tokens.
The default corpus is this Python's own standard library (.py files under sysconfig's
stdlib path, site-packages excluded): real text that is on every machine, no download.
``data="site-packages"`` is a larger one (about 250 MB with torch and transformers installed):
every .py file of the installed site-packages, deduplicated by content, so a long run stays
within one epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
SITE_PACKAGES = "site-packages"


class DataError(ValueError):
    """A data path that cannot be trained on (missing, empty, unreadable)."""


@dataclasses.dataclass
class Corpus:
    """Documents (raw bytes) split into train and validation, with their source names."""

    root: str
    train_docs: list[bytes]
    val_docs: list[bytes]
    train_names: list[str]
    val_names: list[str]

    def fingerprint(self) -> str:
        """A short hash of the names and sizes of both splits (detects a changed corpus on resume)."""
        h = hashlib.sha256()
        for split, names, docs in (("train", self.train_names, self.train_docs), ("val", self.val_names, self.val_docs)):
            for name, doc in zip(names, docs):
                h.update(f"{split}\0{name}\0{len(doc)}\n".encode())
        return h.hexdigest()[:16]


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """All .py files of the standard library, in sorted order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def site_packages_roots() -> list[Path]:
    """This interpreter's site-packages folders (purelib, platlib, site's list), existing, unique."""
    import site

    candidates = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    roots: list[Path] = []
    for c in candidates:
        path = Path(c).resolve()
        if path.is_dir() and path not in roots:
            roots.append(path)
    return roots


def site_packages_docs() -> list[tuple[str, bytes]]:
    """(name, bytes) of every .py file below the site-packages roots, sorted by name, the first
    of each group of byte-identical files only (vendored copies are common). Names are relative
    to their root, prefixed by the root's index when there are several."""
    roots = site_packages_roots()
    if not roots:
        raise DataError("--data site-packages: this Python has no site-packages folder")
    named = []
    for i, root in enumerate(roots):
        prefix = f"{i}/" if len(roots) > 1 else ""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            named.extend((prefix + (Path(dirpath) / f).relative_to(root).as_posix(), Path(dirpath) / f)
                         for f in sorted(filenames) if f.endswith(".py"))
    docs, seen = [], set()
    for name, file in sorted(named):
        doc = file.read_bytes()
        digest = hashlib.sha256(doc).digest()
        if digest not in seen:
            seen.add(digest)
            docs.append((name, doc))
    return docs


def text_files(path: Path) -> list[Path]:
    """A file, or every non-hidden file below a folder that looks like text (no NUL byte)."""
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_file():
        return [path]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for name in sorted(filenames):
            file = Path(dirpath) / name
            if not name.startswith(".") and file.is_file() and _looks_like_text(file):
                files.append(file)
    return files


def _looks_like_text(file: Path) -> bool:
    with open(file, "rb") as f:
        return b"\0" not in f.read(8192)


def _is_validation(name: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def load_corpus(data: str | None, val_fraction: float = 0.05) -> Corpus:
    """Read and split a corpus. ``data`` None is the standard library, "site-packages" the
    installed packages' sources (``site_packages_docs``); else a file or folder.

    Files go to validation by a hash of their path relative to the root (deterministic, same
    split on every machine); at least one file lands on each side. A single file is split at
    the last line break before ``1 - val_fraction`` of its bytes.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if data == SITE_PACKAGES:
        root = SITE_PACKAGES
        docs = site_packages_docs()
    else:
        root = default_corpus_root() if data is None else Path(data).expanduser()
        files = stdlib_files(root) if data is None else text_files(root)
        docs = [(f.relative_to(root).as_posix() if f != root else f.name, f.read_bytes()) for f in files]
    docs = [(name, doc) for name, doc in docs if doc.strip()]
    if not docs:
        raise DataError(f"data path {root} holds no non-empty text files")
    if len(docs) == 1:
        name, doc = docs[0]
        cut = doc.rfind(b"\n", 0, int(len(doc) * (1 - val_fraction))) + 1 or int(len(doc) * (1 - val_fraction))
        if cut <= 0 or cut >= len(doc):
            raise DataError(f"data file {root} is too short to split into train and validation")
        return Corpus(str(root), [doc[:cut]], [doc[cut:]], [name], [name + ":tail"])
    val = [_is_validation(name, val_fraction) for name, _ in docs]
    if all(val) or not any(val):
        val = [i == len(docs) - 1 for i in range(len(docs))]
    train_docs = [(n, d) for (n, d), v in zip(docs, val) if not v]
    val_docs = [(n, d) for (n, d), v in zip(docs, val) if v]
    return Corpus(
        str(root),
        [d for _, d in train_docs], [d for _, d in val_docs],
        [n for n, _ in train_docs], [n for n, _ in val_docs],
    )


class WindowStream:
    """Shuffled non-overlapping windows of S+1 tokens, one epoch after another.

    The position (epoch, index) is the whole data state: with the seed it replays the stream,
    so a resumed run sees exactly the batches an uninterrupted one would.
    Each of ``world_size`` ranks takes its own slice of every global batch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(
                f"training split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}"
            )
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """[B, S+1] tokens of this rank's share of the next global batch."""
        starts = []
        for _ in range(batch_size * world_size):
            if self.index == self.num_windows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            starts.append(int(self._order[self.index]) * self.seq_len)
            self.index += 1
        mine = starts[rank * batch_size:(rank + 1) * batch_size]
        return np.stack([self.tokens[s:s + self.seq_len + 1] for s in mine])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def validation_windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """[count', S+1] windows spread evenly over the validation tokens (count' <= count)."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
    picks = np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(np.int64))
    return np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in picks])
