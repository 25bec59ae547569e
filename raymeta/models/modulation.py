"""Per-channel feature modulation for MFM (Meta Feature Modulator, Wang et al., arXiv 2008.03428).

The paper's internals are not public: this module implements raymeta's reading of its abstract
(docs/design.md section 4), not a reproduction of the authors' code.

A modulation rescales and shifts every channel of the feature maps that chosen submodules
(**sites**) of a classifier output: ``f -> scale * f + shift`` with ``scale``/``shift``
broadcast over the spatial dimensions. It is applied with forward hooks on the sites, so the
backbone is not re-implemented, its ``parameters()`` and ``state_dict()`` stay the classifier's
own, and :func:`torch.func.functional_call` on the classifier (the shared look-ahead) still runs
the modulation: the modulation parameters are separate leaf tensors, and gradients flow to them
through virtual steps of the classifier weights.

Two variants, both exactly the identity at initialisation (``scale = 1``, ``shift = 0``, so a
modulated network reproduces the unmodulated outputs bit for bit):

- :class:`DirectModulation`: one learnable ``scale`` and ``shift`` per channel and site —
  hyper-parameters of one architecture, meta-optimised on the meta set.
- :class:`ModulatorNet`: a small MLP shared across channels and sites that maps the
  statistics ``(mean, std)`` of each channel of each sample's feature map to that channel's
  ``(scale, shift)``; independent of width, depth and dataset, so it can be meta-trained on one
  long-tailed dataset and used frozen on another.

Sites are submodule names or one of the presets of :data:`SITE_PRESETS` (:func:`resolve_sites`):

- ``"stages"`` (the default, :func:`default_sites`): the outputs of the stages of raymeta's
  backbones: ``SmallCNN``'s two conv stages (conv-ReLU-max-pool; the network has no
  normalisation), the three stages of ``CifarResNet`` (after the last block's BatchNorm,
  residual sum and ReLU), ``layer1..4`` of torchvision ResNets;
- ``"last_stage"``: the last of those;
- ``"embedding"`` (:func:`embedding_site`): the classifier's input features, the ``(B, D)``
  vector that the last linear layer maps to the logits (``SmallCNN``: after the hidden layer's
  ReLU; ``CifarResNet``: the global average pool);
- ``"stages+embedding"``: both.

Any submodule whose output is ``(B, C, ...)`` can be named instead, e.g. ``"stages.2.4.bn2"``
for pre-activation modulation right after a BN.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from torch import nn

from raymeta.errors import ConfigError

MODULATION_KINDS = ("direct", "network")
SITE_PRESETS = ("stages", "last_stage", "embedding", "stages+embedding")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def default_sites(model: nn.Module) -> list[str]:
    """Names of the submodules whose outputs are modulated by default.

    Raises:
        ConfigError: the architecture has no default; pass ``sites`` explicitly.
    """
    from raymeta.models.resnet_cifar import CifarResNet
    from raymeta.models.small import SmallCNN

    model = _unwrap(model)
    if isinstance(model, SmallCNN):
        return [
            f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)
        ]
    if isinstance(model, CifarResNet):
        return [f"stages.{i}" for i in range(len(model.stages))]
    names = dict(model.named_children())
    if all(f"layer{i}" in names for i in range(1, 5)):  # torchvision ResNet family
        return [f"layer{i}" for i in range(1, 5)]
    raise ConfigError(
        f"no default modulation sites for {type(model).__name__}; accepted: pass sites=[...] "
        "naming submodules with (B, C, ...) outputs"
    )


def embedding_site(model: nn.Module) -> str:
    """The submodule whose output is the classifier's input features (the ``(B, D)`` vector the
    last linear layer maps to the logits): ``SmallCNN`` ``classifier.2`` (the hidden layer's
    ReLU), ``CifarResNet`` ``pool``, torchvision ResNets ``avgpool``.

    Raises:
        ConfigError: the architecture has no known embedding site; name the submodule.
    """
    from raymeta.models.resnet_cifar import CifarResNet
    from raymeta.models.small import SmallCNN

    model = _unwrap(model)
    if isinstance(model, SmallCNN):
        return f"classifier.{len(model.classifier) - 2}"
    if isinstance(model, CifarResNet):
        return "pool"
    if "avgpool" in dict(model.named_children()):
        return "avgpool"
    raise ConfigError(
        f"no embedding site known for {type(model).__name__}; accepted: pass sites=[...] "
        "naming the submodule whose output feeds the last linear layer"
    )


def resolve_sites(model: nn.Module, sites: str | Sequence[str] | None) -> list[str]:
    """Submodule names of ``sites``: a preset of :data:`SITE_PRESETS` (module docstring), a
    list of submodule names, or None (``"stages"``).

    Raises:
        ConfigError: an unknown preset, or a preset the architecture has no default for.
    """
    if sites is None or sites == "stages":
        return default_sites(model)
    if isinstance(sites, str):
        if sites == "last_stage":
            return default_sites(model)[-1:]
        if sites == "embedding":
            return [embedding_site(model)]
        if sites == "stages+embedding":
            return [*default_sites(model), embedding_site(model)]
        raise ConfigError(
            f"unknown modulation sites {sites!r}; accepted: {', '.join(SITE_PRESETS)} or a "
            "list of submodule names"
        )
    return list(sites)


def _site(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model``; ConfigError listing the accepted names otherwise."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(
            f"modulation site {name!r} is not a submodule of {type(model).__name__}; "
            f"accepted: one of {', '.join(n for n, _ in model.named_modules() if n)}"
        ) from None


class Modulation(nn.Module, ABC):
    """Base class: a feature modulation attached to a classifier with forward hooks.

    Subclasses implement :meth:`forward` ``(feature, site) -> modulated feature``.

    Attributes:
        enabled: when False the hooks pass features through unchanged (train and test time).
        sites: names of the hooked submodules, in order (``site`` index = position here).
        average: mean of a tensor across data-parallel workers, for running statistics
            (identity for one worker; set by the trainer, not pickled).
    """

    def __init__(self):
        super().__init__()
        self.average = _identity
        self.enabled = True
        self.sites: list[str] = []
        self._handles: list = []

    @abstractmethod
    def forward(self, feature: torch.Tensor, site: int) -> torch.Tensor:
        """Modulated ``feature`` of site index ``site`` (same shape)."""

    def _hook(self, site: int, module: nn.Module, inputs, output):
        if not self.enabled:
            return None
        return self(output, site)

    def attach(self, model: nn.Module, sites: str | Sequence[str] | None = None) -> Modulation:
        """Register forward hooks on ``model``'s ``sites`` (names or a preset,
        :func:`resolve_sites`; default ``"stages"``).

        Attaching again first removes the previous hooks. ``model`` may be DDP-wrapped.

        Raises:
            ConfigError: a site is not a submodule of ``model`` or, for
                :class:`DirectModulation`, the number of sites differs from its ``channels``.
        """
        self.remove()
        model = _unwrap(model)
        sites = resolve_sites(model, sites)
        self._check_sites(sites)
        modules = [_site(model, name) for name in sites]
        for i, module in enumerate(modules):
            self._handles.append(module.register_forward_hook(partial(self._hook, i)))
        self.sites = sites
        return self

    def _check_sites(self, sites: list[str]) -> None:
        pass

    def remove(self) -> None:
        """Remove the hooks (the classifier becomes unmodulated)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Temporarily switch the modulation off."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    @contextlib.contextmanager
    def tracking(self, labels: torch.Tensor) -> Iterator[None]:
        """Forwards inside the block are real training forwards of a batch with ``labels``
        ``(B,)`` (a modulation that keeps running statistics of the training set updates them
        there; this one keeps none)."""
        yield

    @contextlib.contextmanager
    def no_meta_grad(self) -> Iterator[None]:
        """Temporarily stop gradients to the modulation's own parameters (they still act on
        the features, and gradients still flow through them to the classifier)."""
        params = [p for p in self.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def __getstate__(self):
        # Hook handles hold weak references (not picklable). A pickled or deep-copied classifier
        # keeps working hooks that point to its copy of the modulation; a modulation copied on
        # its own is detached and must be re-attached.
        state = self.__dict__.copy()
        state["_handles"] = []
        state["average"] = _identity  # a worker group's all-reduce does not travel
        return state


class DirectModulation(Modulation):
    """Direct per-channel modulation parameters, one ``(scale, shift)`` pair per channel and site.

    ``feature (B, C_k, *spatial) -> scale[k] * feature + shift[k]`` with ``scale[k]``,
    ``shift[k]`` of shape ``(C_k,)`` broadcast over batch and spatial dimensions.

    Args:
        channels: ``C_k`` of every site, in site order.

    Parameters are named ``scale.{k}`` and ``shift.{k}`` (initialised to ones and zeros).
    """

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.scale = nn.ParameterList([nn.Parameter(torch.ones(c)) for c in self.channels])
        self.shift = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in self.channels])

    def _check_sites(self, sites):
        if len(sites) != len(self.channels):
            raise ConfigError(
                f"{len(sites)} modulation sites for DirectModulation with "
                f"{len(self.channels)} channel counts; accepted: {len(self.channels)} sites"
            )

    def config(self) -> dict:
        """Constructor arguments: ``DirectModulation(**m.config())`` rebuilds the module."""
        return {"channels": list(self.channels)}

    def forward(self, feature: torch.Tensor, site: int) -> torch.Tensor:
        shape = (1, -1) + (1,) * (feature.dim() - 2)
        return torch.addcmul(self.shift[site].view(shape), feature, self.scale[site].view(shape))


