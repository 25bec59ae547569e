"""The meta-learning algorithms (plain PyTorch): the shared look-ahead, MLR-SNet, MFM."""
