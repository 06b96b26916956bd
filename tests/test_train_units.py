"""Pieces of ``flexmoe train``: corpus split, token windows, tokenizers, the GPT-MoE, checkpoint files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import flexmoe
from flexmoe.models import GPTMoE, ModelConfig
from flexmoe.train.checkpoint import (CheckpointError, check_weights_fit, clean_temporaries, load_optimizer_state,
                                      nonfinite_tensors, optimizer_state_by_name, read_checkpoint, save_checkpoint,
                                      unique_state_dict)
from flexmoe.train.config import PRESETS, TrainConfig
from flexmoe.train.data import DataError, WindowStream, load_corpus, validation_windows
from flexmoe.train.loop import lr_factor
from flexmoe.train.tokenizer import BPETokenizer, ByteTokenizer, make_tokenizer


def test_default_corpus_is_the_standard_library_split_by_file():
    a, b = load_corpus(None), load_corpus(None)
    assert a.train_names == b.train_names and a.val_names == b.val_names
    assert not set(a.train_names) & set(a.val_names)
    assert all(n.endswith(".py") and "site-packages" not in n for n in a.train_names + a.val_names)
    assert 0.02 < len(a.val_names) / (len(a.train_names) + len(a.val_names)) < 0.1
    assert "os.py" in a.train_names + a.val_names


def test_folder_corpus_skips_hidden_binary_and_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n" * 50)
    (tmp_path / "b.md").write_text("beta\n" * 50)
    (tmp_path / ".hidden").write_text("secret\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("x\n")
    corpus = load_corpus(str(tmp_path))
    assert sorted(corpus.train_names + corpus.val_names) == ["a.txt", "b.md"]
    assert len(corpus.train_names) == 1 and len(corpus.val_names) == 1


def test_single_file_is_split_at_a_line_break(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "one.txt").write_text(text)
    corpus = load_corpus(str(tmp_path / "one.txt"), val_fraction=0.1)
    train, val = corpus.train_docs[0], corpus.val_docs[0]
    assert train + val == text.encode() and train.endswith(b"\n") and 0.08 < len(val) / len(text) < 0.12
    (tmp_path / "tiny.txt").write_text("x")
    with pytest.raises(DataError, match="too short"):
        load_corpus(str(tmp_path / "tiny.txt"))


def test_window_stream_replays_from_its_position_across_epochs():
    tokens = np.arange(1 + 10 * 8, dtype=np.uint16)  # 10 windows of 8 (+1)
    a = WindowStream(tokens, seq_len=8, seed=3)
    seen = [a.next_batch(5) for _ in range(2)]
    state = a.state_dict()
    later = [a.next_batch(3) for _ in range(5)]  # crosses into epoch 1 and 2
    b = WindowStream(tokens, seq_len=8, seed=3)
    b.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(later, [b.next_batch(3) for _ in range(5)]))
    starts = np.concatenate([s[:, 0] for s in seen])
    assert sorted(starts.tolist()) == list(range(0, 80, 8))  # epoch 0 is a permutation of all windows
    assert all(np.array_equal(w[:, 1:], w[:, :-1] + 1) for w in seen)
    c0, c1 = WindowStream(tokens, 8, 3), WindowStream(tokens, 8, 3)
    r0, r1 = c0.next_batch(2, rank=0, world_size=2), c1.next_batch(2, rank=1, world_size=2)
    assert np.array_equal(np.concatenate([r0, r1]), WindowStream(tokens, 8, 3).next_batch(4))
    with pytest.raises(DataError, match="fewer than one sequence"):
        WindowStream(tokens[:5], seq_len=8, seed=0)
    assert len(validation_windows(tokens, 8, 4)) == 4 and len(validation_windows(tokens, 8, 50)) == 10


def test_tokenizers_round_trip():
    docs = [b"def f(x):\n    return x + 1\n", "caf\u00e9 = '\u00fcber'\n".encode()]
    byte = ByteTokenizer()
    ids = byte.encode_docs(docs)
    assert ids.tolist().count(byte.eot_id) == 2 and byte.decode(ids) == (docs[0] + docs[1]).decode()
    bpe = BPETokenizer.train(docs * 20, vocab_size=300)
    ids = bpe.encode_docs(docs)
    assert ids.tolist().count(bpe.eot_id) == 2 and len(ids) < sum(map(len, docs))
    assert bpe.decode([i for i in ids if i != bpe.eot_id]) == (docs[0] + docs[1]).decode()


def test_gpt_is_causal_and_places_moe_blocks():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, seq_len=12, d_model=16, n_layers=4, n_heads=2, d_ff=8, num_experts=4,
                      moe_every=2, kernels="torch")
    model = GPTMoE(cfg)
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["DenseFFN", "MoELayer", "DenseFFN", "MoELayer"] and cfg.moe_block_indices == [1, 3]
    assert model.lm_head.weight is model.tok_emb.weight
    tokens = torch.randint(0, 50, (2, 12))
    logits = model(tokens)
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])
    learned = GPTMoE(ModelConfig(vocab_size=50, seq_len=12, d_model=16, n_layers=1, n_heads=2, d_ff=8,
                                 num_experts=1, positions="learned", tie_embeddings=False))
    assert learned.pos_emb is not None and learned.lm_head.weight is not learned.tok_emb.weight
    assert learned(tokens).shape == (2, 12, 50)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_heads=3), "ModelConfig.n_heads"), (dict(router="top2"), "ModelConfig.router"),
    (dict(top_k=9), "ModelConfig.top_k"), (dict(positions="alibi"), "ModelConfig.positions"),
    (dict(moe_every=0), "ModelConfig.moe_every"),
])
def test_model_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "TrainConfig.lr"), (dict(min_lr=1.0), "min_lr"), (dict(beta2=1.0), "TrainConfig.beta2"),
    (dict(steps=0), "TrainConfig.steps"), (dict(placement_interval=5), "expert_parallel"),
    (dict(precision="fp16"), "TrainConfig.precision"),
])
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_presets_are_valid_and_lr_schedule_shape():
    for preset in PRESETS.values():
        ModelConfig(**preset.model), TrainConfig(**preset.train)
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    factors = [lr_factor(cfg, s) for s in range(101)]
    assert factors[0] == pytest.approx(1 / 11) and factors[10] == 1.0
    assert factors[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_checkpoint_round_trip_with_tied_weights_and_optimizer_by_name(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=8, num_experts=4,
                      router="dts", kernels="torch")
    model = GPTMoE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    flexmoe.runtime.set_gate_step(model, 7)
    model(torch.randint(0, 30, (2, 8))).sum().backward()
    opt.step()
    weights = unique_state_dict(model)
    assert "lm_head.weight" not in weights and int(weights["blocks.0.ffn.router.gate_step"]) == 7
    state = {"optimizer": optimizer_state_by_name(model, opt)}
    path = save_checkpoint(tmp_path, 3, weights, state, {"note": "x"}, keep=1)
    save_checkpoint(tmp_path, 4, weights, state, {}, keep=1)
    assert not path.exists() and (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    loaded, meta, saved = read_checkpoint(tmp_path / "checkpoints" / "step_0000004")
    fresh = GPTMoE(cfg)
    fresh.load_state_dict(loaded, strict=False)
    assert fresh.lm_head.weight is fresh.tok_emb.weight and fresh.blocks[1].ffn.router.step == 7
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    fresh_opt = torch.optim.AdamW(list(reversed(list(fresh.parameters()))), lr=1e-2)
    load_optimizer_state(fresh, fresh_opt, saved["optimizer"], "x")
    names = {id(p): n for n, p in fresh.named_parameters()}
    for p, s in fresh_opt.state.items():
        ref = opt.state[dict(model.named_parameters())[names[id(p)]]]
        assert torch.equal(s["exp_avg"], ref["exp_avg"])
    (tmp_path / "checkpoints" / "step_0000004" / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="manifest.json is corrupt"):
        read_checkpoint(tmp_path / "checkpoints" / "step_0000004")


def test_plots_count_steps_alike_and_say_the_balance_is_smoothed(tmp_path, monkeypatch):
    """The heatmap's x axis shows step numbers (trace index + 1, as in loss.png and the metrics);
    the balance plot's title names its moving-average window."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from flexmoe.train.plot import plot_balance, plot_expert_load

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    counts_TLWE = np.random.default_rng(0).integers(0, 9, size=(40, 2, 1, 4))
    plot_expert_load(counts_TLWE, np.arange(40), tmp_path, "run")
    left, right, _, _ = figures[-1].axes[0].images[0].get_extent()
    assert (left, right) == (0.5, 40.5)  # steps 1..40, the first optimizer step is step 1
    records = [{"kind": "train", "step": s, "loss": 1.0, "balance_per_layer": [1.0 + s % 3, 1.2]}
               for s in range(1, 41)]
    plot_balance(records, tmp_path, "run")
    assert "moving average over 2 steps" in figures[-1].axes[0].get_title()
    for figure in figures:
        close(figure)


