"""raymeta: Ray-based meta-training of learned LR schedules (MLR-SNet) and feature modulators (MFM).

Lower layers (``raymeta.data``, ``raymeta.models``, ``raymeta.schedules``, ``raymeta.meta``) are
plain PyTorch; orchestration (``raymeta.train``, ``raymeta.tracking``, ``raymeta.pipeline``)
adds Ray and MLflow at the edge. Imports are lazy so that ``raymeta --help`` stays fast.
"""

__version__ = "0.1.0"
