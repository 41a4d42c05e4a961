"""`wbc train`: Stage-1 end-to-end fine-tuning (wbc.engine.stage1.train.train)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from wbc.cli.app import app
from wbc.cli.options import Device, Fold, Overwrite, Seed, Workers
from wbc.engine.stage1.config import Stage1Config

_D = Stage1Config()  # defaults come from the config, so the CLI never disagrees with the library


@app.command()
def train(
    store: Annotated[Path, typer.Argument(help="HDF5 image store (from `wbc prepare` + `wbc split`).")],
    backbone: Annotated[str, typer.Option(help="r50, r152, swin, lite0/1/2 or any timm model name.")] = _D.backbone,
    fold: Fold = str(_D.fold),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run dir (default runs/BACKBONE); "
                                             "each fold writes OUT/fold{K}/.")] = None,
    pretrained: Annotated[str, typer.Option(help="hub (timm download), none, package "
                                            "(lite0/1/2 from PyPI), or a .pth/.safetensors file.")] = _D.pretrained,
    epochs: Annotated[int, typer.Option(help="Maximum epochs (cosine schedule length).")] = _D.epochs,
    batch_size: Annotated[int, typer.Option(help="Effective batch size (all processes).")] = _D.batch_size,
    accum_steps: Annotated[int, typer.Option(help="Gradient accumulation steps per optimizer step.")] = _D.accum_steps,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = _D.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = _D.weight_decay,
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without a better val Macro-F1.")] = _D.patience,
    augment: Annotated[str, typer.Option(help="Train augmentation: randaugment, degradations (randaugment + WBCBench-style damage), scale (cell rescaled 1/1.6-1.6x in its frame), none, or a comma list applied in order (scale,degradations).")] = _D.augment,
    recipe: Annotated[str, typer.Option(help="paper (fine-tune from a random head), lp-ft (linear probe on the frozen backbone first; keeps more of ImageNet for other labs' images) or frozen-pretrained (no fine-tuning: ImageNet backbone + linear probe, epoch 0, an ensemble member).")] = _D.recipe,
    crop: Annotated[int, typer.Option(help="Centre-crop side fed to the network.")] = _D.crop,
    resize: Annotated[int, typer.Option(help="Side before the crop (0: keep 368/224).")] = _D.resize,
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16, else fp16).")] = _D.amp,
    channels_last: Annotated[bool, typer.Option(help="channels_last memory format on CUDA.")] = _D.channels_last,
    preload: Annotated[bool, typer.Option(help="Decode and crop all images once into RAM.")] = _D.preload,
    device: Device = _D.device,
    workers: Workers = _D.workers,
    seed: Seed = _D.seed,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from last.pt.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Fine-tune a timm backbone end to end on all CV folds but FOLD; validate on FOLD.

    Multi-GPU / multi-node: `torchrun --nproc_per_node N -m wbc train ...` (gloo on CPU).
    """
    cfg = Stage1Config(
        backbone=backbone, pretrained=pretrained, epochs=epochs, batch_size=batch_size,
        accum_steps=accum_steps, lr=lr, weight_decay=weight_decay, patience=patience,
        augment=augment, recipe=recipe, crop=crop, resize=resize, amp=amp, channels_last=channels_last,
        device=device, workers=workers, preload=preload, seed=seed,
    )
    from wbc.engine.stage1.train import train as run_train  # torch: after the options are checked

    runs = run_train(store, out or Path("runs") / backbone, cfg, fold=fold, resume=resume,
                     overwrite=overwrite)
    _summary(runs)


def _summary(runs: list[Path]) -> None:
    import os

    import torch

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    table = Table("fold", "best epoch", "val MF1", "val BAcc", "checkpoint", title="Stage 1")
    for run in runs:
        best = run / "best.pt"
        meta = torch.load(best, map_location="cpu", weights_only=True)
        val = meta.get("val") or {}
        table.add_row(str(meta["fold"]), str(meta["epoch"]), f"{val.get('val_mf1', float('nan')):.4f}",
                      f"{val.get('val_bacc', float('nan')):.4f}", str(best))
    if table.rows:
        Console().print(table)
