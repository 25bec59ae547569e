"""A character-level LSTM language model (the text task of the data-modality transfer study).

Embedding -> ``torch.nn.LSTM`` (2 layers, batch-first; cuDNN on GPU) -> linear head over the
vocabulary, in the manner of char-rnn (Karpathy 2015) and PyTorch's ``word_language_model``
example. The LSTM state starts at zero in every window (see :mod:`raymeta.data.text`).

Output layout: :meth:`CharLSTM.forward` returns logits ``(B, V, T)`` — the class dimension
second, which is the layout ``torch.nn.functional.cross_entropy`` takes for per-position
targets ``(B, T)``. The classification code of raymeta therefore trains it unchanged:
``F.cross_entropy(model(x), y)`` is the mean loss per character, ``logits.argmax(1) == y`` the
per-character accuracy, and the functional look-ahead (``torch.func.functional_call``) of
MLR-SNet meta-training works on it as on a CNN.
"""

from __future__ import annotations

import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]


class CharLSTM(nn.Module):
    """Embedding + multi-layer LSTM + linear head.

    Args:
        vocab_size: ``V``, number of characters (65 for Tiny Shakespeare).
        embed_dim: embedding width.
        hidden_size: LSTM hidden and cell size per layer.
        num_layers: stacked LSTM layers (2 as in the brief and the paper's LSTM LMs).
        dropout: dropout between LSTM layers and before the head (0 disables it; with 0 the
            model is deterministic in train mode, which the data-parallel equivalence needs).

    876,929 parameters for the defaults and ``V = 65``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 64,
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(
            embed_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def step(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits and the final state, for generation or stateful evaluation.

        Args:
            x: ``(B, T)`` int64 character ids.
            state: ``(h, c)``, each ``(num_layers, B, hidden_size)``; zeros when None.

        Returns:
            ``(logits, (h, c))`` with logits ``(B, T, V)``.
        """
        out, state = self.lstm(self.embed(x), state)
        return self.head(self.drop(out)), state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-character logits ``(B, V, T)`` for inputs ``(B, T)`` (zero initial state)."""
        logits, _ = self.step(x)
        return logits.transpose(1, 2)


def build_char_lstm(in_channels: int, num_classes: int, image_size: int) -> CharLSTM:
    """Model-registry factory (``MODELS["char_lstm"]``): a :class:`CharLSTM` with
    ``vocab_size = num_classes``; ``in_channels`` and ``image_size`` are ignored."""
    return CharLSTM(num_classes)
