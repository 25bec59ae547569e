"""Tiny Shakespeare and the char-LSTM: corpus, download, windows, training, MLR-SNet on text."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from raymeta.data import text
from raymeta.data.batches import epoch_batches
from raymeta.data.text import (
    bits_per_char,
    find_tinyshakespeare,
    lm_metrics,
    load_text_task,
    load_tinyshakespeare,
    make_sequences,
    mlrsnet_loss_scale,
    perplexity,
)
from raymeta.errors import ConfigError, DataNotFoundError
from raymeta.meta.lookahead import functional_loss
from raymeta.meta.mlrsnet import MLRSNetMetaTrainer
from raymeta.models.charlstm import CharLSTM, build_char_lstm
from raymeta.schedules.mlrsnet import MLRSNet, MLRSNetSchedule
from raymeta.schedules.reference import load_reference

T = 64


@pytest.fixture(autouse=True)
def one_thread():
    """Small LSTM steps run faster on one thread, and far faster on a loaded 2-core host
    (no OpenMP spin-waiting); results are the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    return load_text_task(T, meta_sequences=64, val_sequences=128, seed=0)


def test_corpus_vocab_and_90_10_split():
    corpus = load_tinyshakespeare()
    assert corpus.vocab.size == 65
    assert corpus.vocab.chars[:13] == "\n !$&',-.3:;?" and corpus.vocab.chars[-1] == "z"
    assert len(corpus.train_ids) == 1_003_854 and len(corpus.val_ids) == 111_540
    assert len(corpus.train_ids) + len(corpus.val_ids) == 1_115_394
    assert corpus.vocab.decode(corpus.train_ids[:14]) == "First Citizen:"
    assert torch.equal(corpus.vocab.encode("First Citizen:"), corpus.train_ids[:14])
    # every character of the validation stream is in the vocabulary and ids are in range
    assert int(corpus.val_ids.min()) >= 0 and int(corpus.val_ids.max()) == 64


def test_windows_are_next_character_pairs():
    ids = torch.arange(20)
    x, y = make_sequences(ids, 6)
    assert x.shape == y.shape == (3, 6)
    assert x[1].tolist() == [6, 7, 8, 9, 10, 11] and y[1].tolist() == [7, 8, 9, 10, 11, 12]
    assert y[2, -1] == 18  # the target of a window's last position starts the next window


def test_text_task_splits(task):
    n_windows = (1_003_854 - 1) // T
    assert task.train_x.shape == (n_windows - 64, T) and task.meta_x.shape == (64, T)
    assert task.val_x.shape == (128, T) and task.test_x is task.val_x
    assert task.num_classes == 65 and task.image_size == T and len(task.class_names) == 65
    train_rows = {tuple(r) for r in task.train_x.tolist()}
    assert not any(tuple(r) in train_rows for r in task.meta_x.tolist())  # meta held out
    again = load_text_task(T, meta_sequences=64, val_sequences=128, seed=0)
    other = load_text_task(T, meta_sequences=64, val_sequences=128, seed=1)
    assert torch.equal(task.meta_x, again.meta_x) and not torch.equal(task.meta_x, other.meta_x)
    assert torch.equal(task.test_x, task.val_x)  # the corpus has no separate test split


def test_metrics():
    assert perplexity(math.log(65)) == pytest.approx(65)
    assert bits_per_char(math.log(2)) == pytest.approx(1)
    assert lm_metrics(math.log(4)) == pytest.approx({"val_ppl": 4.0, "val_bpc": 2.0})
    assert mlrsnet_loss_scale(65) == pytest.approx(4.1744, abs=1e-4)


def test_char_lstm_shapes_and_registry_factory():
    model = build_char_lstm(1, 65, T)
    assert isinstance(model, CharLSTM) and isinstance(model.lstm, torch.nn.LSTM)
    assert sum(p.numel() for p in model.parameters()) == 876_929
    x = torch.randint(0, 65, (3, 10))
    assert model(x).shape == (3, 65, 10)
    logits, (h, c) = model.step(x)
    assert logits.shape == (3, 10, 65) and h.shape == c.shape == (2, 3, 256)


def _val_ce(model, task, split="val"):
    x, y = (task.val_x, task.val_y) if split == "val" else (task.train_x[:256], task.train_y[:256])
    model.eval()
    with torch.no_grad():
        ce = F.cross_entropy(model(x), y).item()
    model.train()
    return ce


