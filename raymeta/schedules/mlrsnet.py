"""The MLR-SNet meta-learner and the learned LR schedule it drives.

Source: Shu et al., "MLR-SNet: Transferable LR Schedules for Heterogeneous Tasks", TPAMI 2022
(arXiv 2007.14546), Sec. 3 (architecture, Eq. 4-5) and Sec. 4.2 (meta-test protocol).

Canonical cell layout used throughout raymeta (other layouts are mapped into it by
:mod:`raymeta.schedules.reference`): one LSTM cell with hidden size ``H`` (50) whose
input-to-hidden and hidden-to-hidden maps are 2-layer MLPs (hidden 25); the ``4H`` gate
pre-activations are ordered **input, forget, candidate, output** (``torch.nn.LSTMCell``'s
order) with no constant forget-gate offset (any offset lives in the bias). The output is
``lr_t = gamma * sigmoid(W h_t + b)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raymeta.errors import ConfigError
from raymeta.schedules.base import Schedule
from raymeta.schedules.mlrsnet_settings import HIDDEN_SIZE, MLP_HIDDEN

State = tuple[torch.Tensor, torch.Tensor]


class MLRSNet(nn.Module):
    """The MLR-SNet meta-learner: an LSTM cell with MLP gate maps and a sigmoid head.

    Args:
        hidden_size: LSTM hidden size ``H`` (paper: 50).
        mlp_hidden: hidden width of the two gate MLPs (paper: 25). About 11.8k parameters
            for the defaults.
    """

    def __init__(self, hidden_size: int = HIDDEN_SIZE, mlp_hidden: int = MLP_HIDDEN):
        super().__init__()
        self.hidden_size, self.mlp_hidden = hidden_size, mlp_hidden
        self.fc_i2h = nn.Sequential(
            nn.Linear(1, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, 4 * hidden_size)
        )
        self.fc_h2h = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, 4 * hidden_size)
        )
        self.head = nn.Linear(hidden_size, 1)

    def initial_state(self) -> State:
        """Zero ``(h, c)``, each ``(1, H)``."""
        w = self.head.weight
        zeros = torch.zeros(1, self.hidden_size, device=w.device, dtype=w.dtype)
        return zeros, zeros.clone()

    def forward(self, loss: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One recurrent step.

        Args:
            loss: ``()`` or ``(1,)`` current training loss (mean over the batch, already
                divided by the task's loss scale).
            state: ``(h, c)``, each ``(1, H)``.

        Returns:
            ``(unit_lr, (h, c))`` where ``unit_lr`` is ``()`` in ``(0, 1)``: the LR before gamma.
        """
        h, c = state
        gates = self.fc_i2h(loss.reshape(1, 1)) + self.fc_h2h(h)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return torch.sigmoid(self.head(h)).reshape(()), (h, c)


def require_loss(loss: float | None) -> None:
    """Raise a one-line :class:`ConfigError` when a loss-driven schedule gets no loss."""
    if loss is None:
        raise ConfigError(
            "the MLR-SNet schedule maps the batch loss to the LR, and this step needs its LR "
            "before the loss (a long-tailed method's look-ahead); accepted: a hand-designed "
            "schedule"
        )


