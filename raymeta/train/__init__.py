"""Training loops: plain PyTorch (:mod:`raymeta.train.loop`) and Ray Train glue
(:mod:`raymeta.train.ray_train`)."""
