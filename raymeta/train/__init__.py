"""Training: the one loop (:mod:`raymeta.train.loop`, plain PyTorch), the per-step update rules
it delegates to (:mod:`raymeta.train.rules`: SGD, MLR-SNet meta-training, long-tailed methods)
and the Ray Train glue (:mod:`raymeta.train.ray_train`)."""