class ModulatorNet(Modulation):
    """A modulator network shared across channels and sites (raymeta's reading of MFM).

    For a feature map ``f`` of shape ``(B, C, *spatial)`` it takes per-sample, per-channel
    statistics ``s = (mean, std)`` over the spatial dimensions (``std`` with ``eps`` inside the
    square root; ``sqrt(eps)`` for features without spatial dimensions), shape ``(B, C, 2)``,
    and an MLP ``2 -> hidden -> 2`` (ReLU) gives ``o`` of shape ``(B, C, 2)``:
    ``scale = 1 + o[..., 0]``, ``shift = o[..., 1]``, applied as ``scale * f + shift``.
    The last layer is zero-initialised, so the modulation starts as the exact identity. The
    statistics keep their graph: the classifier's gradients include the path through the
    modulation.

    With ``class_statistics`` (ours) the MLP also sees, per channel, a **class-frequency
    statistic** ``a_j`` (input ``(B, C, 3)``): how the channel's activation co-varies with the
    training frequency of the class, over the classes weighted equally,

        ``a_j = sum_c rho_c E[m_j | c] / sum_c E[|m_j| | c]``,

    ``m_j`` the channel's spatial mean for one image, ``rho_c`` the standardised centred log
    frequency of class ``c`` (positive for head classes). It is a running estimate from the
    labelled training batches of real steps (:meth:`tracking`; re-weighted by ``1 / (K pi_c)``
    so every class counts alike, exponential average with ``statistics_momentum``, averaged
    across data-parallel workers with :attr:`average`); it needs no label at test time, is a
    constant of every forward (no gradient flows through it) and is 0 before the first
    tracked batch, so the identity at initialisation holds. ``a_j > 0``: the channel fires more
    for head classes. Set the class counts with :meth:`set_class_counts` (also on transfer to a
    new task, which restarts the estimate).

    Args:
        hidden: width of the MLP's hidden layer.
        eps: added to the variance before the square root.
        class_statistics: also feed the class-frequency statistic.
        statistics_momentum: weight of a new batch in the running estimate.
    """

    def __init__(
        self,
        hidden: int = 16,
        eps: float = 1e-5,
        class_statistics: bool = False,
        statistics_momentum: float = 0.02,
    ):
        super().__init__()
        if not 0 < statistics_momentum <= 1:
            raise ConfigError(
                f"statistics_momentum={statistics_momentum} is invalid; accepted: 0 < m <= 1"
            )
        self.hidden, self.eps = hidden, eps
        self.class_statistics, self.statistics_momentum = class_statistics, statistics_momentum
        inputs = 3 if class_statistics else 2
        self.mlp = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self._init_class_state()

    def _init_class_state(self) -> None:
        # buffers made as needed: class_coef (2, K) = (rho_c / (K pi_c), 1 / (K pi_c)), and
        # running_{site} (2, C) = the running numerator and denominator of a at that site
        self._labels: torch.Tensor | None = None

    def __setstate__(self, state):
        super().__setstate__(state)
        if "class_statistics" not in state:  # pickled before class statistics existed
            self.class_statistics, self.statistics_momentum = False, 0.02
            self._init_class_state()

    def config(self) -> dict:
        """Constructor arguments: ``ModulatorNet(**m.config())`` rebuilds the module (then
        ``load_state_dict`` and :meth:`attach` it to any classifier, e.g. frozen for transfer)."""
        return {
            "hidden": self.hidden,
            "eps": self.eps,
            "class_statistics": self.class_statistics,
            "statistics_momentum": self.statistics_momentum,
        }

    def _class_buffers(self) -> list[str]:
        return [n for n in self._buffers if n == "class_coef" or n.startswith("running_")]

    def set_class_counts(self, counts: Sequence[int], *, balanced_batches: bool = False) -> None:
        """The training images per class of the task (class-index order); restarts the running
        class-frequency statistics. ``balanced_batches``: the training batches are drawn
        class-balanced (re-sampling), so every class already counts alike (no ``1 / (K pi_c)``
        weight). No effect without ``class_statistics``."""
        if not self.class_statistics:
            return
        n = torch.as_tensor(list(counts), dtype=torch.float64)
        log_freq = (n / n.sum()).log()
        rho = log_freq - log_freq.mean()
        rho = rho / rho.std(unbiased=False) if float(rho.abs().max()) > 0 else rho
        inv = torch.ones_like(n) if balanced_batches else n.sum() / (len(n) * n)  # 1 / (K pi_c)
        for name in self._class_buffers():
            del self._buffers[name]
        ref = self.mlp[0].weight
        self.register_buffer("class_coef", torch.stack([rho * inv, inv]).to(ref.device, ref.dtype))

    @contextlib.contextmanager
    def tracking(self, labels: torch.Tensor) -> Iterator[None]:
        """Forwards inside the block are real training forwards of a batch with ``labels``
        ``(B,)``: with ``class_statistics`` they update the running class-frequency statistics
        (each site after using them)."""
        self._labels = labels
        try:
            yield
        finally:
            self._labels = None

    def class_alignment(self, mean: torch.Tensor, site: int) -> torch.Tensor:
        """The statistic ``a`` ``(C,)`` of ``site`` (class docstring) for features whose
        per-sample channel means are ``mean`` ``(B, C)``; updates the running estimate after
        reading it when inside :meth:`tracking`.

        Raises:
            ConfigError: a tracked batch before :meth:`set_class_counts`.
        """
        name = f"running_{site}"
        running = self._buffers.get(name)
        if running is None:
            running = torch.zeros(2, mean.shape[1], device=mean.device, dtype=mean.dtype)
        alignment = running[0] / (running[1] + 1e-12)  # the bias corrections would cancel
        if self._labels is not None:
            coef = self._buffers.get("class_coef")
            if coef is None:
                raise ConfigError("ModulatorNet(class_statistics=True) needs set_class_counts()")
            with torch.no_grad():
                c = coef[:, self._labels].to(mean.dtype)  # (2, B)
                m = mean.detach()
                batch = torch.stack(
                    [(c[0, :, None] * m).mean(0), (c[1, :, None] * m.abs()).mean(0)]
                )
                self._buffers[name] = torch.lerp(
                    running, self.average(batch), self.statistics_momentum
                )
        return alignment

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the class-statistics buffers exist only once made: take the loaded ones' shapes
        for name in self._class_buffers():
            del self._buffers[name]
        for key, value in state_dict.items():
            name = key.removeprefix(prefix)
            if key.startswith(prefix) and (name == "class_coef" or name.startswith("running_")):
                self._buffers[name] = torch.empty_like(value, device=self.mlp[0].weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def statistics(self, feature: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial) -> (B, C, 2)`` per-channel (mean, std) of every sample.

        The variance is ``E[f^2] - E[f]^2`` (clamped at 0): two means, which on CPU run about
        20 times faster than ``torch.var_mean`` over the last dimension (measured: ``(100, 16,
        196)``, torch 2.14, 2 threads), and this sits in every modulated forward and backward.
        """
        flat = feature.flatten(2) if feature.dim() > 2 else feature.unsqueeze(-1)
        mean = flat.mean(-1)
        var = (flat.square().mean(-1) - mean.square()).clamp_min(0)
        return torch.stack([mean, (var + self.eps).sqrt()], dim=-1)

    def forward(self, feature: torch.Tensor, site: int) -> torch.Tensor:
        stats = self.statistics(feature)  # (B, C, 2)
        if self.class_statistics:
            a = self.class_alignment(stats[..., 0], site)  # (C,)
            stats = torch.cat([stats, a.expand(stats.shape[:2]).unsqueeze(-1)], dim=-1)
        out = self.mlp(stats)  # (B, C, 2)
        shape = out.shape[:2] + (1,) * (feature.dim() - 2)
        scale = (1 + out[..., 0]).view(shape)
        return torch.addcmul(out[..., 1].view(shape), feature, scale)


def parameters_after(model: nn.Module, site: str) -> list[str]:
    """Names of the parameters of ``model`` that act on the output of submodule ``site``: those
    of the modules registered after ``site`` that are not inside it (for raymeta's sequential
    backbones, registration order is execution order: the classifier head after the last
    stage). Used by MFM's fast look-ahead, which keeps second-order terms only for them.

    Raises:
        ConfigError: ``site`` is not a submodule, or no parameter comes after it.
    """
    model = _unwrap(model)
    _site(model, site)
    names = [n for n, _ in model.named_modules()]
    after = {n for n in names[names.index(site) + 1 :] if not n.startswith(site + ".")}
    out = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in after]
    if not out:
        raise ConfigError(
            f"no parameters after modulation site {site!r} of {type(model).__name__}; "
            "accepted: a site followed by a classifier head, or lookahead='exact'"
        )
    return out


@torch.no_grad()
def site_channels(model: nn.Module, sites: Sequence[str], example: torch.Tensor) -> list[int]:
    """Channels ``C`` of every site's output, from one eval-mode forward of ``example``
    ``(B, in_channels, S, S)`` (BatchNorm buffers are not touched)."""
    model = _unwrap(model)
    found: dict[int, int] = {}
    handles = [
        _site(model, name).register_forward_hook(
            lambda m, i, o, k=k: found.__setitem__(k, o.shape[1])
        )
        for k, name in enumerate(sites)
    ]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [found[k] for k in range(len(sites))]


def build_modulation(
    kind: str,
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    sites: str | Sequence[str] | None = None,
    **network,
) -> Modulation:
    """Build a modulation of ``kind`` (``"direct"`` or ``"network"``) and attach it to ``model``.

    Args:
        model: the classifier (possibly DDP-wrapped); the modulation is moved to its device and
            dtype.
        input_shape: ``(in_channels, S, S)`` of one input, used to find the sites' channels.
        sites: submodule names or a preset (:func:`resolve_sites`; default ``"stages"``).
        network: keyword arguments of :class:`ModulatorNet` (``hidden``, ``eps``,
            ``class_statistics``, ``statistics_momentum``); ``"network"`` only.

    Raises:
        ConfigError: unknown ``kind`` or site, or ``network`` arguments for ``"direct"``.
    """
    inner = _unwrap(model)
    sites = resolve_sites(inner, sites)
    ref = next(inner.parameters())
    if kind == "direct":
        if network:
            raise ConfigError(
                f"{', '.join(network)}: not a parameter of the direct modulation (its only "
                "parameter is sites)"
            )
        for name in sites:  # a clear error before the probe forward
            _site(inner, name)
        example = torch.zeros(2, *input_shape, device=ref.device, dtype=ref.dtype)
        mod: Modulation = DirectModulation(site_channels(inner, sites, example))
    elif kind == "network":
        mod = ModulatorNet(**network)
    else:
        raise ConfigError(f"unknown modulation {kind!r}; accepted: {', '.join(MODULATION_KINDS)}")
    return mod.to(device=ref.device, dtype=ref.dtype).attach(inner, sites)