def _train(task, optimizer_fn, steps=40, schedule=None):
    """``steps`` steps of batch 32 on real windows; returns (initial ppl, final ppl, LRs)."""
    torch.manual_seed(0)
    model = CharLSTM(65, embed_dim=32, hidden_size=128)
    opt = optimizer_fn(model)
    first = perplexity(_val_ce(model, task))
    if schedule is not None:
        schedule.start_epoch(0, lambda: _val_ce(model, task, "train"))  # L0
    lrs = []
    batches = epoch_batches(len(task.train_x), 32, seed=0, epoch=0)
    for step, idx in zip(range(steps), batches, strict=False):
        x, y = task.train_x[idx], task.train_y[idx]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if schedule is not None:
            lrs.append(schedule.lr(step, 0, loss.item()))
            for group in opt.param_groups:
                group["lr"] = lrs[-1]
        opt.step()
    return first, perplexity(_val_ce(model, task)), lrs


def test_char_lstm_perplexity_falls_with_adam(task):
    # measured on this machine: validation perplexity 64.6 -> 20.9 after 40 Adam steps
    first, final, _ = _train(task, lambda m: torch.optim.Adam(m.parameters(), lr=3e-3))
    assert 55 < first < 75  # an untrained model is close to uniform over 65 characters
    assert final < 30


def test_frozen_image_meta_learner_trains_the_language_model(task):
    """Data-modality transfer: the released MLR-SNet (meta-trained on CIFAR-10 images) drives
    plain SGD on the char-LSTM, fed loss / ln(V). Measured: gamma 1.007, LR 0.73, validation
    perplexity 64.6 -> 28.4 in 40 steps (a fixed SGD LR of 1.0 reaches 27.8)."""
    schedule = MLRSNetSchedule(load_reference(), 65, epochs=1, loss_scale=mlrsnet_loss_scale(65))
    first, final, lrs = _train(
        task, lambda m: torch.optim.SGD(m.parameters(), lr=0.0), schedule=schedule
    )
    assert schedule.gamma == pytest.approx(1.0, abs=0.1)  # L0 ~ ln 65 and C = 65
    assert all(0 < lr < schedule.gamma for lr in lrs)
    assert first > 55 and final < 40


