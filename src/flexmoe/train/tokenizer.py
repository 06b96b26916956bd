"""Tokenizers: raw bytes (default) or a byte-level BPE trained on the training split.

Both map a document (bytes) to token ids and end every document with an end-of-text token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"


class ByteTokenizer:
    """Token = byte value (0..255); 256 ends a document."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode_docs(self, docs: list[bytes]) -> np.ndarray:
        parts = []
        for doc in docs:
            parts.append(np.frombuffer(doc, dtype=np.uint8).astype(np.uint16))
            parts.append(np.array([self.eot_id], dtype=np.uint16))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        _atomic_write_text(path, json.dumps({"kind": "byte"}))


class BPETokenizer:
    """Byte-level BPE from the ``tokenizers`` library, trained on the training documents only."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot_id = tokenizer.token_to_id(EOT)

    @classmethod
    def train(cls, docs: list[bytes], vocab_size: int) -> "BPETokenizer":
        _require_tokenizers()
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator((d.decode("utf-8", errors="replace") for d in docs), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        _require_tokenizers()
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # the tokenizers library raises plain Exceptions
            raise ValueError(f"tokenizer file {path} is unreadable: {err}") from None

    def encode_docs(self, docs: list[bytes]) -> np.ndarray:
        texts = [d.decode("utf-8", errors="replace") for d in docs]
        parts = []
        for enc in self._tok.encode_batch(texts, add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.uint32))
            parts.append(np.array([self.eot_id], dtype=np.uint32))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, path: Path) -> None:
        from .checkpoint import library_os_error

        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # what a kill leaves is cleaned up
        try:
            self._tok.save(str(tmp))
        except Exception as err:  # the tokenizers library raises plain Exceptions, a full disk too
            tmp.unlink(missing_ok=True)
            raise library_os_error(err, path) from None
        os.replace(tmp, path)


def make_tokenizer(kind: str, train_docs: list[bytes], vocab_size: int, saved: Path | None):
    """The run's tokenizer: loaded from ``saved`` when that file exists (resume), else built."""
    if kind not in ("byte", "bpe"):
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {kind!r}")
    saved_kind = _saved_kind(saved) if saved is not None and saved.exists() else None
    if saved_kind not in (None, kind):
        raise ValueError(f"tokenizer mismatch: {saved} holds the run's {saved_kind} tokenizer, "
                         f"but --tokenizer {kind} was asked for")
    if kind == "byte":
        return ByteTokenizer()
    if saved_kind is not None:
        return BPETokenizer.load(saved)
    if vocab_size < 257:
        raise ValueError(f"BPE vocab_size must be >= 257, got {vocab_size}")
    return BPETokenizer.train(train_docs, vocab_size)


def _saved_kind(path: Path) -> str | None:
    """'byte' or 'bpe' for a saved tokenizer file (None when it is neither: ``load`` says why)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("kind") == "byte":
        return "byte"
    return "bpe" if isinstance(data, dict) and "model" in data else None


def _require_tokenizers() -> None:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ValueError("--tokenizer bpe needs the tokenizers library: pip install 'flexmoe[train]'") from None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # what a kill leaves is cleaned up
    tmp.write_text(text)
    os.replace(tmp, path)
