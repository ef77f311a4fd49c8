"""Training and evaluation engine: pooling heads, contrastive loss, optimisation, DDP, runs.

Import the submodules directly (`xmodal.engine.train`, `xmodal.engine.evaluate`, ...);
this package keeps its import light so `xmodal --help` stays fast.
"""