def test_mlrsnet_meta_step_runs_on_the_language_model(task):
    """Meta-training on text: the functional look-ahead works through torch.nn.LSTM."""
    torch.manual_seed(0)
    model = CharLSTM(65, embed_dim=16, hidden_size=32)
    x, y = task.train_x[:8], task.train_y[:8]
    params = dict(model.named_parameters())
    assert functional_loss(model, params, x, y).item() == pytest.approx(
        F.cross_entropy(model(x), y).item(), rel=1e-6
    )
    cell = MLRSNet()
    before = {k: v.clone() for k, v in cell.state_dict().items()}
    trainer = MLRSNetMetaTrainer(cell, 65, meta_batch_size=8, loss_scale=mlrsnet_loss_scale(65))
    trainer.start_epoch(0, lambda: F.cross_entropy(model(x), y).item())
    opt = torch.optim.SGD(model.parameters(), lr=0.0, weight_decay=5e-4)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    meta_loss = trainer.meta_step(model, opt, loss.item(), task.meta_x[:8], task.meta_y[:8])
    assert math.isfinite(meta_loss) and 3.5 < meta_loss < 4.8  # about ln 65 = 4.17 at init
    assert any(not torch.equal(before[k], v) for k, v in cell.state_dict().items())
    assert 0 < trainer.lr(0, 0, loss.item()) < trainer.gamma


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """No RAYMETA_DATA_DIR copy and an empty download cache; yields the cache's input.txt."""
    monkeypatch.delenv("RAYMETA_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(text, "_CACHE", {})
    return tmp_path / "cache" / "raymeta" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def corpus_bytes():
    return find_tinyshakespeare().read_bytes()  # the test copy, via RAYMETA_DATA_DIR


def test_corpus_is_downloaded_once_into_the_cache(
    monkeypatch, http_folder, corpus_bytes, fresh_cache
):
    """A real HTTP download (from a local server holding a copy): checked, stored in the cache
    with no temporary file left, then read from the cache without the network."""
    served, url = http_folder
    (served / "input.txt").write_bytes(corpus_bytes)
    monkeypatch.setattr(text, "TINYSHAKESPEARE_URL", f"{url}/input.txt")
    corpus = load_tinyshakespeare()
    assert len(corpus.train_ids) == 1_003_854 and corpus.vocab.size == 65
    assert fresh_cache.read_bytes() == corpus_bytes
    assert [p.name for p in fresh_cache.parent.iterdir()] == ["input.txt"]
    monkeypatch.setattr(text, "TINYSHAKESPEARE_URL", f"{url}/gone.txt")  # would be a 404
    monkeypatch.setattr(text, "_CACHE", {})
    assert torch.equal(load_tinyshakespeare().val_ids, corpus.val_ids)


def test_bad_download_is_one_line_error_and_saves_nothing(monkeypatch, http_folder, fresh_cache):
    served, url = http_folder
    corrupted = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 100
    (served / "input.txt").write_bytes(corrupted)
    monkeypatch.setattr(text, "TINYSHAKESPEARE_URL", f"{url}/input.txt")
    with pytest.raises(DataNotFoundError) as err:
        load_tinyshakespeare()
    msg = str(err.value)
    assert "\n" not in msg and f"downloaded from {url}/input.txt" in msg
    assert f"sha256 {hashlib.sha256(corrupted).hexdigest()} ({len(corrupted)} bytes)" in msg
    assert f"expected {text.TINYSHAKESPEARE_SHA256} (1115394 bytes)" in msg
    assert "RAYMETA_DATA_DIR" in msg and not fresh_cache.parent.exists()
    monkeypatch.setattr(text, "TINYSHAKESPEARE_URL", f"{url}/missing.txt")
    with pytest.raises(DataNotFoundError) as err:
        load_tinyshakespeare()
    assert str(err.value).startswith(
        f"cannot download Tiny Shakespeare from {url}/missing.txt (File not found); put a copy"
    )


def test_data_dir_copy_wins_and_is_checked(monkeypatch, tmp_path, corpus_bytes):
    """``$RAYMETA_DATA_DIR/tinyshakespeare/input.txt`` is used before the cache, and checked."""
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_bytes(corpus_bytes[:5000])
    monkeypatch.setenv("RAYMETA_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(text, "_CACHE", {})
    with pytest.raises(
        DataNotFoundError, match=r"truncated .*: sha256 [0-9a-f]{64} \(5000 bytes\), expected"
    ) as err:
        load_tinyshakespeare()
    assert "\n" not in str(err.value) and text.TINYSHAKESPEARE_URL in str(err.value)
    assert "delete it" not in str(err.value)  # not the cache: it would not be downloaded again


def test_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    from raymeta.data.datasets import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "raymeta"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "raymeta"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_sequences(torch.arange(10), 0), r"seq_len must be >= 1 \(got 0\)"),
        (lambda: make_sequences(torch.arange(5), 10), "seq_len=10 is longer than the text"),
        (lambda: load_text_task(T, meta_sequences=10**6), "meta_sequences=1000000 leaves no"),
        (lambda: load_tinyshakespeare(1.5), r"val_fraction must be in \(0, 1\)"),
        (lambda: load_tinyshakespeare().vocab.encode("café"), "'é' is not in the 65-character"),
    ],
)
def test_bad_input_is_one_line_config_error(call, message):
    with pytest.raises(ConfigError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_mlrsnet_meta_trains_on_the_text_task_itself():
    """MLR-SNet meta-training on Tiny Shakespeare through the shared loop: the meta set is
    carved from the training windows, the cell sees loss / ln(65), and it is updated."""
    import copy
    import math

    from raymeta.config import OuterLoopConfig, TaskConfig
    from raymeta.spec import meta_train_run
    from raymeta.train.build import build_run

    task = TaskConfig(
        dataset="tinyshakespeare", model="char_lstm", batch_size=16, epochs=1, seq_len=50,
        train_subset=320, meta_per_class=32, val_size=0,
    )  # fmt: skip
    outer = OuterLoopConfig(meta_every=2, meta_batch_size=16, meta_lr=1e-2, meta_weight_decay=1e-4)
    run = build_run(meta_train_run(outer, task, "text"))
    data, meta = run.data, run.schedule
    assert data.meta_x.shape == (32, 50) and data.train_x.shape == (320, 50)
    assert meta.loss_scale == pytest.approx(math.log(65))
    before = copy.deepcopy(meta.cell.state_dict())
    state = run.train()
    assert meta.meta_steps == 10
    assert any(not torch.equal(before[k], v) for k, v in meta.cell.state_dict().items())
    assert state.history[-1]["val_ppl"] < 40  # from about 65 (uniform over 65 characters)
