"""LP-FT (Kumar et al., ICLR 2022): fit a linear probe on the frozen pretrained backbone, then
fine-tune everything starting from that head.

Fine-tuning from a random head sends large, noisy gradients through the backbone in the first
steps and distorts the pretrained features, which costs accuracy out of distribution; a head that
already fits the frozen features keeps those gradients small. The probe here is the paper's
logistic regression: the training images' pooled embeddings are computed once (no augmentation,
BatchNorm in eval mode, so no backbone weight or buffer changes) and the classifier is fitted on
them full batch. As in Kumar et al., its L2 strength is chosen on the validation embeddings: an
unregularised probe reaches training accuracy 1.0 on a few thousand embeddings (measured on
PBC-LT) and its over-confident head then drives the fine-tuning like a random one. It costs one
forward pass over the training and validation images.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wbc.backbones import embed
from wbc.engine.stage1 import checkpointing as ckp
from wbc.engine.stage1.loops import StepSetup, _inputs
from wbc.errors import WbcError

log = logging.getLogger(__name__)

# paper: fine-tune from a random head; lp-ft: linear probe first, then fine-tune;
# frozen-pretrained: the linear probe alone (epoch 0), an ensemble member that keeps ImageNet intact.
RECIPES = ("paper", "lp-ft", "frozen-pretrained")
PROBE_STEPS = 500  # full-batch AdamW steps on cached embeddings: converged, and seconds on a CPU
PROBE_LR = 1e-2
# L2 strengths tried (penalty l2/2 * ||W||^2 on the mean cross-entropy; sklearn's C = 1/(l2 n)).
PROBE_L2 = (1e-4, 1e-3, 1e-2, 1e-1)


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise WbcError(f"--recipe {recipe!r}: choose from {', '.join(RECIPES)}")
    return recipe


@torch.no_grad()  # not inference_mode: the embeddings feed an autograd fit
def _embeddings(model: torch.nn.Module, ds, setup: StepSetup, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    plain = copy.copy(ds)  # shares the preloaded crops; only the augmentation is dropped
    plain.transform = None
    model.eval()
    feats, labels = [], []
    for x, y in DataLoader(plain, batch_size=batch, shuffle=False):
        with torch.autocast(setup.device.type, dtype=setup.amp, enabled=setup.amp is not None):
            feats.append(embed(model, _inputs(x, setup)).float())
        labels.append(y.to(setup.device))
    return torch.cat(feats), torch.cat(labels)


def _fit_probe(head: torch.nn.Module, init: dict, feats, labels, l2: float, steps: int) -> None:
    """Full-batch Adam on cross-entropy + l2/2 ||W||^2 (bias unpenalised), from `init`."""
    head.load_state_dict(init)
    opt = torch.optim.Adam(head.parameters(), lr=PROBE_LR)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(head(feats), labels) + 0.5 * l2 * head.weight.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _macro_f1(logits: torch.Tensor, labels: torch.Tensor, n_cls: int) -> float:
    from wbc.metrics import classification_metrics

    return float(classification_metrics(labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), n_cls)["mf1"])


def linear_probe(model: torch.nn.Module, ds, setup: StepSetup, batch: int = 64,
                 steps: int = PROBE_STEPS, val_ds=None, l2_grid: tuple[float, ...] = PROBE_L2) -> dict:
    """Fit `model.get_classifier()` on frozen embeddings of `ds` (a StoreDataset); with `val_ds`,
    each L2 strength of `l2_grid` is fitted and the one with the best validation Macro-F1 kept
    (ties: the stronger). Returns {"probe_loss", "probe_acc", "probe_l2"[, "probe_val_mf1"]} on the
    training embeddings. Only the classifier's weights change."""
    feats, labels = _embeddings(model, ds, setup, batch)
    head = model.get_classifier()
    init = {k: v.clone() for k, v in head.state_dict().items()}
    grid = tuple(l2_grid) if val_ds is not None else (min(l2_grid),)
    chosen, best = grid[0], None
    if len(grid) > 1:
        vf, vl = _embeddings(model, val_ds, setup, batch)
        n_cls = head.weight.shape[0]
        for l2 in sorted(grid, reverse=True):  # strongest first: a tie keeps it
            _fit_probe(head, init, feats, labels, l2, steps)
            with torch.no_grad():
                mf1 = _macro_f1(head(vf), vl, n_cls)
            log.info("LP-FT probe: l2 %g -> validation Macro-F1 %.4f", l2, mf1)
            if best is None or mf1 > best:
                chosen, best = l2, mf1
    _fit_probe(head, init, feats, labels, chosen, steps)
    with torch.no_grad():
        logits = head(feats)
        out = {"probe_loss": float(F.cross_entropy(logits, labels)),
               "probe_acc": float((logits.argmax(1) == labels).float().mean()), "probe_l2": chosen}
    if best is not None:
        out["probe_val_mf1"] = best
    log.info("LP-FT: linear probe on %d frozen embeddings (l2 %g): loss %.4f, train accuracy %.3f",
             len(labels), chosen, out["probe_loss"], out["probe_acc"])
    return out


def save_frozen(model: torch.nn.Module, meta: dict, val: dict, run: Path, is_main: bool = True) -> Path:
    """Write the frozen-pretrained member as a complete Stage-1 run at epoch 0 (best.pt, last.pt,
    metrics.jsonl), so extract, crt, evaluate and ensembles treat it like any other checkpoint."""
    if is_main:
        best = ckp.stage1_dict(model, **meta, epoch=0, val=val, complete=True)
        ckp.save_atomic(best, run / "best.pt")
        ckp.append_metrics(run / "metrics.jsonl", {"epoch": 0, **val})
        ckp.save_atomic({**best, "train_state": None}, run / "last.pt")  # a --resume finds it complete
    log.info("fold %d: frozen pretrained backbone + linear probe, val MF1 %.4f -> %s",
             meta["fold"], val["val_mf1"], run / "best.pt")
    return run
