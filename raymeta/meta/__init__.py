"""The meta-learning algorithms (plain PyTorch).

- :mod:`~raymeta.meta.lookahead`: the one-step look-ahead shared by every meta-learner;
- :mod:`~raymeta.meta.base`: the meta-learner base class and the long-tailed step interface;
- :mod:`~raymeta.meta.mlrsnet`: MLR-SNet meta-training (the meta-learner is the LR schedule);
- :mod:`~raymeta.meta.mfm`, :mod:`~raymeta.meta.mwn`: MFM and Meta-Weight-Net;
- :mod:`~raymeta.meta.losses`: the long-tail losses and class-balanced re-sampling;
- :mod:`~raymeta.meta.methods`: the registry of long-tailed methods (``METHODS``,
  ``build_method``, ``check_params``).
"""
