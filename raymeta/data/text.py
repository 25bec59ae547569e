"""Character-level language modelling on Tiny Shakespeare (the data-modality transfer task).

Corpus: ``data/tinyshakespeare/input.txt`` of Karpathy's char-rnn repository (1,115,394 ASCII
characters, 65 distinct). Read from ``$RAYMETA_DATA_DIR/tinyshakespeare/input.txt`` if that file
exists, else from the download cache (``<cache>/tinyshakespeare/input.txt``, see
:func:`raymeta.data.datasets.cache_dir`), where it is fetched from :data:`TINYSHAKESPEARE_URL`
on first use. Whichever copy is used, its SHA-256 is checked, so that every result is on the
same text.

Conventions (char-rnn, nanoGPT): the vocabulary is the sorted set of characters of the whole
file; the first 90 % of the characters are the training stream, the last 10 % the validation
stream (the corpus has no separate test split: raymeta reports validation perplexity and bits
per character, and uses the validation windows as the "test" set of the training loop too).

Each stream is cut into non-overlapping windows of ``T + 1`` characters shifted by one:
window ``i`` gives input ``ids[i*T : (i+1)*T]`` and target ``ids[i*T+1 : (i+1)*T+1]``, so a
training split is a pair of ``(N, T)`` int64 tensors indexed exactly like an image dataset's
``(N, C, H, W)`` inputs and ``(N,)`` labels. Mini-batches are seeded permutations of the window
indices from :mod:`raymeta.data.batches`, sharded across data-parallel workers in the same way
(worker ``r`` of ``W`` takes the ``r``-th chunk of every global batch of ``W * B`` windows), so
``W`` workers with per-worker batch ``B`` see the batches of one worker with batch ``W * B``.
The LSTM state starts at zero in every window (no state carried across batches), which keeps
batches independent and data-parallel runs exact.

Metrics: mean cross-entropy ``L`` in nats per character; perplexity ``exp(L)``; bits per
character ``L / ln 2``. A uniform predictor over 65 characters has perplexity 65 and
``log2(65) = 6.02`` bits per character. MLR-SNet is fed ``L / ln(V)`` for a language model
(Shu et al., TPAMI 2022; docs/design.md section 3): :func:`mlrsnet_loss_scale`.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from raymeta.data.datasets import cache_dir
from raymeta.data.task import TaskData
from raymeta.errors import ConfigError, DataNotFoundError

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_CHARS = 1_115_394
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
VAL_FRACTION = 0.1


def _mismatch(data: bytes) -> str:
    return (
        f"sha256 {hashlib.sha256(data).hexdigest()} ({len(data)} bytes), expected "
        f"{TINYSHAKESPEARE_SHA256} ({TINYSHAKESPEARE_CHARS} bytes)"
    )


def _download(path: Path) -> None:
    """Fetch :data:`TINYSHAKESPEARE_URL` to ``path``: checked, then written to a temporary file
    in the same folder and renamed, so ``path`` is never partial (concurrent workers are safe).

    Raises:
        DataNotFoundError: the download failed or gave a different file (nothing is written).
    """
    fix = (
        f"put a copy of char-rnn's data/tinyshakespeare/input.txt at {path}, or at "
        "DIR/tinyshakespeare/input.txt and set RAYMETA_DATA_DIR=DIR"
    )
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=60) as response:
            data = response.read()
    except OSError as exc:  # URLError, HTTPError, timeouts
        reason = " ".join(str(getattr(exc, "reason", exc)).split())
        raise DataNotFoundError(
            f"cannot download Tiny Shakespeare from {TINYSHAKESPEARE_URL} ({reason}); {fix}"
        ) from None
    if hashlib.sha256(data).hexdigest() != TINYSHAKESPEARE_SHA256:
        raise DataNotFoundError(
            f"the file downloaded from {TINYSHAKESPEARE_URL} has {_mismatch(data)}; nothing "
            f"was saved; {fix}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".input.", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)


def find_tinyshakespeare() -> Path:
    """Path of ``input.txt``: ``$RAYMETA_DATA_DIR/tinyshakespeare/input.txt`` if it exists, else
    the download cache's copy, fetched from :data:`TINYSHAKESPEARE_URL` if missing.

    Raises:
        DataNotFoundError: the download failed or gave a different file.
    """
    env = os.environ.get("RAYMETA_DATA_DIR")
    if env and (Path(env) / "tinyshakespeare" / "input.txt").is_file():
        return Path(env) / "tinyshakespeare" / "input.txt"
    cached = cache_dir() / "tinyshakespeare" / "input.txt"
    if not cached.is_file():
        _download(cached)
    return cached


@dataclass(frozen=True)
class CharVocab:
    """A character vocabulary: ``chars[i]`` has id ``i`` (ids sorted by code point)."""

    chars: str

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``(len(text),)`` int64 ids. Raises ConfigError for a character outside the vocabulary."""
        index = {c: i for i, c in enumerate(self.chars)}
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.int64)
        except KeyError as exc:
            raise ConfigError(
                f"character {exc.args[0]!r} is not in the {self.size}-character vocabulary"
            ) from None

    def decode(self, ids: torch.Tensor) -> str:
        """The text of a 1-D id tensor."""
        return "".join(self.chars[i] for i in ids.tolist())