def test_weights_of_another_shape_name_each_tensor():
    small = GPTMoE(ModelConfig(vocab_size=30, seq_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=8, num_experts=4))
    big = GPTMoE(ModelConfig(vocab_size=30, seq_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=8, num_experts=8))
    with pytest.raises(CheckpointError, match="another model shape.*gate_up_proj: checkpoint \\[4,"):
        check_weights_fit(big, unique_state_dict(small), "ckpt")


def test_a_saved_tokenizer_of_another_kind_is_a_mismatch(tmp_path):
    docs = [b"def f(x):\n    return x + 1\n"] * 20
    (tmp_path / "byte.json").write_text('{"kind": "byte"}')
    with pytest.raises(ValueError, match="tokenizer mismatch: .*byte.json holds the run's byte tokenizer"):
        make_tokenizer("bpe", docs, 300, tmp_path / "byte.json")
    trained = BPETokenizer.train(docs, 300)
    trained.save(tmp_path / "bpe.json")
    with pytest.raises(ValueError, match="holds the run's bpe tokenizer, but --tokenizer byte"):
        make_tokenizer("byte", docs, 300, tmp_path / "bpe.json")
    assert make_tokenizer("bpe", docs, 300, tmp_path / "bpe.json").vocab_size == trained.vocab_size


