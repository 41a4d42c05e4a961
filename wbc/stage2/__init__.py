"""Stage 2 as a library: linear heads on a feature cache, no images and no backbone.

    from wbc.cache import open_cache
    from wbc.stage2 import HeadConfig, fit
    heads = fit(open_cache(path), fold=0, configs=[HeadConfig(), HeadConfig(loss="balanced_softmax")])

`HeadConfig` (config.py) is everything a head is a function of, checked when made; `fit` (fitting.py)
trains heads with the fused grid trainer (trainer.py: G heads as one matmul, closed-form loss
gradients from batched_loss.py, per-head early stopping) and picks post-hoc choices on
validation (validate.py); it returns `wbc.heads.Head`s and writes nothing. `wbc crt` and
`wbc ablate` (wbc.engine.stage2.crt / wbc.engine.stage2.ablate) add the fold loop, resume and the files.
"""

from wbc.stage2.config import HeadConfig

__all__ = ["HeadConfig", "fit"]


def __getattr__(name: str):
    # `fit` pulls in torch; the CLI imports this package for HeadConfig's defaults only.
    if name == "fit":
        from wbc.stage2.fitting import fit

        return fit
    raise AttributeError(f"module 'wbc.stage2' has no attribute {name!r}")
