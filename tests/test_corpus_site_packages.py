"""``--data site-packages``: every .py file of the installed packages, deduplicated, split by file."""

from __future__ import annotations

from pathlib import Path

import torch

from flexmoe.train import data


def _fake_roots(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(40):
        (a / "pkg").mkdir(parents=True, exist_ok=True)
        (a / "pkg" / f"m{i:02d}.py").write_text(f"x = {i}\n" * 5)
    (a / "pkg" / "__pycache__").mkdir()
    (a / "pkg" / "__pycache__" / "m00.py").write_text("cached\n")
    (a / "pkg" / "notes.txt").write_text("not python\n")
    (b / "vendored").mkdir(parents=True)
    (b / "vendored" / "copy.py").write_text("x = 3\n" * 5)  # same bytes as a/pkg/m03.py
    (b / "vendored" / "own.py").write_text("y = 1\n")
    (b / "vendored" / "empty.py").write_text("\n")
    return [a, b]


def test_site_packages_corpus_is_deduplicated_and_split_deterministically(tmp_path, monkeypatch):
    roots = _fake_roots(tmp_path)
    monkeypatch.setattr(data, "site_packages_roots", lambda: roots)
    corpus = data.load_corpus(data.SITE_PACKAGES, val_fraction=0.2)
    names = corpus.train_names + corpus.val_names
    assert corpus.root == "site-packages"
    assert len(names) == 41 and len(set(names)) == 41  # 40 + own.py; the copy and empty file are dropped
    assert "0/pkg/m03.py" in names and "1/vendored/copy.py" not in names and "1/vendored/own.py" in names
    assert not any("__pycache__" in n or n.endswith(".txt") for n in names)
    assert len(set(corpus.train_docs + corpus.val_docs)) == 41
    assert 0 < len(corpus.val_names) < 41 and not set(corpus.val_names) & set(corpus.train_names)
    again = data.load_corpus(data.SITE_PACKAGES, val_fraction=0.2)
    assert again.val_names == corpus.val_names and again.fingerprint() == corpus.fingerprint()


def test_site_packages_roots_hold_this_torch():
    roots = data.site_packages_roots()
    torch_dir = Path(torch.__file__).resolve().parent.parent
    assert torch_dir in roots