def test_nonfinite_tensors_are_named_in_weights_and_optimizer_state():
    weights = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "n": torch.arange(3)}
    opt = {"state": {"w": {"exp_avg": torch.tensor([float("nan")]), "step": torch.tensor(3.0)}}, "param_groups": []}
    assert nonfinite_tensors(weights, opt) == ["b", "optimizer.state.w.exp_avg"]
    assert nonfinite_tensors({"a": torch.ones(2), "e": torch.empty(0)}, {"state": {}}) == []
    with pytest.raises(CheckpointError, match="refusing to write checkpoint step 1: non-finite values in b"):
        save_checkpoint(Path("/nonexistent"), 1, weights, {}, {}, keep=1)


def test_clean_temporaries_removes_partial_writes_and_restores_a_lone_stale_copy(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_0000002", ".stale-step_0000002-7", ".stale-step_0000004-7", ".tmp-step_0000006-7"):
        (root / name).mkdir(parents=True)
        (root / name / "state.pt").write_text(name)
    (root / ".latest.tmp-7").write_text("x")
    (tmp_path / ".config.json.tmp-7").write_text("x")
    (tmp_path / "config.json").write_text("{}")
    removed = clean_temporaries(tmp_path)
    assert sorted(removed) == [".config.json.tmp-7", "checkpoints/.latest.tmp-7", "checkpoints/.stale-step_0000002-7",
                               "checkpoints/.tmp-step_0000006-7"]
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000004"]
    assert (root / "step_0000004" / "state.pt").read_text() == ".stale-step_0000004-7"  # the only copy, kept
    assert (root / "step_0000002" / "state.pt").read_text() == "step_0000002"


def test_rotation_keeps_the_newest_checkpoints_of_the_branch_being_trained(tmp_path):
    """A resumed branch writes steps 3, 4, 5 in a run whose checkpoints are steps 4 and 6: the old
    rotation kept the abandoned step 6 and removed every new checkpoint but the last ([5, 6])."""
    weights, state = {"w": torch.ones(2)}, {"optimizer": {"state": {}, "param_groups": []}}
    for step in (2, 4, 6, 3, 4, 5):
        save_checkpoint(tmp_path, step, weights, state, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_0000004", "step_0000005", "step_0000006"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000005"