@dataclass(frozen=True)
class TextCorpus:
    """A character corpus split into a training and a validation stream.

    Attributes:
        name: ``tinyshakespeare``.
        vocab: the character vocabulary (65 characters for Tiny Shakespeare).
        train_ids: ``(N_train,)`` int64, the first ``1 - val_fraction`` of the characters.
        val_ids: ``(N_val,)`` int64, the rest.
    """

    name: str
    vocab: CharVocab
    train_ids: torch.Tensor
    val_ids: torch.Tensor


_CACHE: dict[tuple[str, float], TextCorpus] = {}


def load_tinyshakespeare(val_fraction: float = VAL_FRACTION) -> TextCorpus:
    """Read, check and encode Tiny Shakespeare; split it ``1 - val_fraction`` / ``val_fraction``
    by position (cached per process).

    Raises:
        ConfigError: ``val_fraction`` outside ``(0, 1)``.
        DataNotFoundError: the file cannot be downloaded, or is unreadable, truncated or a
            different text.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1) (got {val_fraction!r})")
    path = find_tinyshakespeare()
    key = (str(path), val_fraction)
    if key in _CACHE:
        return _CACHE[key]
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataNotFoundError(f"cannot read {path}: {exc}") from None
    if hashlib.sha256(raw).hexdigest() != TINYSHAKESPEARE_SHA256:
        raise DataNotFoundError(
            f"{path} is truncated or not the standard Tiny Shakespeare file: {_mismatch(raw)}; "
            f"replace it with a copy of {TINYSHAKESPEARE_URL}"
            + (", or delete it to download it again" if path.parent.parent == cache_dir() else "")
        )
    text = raw.decode("ascii")
    vocab = CharVocab("".join(sorted(set(text))))
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    lookup = torch.full((256,), -1, dtype=torch.int64)
    lookup[torch.tensor([ord(c) for c in vocab.chars])] = torch.arange(vocab.size)
    ids = lookup[ids]
    n_train = int(len(ids) * (1 - val_fraction))
    corpus = TextCorpus("tinyshakespeare", vocab, ids[:n_train], ids[n_train:])
    _CACHE[key] = corpus
    return corpus


def make_sequences(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D id stream into non-overlapping next-character windows.

    Args:
        ids: ``(L,)`` int64 character ids.
        seq_len: window length ``T >= 1``.

    Returns:
        ``(x, y)``, each ``(N, T)`` int64 with ``N = (L - 1) // T``; ``y[i, t] = x[i, t + 1]``
        within a window and ``y[i, T - 1]`` is the first character of the next window.

    Raises:
        ConfigError: ``seq_len < 1`` or the stream is shorter than one window.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1 (got {seq_len})")
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ConfigError(f"seq_len={seq_len} is longer than the text ({len(ids)} characters)")
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    return x, y


def load_text_task(
    seq_len: int,
    *,
    meta_sequences: int = 0,
    val_sequences: int | None = None,
    train_subset: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> TaskData:
    """Tiny Shakespeare as train / meta / validation window tensors on ``device``.

    The meta set (for MLR-SNet meta-training on the text task itself) is ``meta_sequences``
    training windows chosen by a seeded permutation and removed from the training split, so
    the two are disjoint and the validation stream stays untouched. ``train_subset`` caps the
    training windows (seeded, for quick runs); ``val_sequences`` keeps only the first windows
    of the validation stream (deterministic, for quick evaluation).

    Args:
        seq_len: window length ``T`` (characters of BPTT).
        meta_sequences: windows in the meta set (>= 0).
        val_sequences: optional cap on the validation windows.
        train_subset: optional cap on the training windows.
        seed: permutation seed of the meta/train split.
        device: where the tensors go.

    Raises:
        ConfigError: a size is negative, or the meta set leaves no training windows.
        DataNotFoundError: the corpus is missing or wrong (see :func:`load_tinyshakespeare`).
    """
    corpus = load_tinyshakespeare()
    train_x, train_y = make_sequences(corpus.train_ids, seq_len)
    val_x, val_y = make_sequences(corpus.val_ids, seq_len)
    if meta_sequences < 0 or (val_sequences is not None and val_sequences < 1):
        raise ConfigError(
            f"meta_sequences must be >= 0 and val_sequences >= 1 (got {meta_sequences}, "
            f"{val_sequences})"
        )
    if meta_sequences >= len(train_x):
        raise ConfigError(
            f"meta_sequences={meta_sequences} leaves no training windows "
            f"({len(train_x)} windows of {seq_len} characters)"
        )
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    meta_idx, train_idx = perm[:meta_sequences].sort().values, perm[meta_sequences:]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    train_idx = train_idx.sort().values
    if val_sequences is not None:
        val_x, val_y = val_x[:val_sequences], val_y[:val_sequences]
    val_x, val_y = val_x.to(device), val_y.to(device)
    return TaskData(
        train_x=train_x[train_idx].to(device),
        train_y=train_y[train_idx].to(device),
        val_x=val_x,
        val_y=val_y,
        meta_x=train_x[meta_idx].to(device),
        meta_y=train_y[meta_idx].to(device),
        test_x=val_x,
        test_y=val_y,
        num_classes=corpus.vocab.size,
        in_channels=1,
        image_size=seq_len,
        class_names=tuple(corpus.vocab.chars),
    )


def perplexity(mean_ce: float) -> float:
    """Perplexity ``exp(L)`` of a mean cross-entropy ``L`` in nats per character."""
    return math.exp(mean_ce)


def bits_per_char(mean_ce: float) -> float:
    """Bits per character ``L / ln 2`` of a mean cross-entropy ``L`` in nats per character."""
    return mean_ce / math.log(2)


def lm_metrics(mean_ce: float, prefix: str = "val_") -> dict[str, float]:
    """``{prefix}ppl`` and ``{prefix}bpc`` of a mean cross-entropy in nats per character."""
    return {f"{prefix}ppl": perplexity(mean_ce), f"{prefix}bpc": bits_per_char(mean_ce)}


def mlrsnet_loss_scale(vocab_size: int) -> float:
    """``ln(V)``: MLR-SNet's input for a language model is the batch loss divided by this
    (the loss of a uniform predictor), so image-trained meta-learners see losses on a similar
    scale (Shu et al., TPAMI 2022, data-modality transfer)."""
    return math.log(vocab_size)
