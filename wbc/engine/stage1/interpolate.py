"""WiSE-FT (Wortsman et al., CVPR 2022): weight-space ensembles of a pretrained and a fine-tuned model.

    theta(alpha) = (1 - alpha) * theta_pretrained + alpha * theta_finetuned

for every backbone tensor, BatchNorm running statistics included (counters such as
`num_batches_tracked` are rounded); the classifier is the fine-tuned model's, since the pretrained
one has no head for these classes. alpha = 1 is the fine-tuned checkpoint, alpha = 0 the pretrained
backbone under the fine-tuned head. Interpolating keeps most of the in-domain accuracy while
recovering much of what fine-tuning cost on other labs' images.

BatchNorm: interpolated running statistics are a blend of ImageNet's and the training set's, which
neither matches the interpolated weights' activations (Jordan et al. 2023, REPAIR), and a frozen
backbone (alpha 0) carries ImageNet's. `recalibrate_bn` re-estimates them on the fold's training
images (no labels, no gradients, `wbc.adapt.bn.reestimate`), so the checkpoint's statistics are
the source data's, as a fine-tuned one's are; AdaBN on another lab's images (`wbc adapt`) then
swaps like for like. It costs one forward pass over the training images.

Each output is a normal Stage-1 checkpoint (OUT/alpha-A/fold{K}/best.pt, beside its config.yaml)
that says where it came from under `wise`: extract, crt, evaluate and ensembles use it unchanged.
The pretrained weights are re-created from the fine-tuned run's own `pretrained` setting (hub,
package or a file) unless `pretrained` overrides it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import yaml
from torch import nn

from wbc.backbones import create_backbone, load_checkpoint
from wbc.config import file_sha256
from wbc.engine.stage1.checkpointing import save_atomic
from wbc.errors import WbcError

log = logging.getLogger(__name__)


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's classifier (timm's get_classifier())."""
    head = model.get_classifier()
    name = next(n for n, m in model.named_modules() if m is head)
    return {f"{name}.{k}" for k in head.state_dict()}


def interpolate_state(pretrained: dict, finetuned: dict, alpha: float, head: set[str]) -> dict:
    """Every tensor (1 - alpha) * pretrained + alpha * finetuned; `head` keys from `finetuned`.

    Integer tensors (BatchNorm's num_batches_tracked) are interpolated and rounded, so alpha 0 and 1
    reproduce either side exactly.
    """
    missing = sorted(set(finetuned) - set(pretrained) - head)
    if missing:
        raise WbcError(f"pretrained weights lack {len(missing)} tensors of the fine-tuned model (e.g. {missing[0]})")
    out = {}
    for k, ft in finetuned.items():
        if k in head:
            out[k] = ft.clone()
            continue
        pre = pretrained[k].to(ft.dtype)
        if pre.shape != ft.shape:
            raise WbcError(f"{k}: pretrained {tuple(pre.shape)} vs fine-tuned {tuple(ft.shape)}; another backbone?")
        if ft.is_floating_point():
            out[k] = torch.lerp(pre, ft, alpha) if 0 < alpha < 1 else (ft if alpha == 1 else pre).clone()
        else:
            out[k] = torch.round((1 - alpha) * pre.double() + alpha * ft.double()).to(ft.dtype)
    return out


def check_alphas(alphas: Iterable[float]) -> list[float]:
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise WbcError("give at least one --alpha between 0 (pretrained) and 1 (fine-tuned)")
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise WbcError(f"--alpha {bad[0]:g}: choose values between 0 (pretrained) and 1 (fine-tuned)")
    return alphas


def alpha_dir(out: str | Path, alpha: float) -> Path:
    return Path(out) / f"alpha-{alpha:g}"


def source_bn(model: nn.Module, meta: dict, store: str | Path | None = None, max_images: int = 2000,
              batch_size: int = 32) -> dict:
    """Re-estimate `model`'s BatchNorm statistics on the training images of its fold (the store
    the checkpoint records, refused if its content changed); returns the provenance entry."""
    import numpy as np

    from wbc.adapt.bn import reestimate, view_batches
    from wbc.store import open_store

    st = open_store(store or meta["store"])
    if st.content_id != meta["store_content_id"]:
        raise WbcError(f"store {st.path} holds content {st.content_id}, the checkpoint was trained on "
                       f"{meta['store_content_id']}: give the training store (--store)")
    folds = np.asarray(st.folds)
    rows = np.flatnonzero((folds >= 0) & (folds != int(meta["fold"])))
    if len(rows) > max_images:
        rows = np.sort(np.random.default_rng(0).choice(rows, max_images, replace=False))

    def batches():
        for a in range(0, len(rows), 256):  # decoded in blocks: memory stays flat
            yield from view_batches(st.images(rows[a:a + 256]), meta["data_config"], ["identity"],
                                    batch_size, torch.device("cpu"))

    n = reestimate(model, batches())
    log.info("BatchNorm statistics re-estimated on %d training images of %s", n, st.path)
    return {"store_content_id": st.content_id, "fold": int(meta["fold"]), "n_images": n, "views": ["identity"]}


def interpolate(checkpoint: str | Path, alphas: Iterable[float], out: str | Path,
                pretrained: str | None = None, overwrite: bool = False, recalibrate_bn: bool = False,
                store: str | Path | None = None) -> list[Path]:
    """Write OUT/alpha-A/fold{K}/best.pt for each alpha; returns their paths. `recalibrate_bn`:
    BatchNorm statistics re-estimated on the training images (`source_bn`) after interpolating."""
    alphas = check_alphas(alphas)
    checkpoint = Path(checkpoint)
    model, meta = load_checkpoint(checkpoint)
    source = pretrained or meta["config"].get("pretrained", "none")
    if source == "none":
        raise WbcError(f"{checkpoint} was trained from random init (pretrained: none): nothing to "
                       "interpolate towards; pass --pretrained hub|package|PATH")
    targets = [alpha_dir(out, a) / f"fold{meta['fold']}" / "best.pt" for a in alphas]
    if not overwrite and (done := [t for t in targets if t.exists()]):
        raise WbcError(f"{done[0]} exists; pass --overwrite to replace it")
    crop = int(meta["data_config"]["input_size"][-1])
    pre = create_backbone(meta["timm_name"], len(meta["class_names"]), source, crop=crop).state_dict()
    ft = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # model is reused below
    head = classifier_keys(model)
    sha = file_sha256(checkpoint)
    for a, target in zip(alphas, targets):
        state = interpolate_state(pre, ft, a, head)
        extra = {}
        if recalibrate_bn:
            model.load_state_dict(state)
            extra["bn_recalibrated"] = source_bn(model, meta, store)
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        ckpt = {**meta, "model": state, "val": None, "complete": True, **extra,
                "wise": {"alpha": a, "finetuned": str(checkpoint), "finetuned_sha256": sha,
                         "finetuned_epoch": meta.get("epoch"), "pretrained": source,
                         "bn_recalibrated": recalibrate_bn}}
        target.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(ckpt, target)
        cfg = {**meta["config"], "wise_alpha": a, "wise_finetuned": str(checkpoint)}
        (target.parent / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        log.info("alpha %g -> %s", a, target)
    return targets
