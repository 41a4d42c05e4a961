"""LP-FT (Kumar et al., ICLR 2022): fit a linear probe on the frozen pretrained backbone, then
fine-tune everything starting from that head.

Fine-tuning from a random head sends large, noisy gradients through the backbone in the first
steps and distorts the pretrained features, which costs accuracy out of distribution; a head that
already fits the frozen features keeps those gradients small. The probe here is the paper's
logistic regression: the training images' pooled embeddings are computed once (no augmentation,
BatchNorm in eval mode, so no backbone weight or buffer changes) and the classifier is fitted on
them full batch. It costs one forward pass over the training set.
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
PROBE_WEIGHT_DECAY = 1e-4


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


def linear_probe(model: torch.nn.Module, ds, setup: StepSetup, batch: int = 64,
                 steps: int = PROBE_STEPS) -> dict:
    """Fit `model.get_classifier()` on frozen embeddings of `ds` (a StoreDataset); returns
    {"probe_loss", "probe_acc"} on those embeddings. Only the classifier's weights change."""
    feats, labels = _embeddings(model, ds, setup, batch)
    head = model.get_classifier()
    opt = torch.optim.AdamW(head.parameters(), lr=PROBE_LR, weight_decay=PROBE_WEIGHT_DECAY)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(head(feats), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = head(feats)
        out = {"probe_loss": float(F.cross_entropy(logits, labels)),
               "probe_acc": float((logits.argmax(1) == labels).float().mean())}
    log.info("LP-FT: linear probe on %d frozen embeddings: loss %.4f, train accuracy %.3f",
             len(labels), out["probe_loss"], out["probe_acc"])
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