def momentum_lr_scale(momentum: float) -> float:
    """The factor ``1 - beta`` that turns MLR-SNet's output into the LR of SGD with momentum.

    MLR-SNet's output is the *effective* step size: the paper meta-trains and tests with plain
    SGD (momentum 0), and gamma's scale assumes it. PyTorch's SGD with momentum ``beta``
    (dampening 0, plain or Nesterov) moves the weights by ``lr * v`` with ``v = beta * v + g``,
    whose steady state is ``g / (1 - beta)``: the effective step is ``lr / (1 - beta)``, ten
    times the LR at ``beta = 0.9``. Applying ``lr = (1 - beta) * output`` keeps the effective
    step equal to MLR-SNet's output at any momentum, so a meta-learner trained at one momentum
    transfers to another (docs/mlrsnet.md).

    Raises:
        ValueError: ``momentum`` is not in ``[0, 1)``.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    return 1.0 - momentum


def gamma_scale(initial_loss: float, num_classes: int) -> float:
    """The MLR-SNet output scale ``gamma = sqrt(L0) * |ln(L0 * C)| / (4 * C**0.25)``.

    ``L0`` is the mean training loss (per-sample cross-entropy averaged over the training set)
    of the model at the start of the run (or of the phase, in the meta-test protocol); ``C``
    is the number of classes (for language models, the vocabulary size).

    ``ln(L0*C)`` is negative when ``L0 < 1/C`` (e.g. a pre-trained model). The reference code
    takes ``abs()`` in its meta-test file and not in its meta-train file; raymeta always takes
    the absolute value, so gamma is the same positive scale on either side of ``L0 = 1/C``
    (a negative LR would ascend the loss).

    Raises:
        ValueError: ``L0`` is not finite and positive, ``C < 2``, or ``L0 * C == 1``
            (gamma would be exactly 0: the schedule would never move the weights).
    """
    if not (math.isfinite(initial_loss) and initial_loss > 0):
        raise ValueError(f"gamma needs a finite positive initial loss L0, got {initial_loss}")
    if num_classes < 2:
        raise ValueError(f"gamma needs at least 2 classes, got {num_classes}")
    log_term = abs(math.log(initial_loss * num_classes))
    if log_term == 0.0:
        raise ValueError(
            f"gamma is 0 for L0={initial_loss} and C={num_classes} (L0*C == 1); set gamma explicitly"
        )
    return math.sqrt(initial_loss) * log_term / (4 * num_classes**0.25)


class MLRSNetBundle(nn.Module):
    """The registered meta-learner: ``K`` checkpoints of the cell from one meta-training run,
    plus what the meta-test protocol needs. This is what raymeta logs with ``mlflow.pytorch``.

    Args:
        cells: state dicts of :class:`MLRSNet` (canonical layout), in meta-training order.
        checkpoint_epochs: the meta-training epoch (1-based) each checkpoint was taken at.
        hidden_size, mlp_hidden: the cell's hyper-parameters.
        source: free text (e.g. ``"meta-trained: fashion_mnist/small_cnn"``).
    """

    def __init__(
        self,
        cells: list[dict[str, torch.Tensor]],
        checkpoint_epochs: list[int],
        hidden_size: int = HIDDEN_SIZE,
        mlp_hidden: int = MLP_HIDDEN,
        source: str = "",
    ):
        super().__init__()
        if not cells or len(cells) != len(checkpoint_epochs):
            raise ValueError("MLRSNetBundle needs one epoch number per checkpoint (at least one)")
        self.cells = nn.ModuleList()
        for sd in cells:
            cell = MLRSNet(hidden_size, mlp_hidden)
            cell.load_state_dict(sd)
            self.cells.append(cell)
        self.checkpoint_epochs = list(checkpoint_epochs)
        self.hidden_size, self.mlp_hidden, self.source = hidden_size, mlp_hidden, source
        self.gamma_rule = "sqrt(L0)*|ln(L0*C)|/(4*C**0.25), recomputed at each checkpoint swap"
        self.requires_grad_(False)

    def forward(self, losses: torch.Tensor, checkpoint: int = -1) -> torch.Tensor:
        """Unit LRs (before gamma) of one checkpoint run over a loss sequence from zero state.

        Args:
            losses: ``(T,)`` training losses.
            checkpoint: index into :attr:`cells` (default: the last).

        Returns:
            ``(T,)`` values in ``(0, 1)``.
        """
        cell = self.cells[checkpoint]
        state, out = cell.initial_state(), []
        for loss in losses:
            unit, state = cell(loss, state)
            out.append(unit)
        return torch.stack(out)


class MLRSNetSchedule(Schedule):
    """The learned schedule at meta-test time (paper Sec. 4.2): a frozen meta-learner maps the
    current batch loss to ``lr = (1 - momentum) * gamma * MLRSNet(loss)``.

    With ``K`` checkpoints the run is cut into ``K`` equal phases by epoch (K=3: at 1/3 and 2/3
    of the run); at the start of each phase the next checkpoint is swapped in, the LSTM state is
    reset to zero and gamma is recomputed from the current mean training loss (``L0`` of that
    phase). With ``fixed_gamma`` set, gamma is never recomputed.

    Args:
        bundle: the meta-learner (e.g. loaded from the MLflow registry).
        num_classes: ``C`` of the target task (for language models: the vocabulary size).
        epochs: total epochs of the target run.
        loss_scale: the batch loss is divided by this before entering the cell (1 for image
            classification; ``ln(V)`` for a language model, as in the paper).
        fixed_gamma: use this gamma instead of the rule.
        checkpoints: which checkpoints to use, in order (default: all of the bundle's).
        momentum: the target task's SGD momentum ``beta``; the applied LR is
            ``(1 - beta) * gamma * MLRSNet(loss)`` (:func:`momentum_lr_scale`).

    Raises:
        ConfigError: bad epochs, gamma or checkpoint indices.
    """

    def __init__(
        self,
        bundle: MLRSNetBundle,
        num_classes: int,
        epochs: int,
        loss_scale: float = 1.0,
        fixed_gamma: float | None = None,
        checkpoints: list[int] | None = None,
        momentum: float = 0.0,
    ):
        checkpoints = list(range(len(bundle.cells))) if checkpoints is None else checkpoints
        bad = [k for k in checkpoints if not -len(bundle.cells) <= k < len(bundle.cells)]
        if bad or not checkpoints:
            raise ConfigError(
                f"checkpoints {checkpoints} invalid; the meta-learner has {len(bundle.cells)} "
                f"(indices 0..{len(bundle.cells) - 1})"
            )
        if fixed_gamma is not None and not fixed_gamma > 0:
            raise ConfigError(f"gamma must be > 0, got {fixed_gamma}")
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        self.bundle, self.num_classes, self.epochs = bundle, num_classes, epochs
        self.loss_scale, self.fixed_gamma, self.checkpoints = loss_scale, fixed_gamma, checkpoints
        self.phase, self.gamma, self._state = -1, fixed_gamma, None
        self.gammas: list[float] = []
        self.lr_scale = momentum_lr_scale(momentum)

    def phase_of(self, epoch: int) -> int:
        """Phase index (0..K-1) of a 0-based epoch."""
        return min(len(self.checkpoints) - 1, epoch * len(self.checkpoints) // self.epochs)

    def start_epoch(self, epoch, mean_train_loss):
        phase = self.phase_of(epoch)
        if phase == self.phase:
            return
        self.phase = phase
        self._cell = self.bundle.cells[self.checkpoints[phase]]
        self._state = self._cell.initial_state()
        if self.fixed_gamma is None:
            try:
                self.gamma = gamma_scale(mean_train_loss(), self.num_classes)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        self.gammas.append(self.gamma)

    def state_dict(self):
        return {
            "phase": self.phase,
            "gamma": self.gamma,
            "gammas": self.gammas,
            "state": self._state,
        }

    def load_state_dict(self, state):
        self.phase, self.gamma, self.gammas = state["phase"], state["gamma"], list(state["gammas"])
        self._state = state["state"]
        if self.phase >= 0:
            self._cell = self.bundle.cells[self.checkpoints[self.phase]]

    needs_loss = True
    step_settings = "the method's gamma (default: set from the initial loss) or the momentum"

    @torch.no_grad()
    def lr(self, step, epoch, loss):
        self.check_loss(loss, step, epoch)
        require_loss(loss)
        if self._state is None:
            raise RuntimeError("MLRSNetSchedule.start_epoch must be called before lr()")
        unit, self._state = self._cell(torch.tensor(loss / self.loss_scale), self._state)
        return float(self.lr_scale * self.gamma * unit)
