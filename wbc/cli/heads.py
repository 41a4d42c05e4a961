"""`wbc crt` and `wbc ablate`: Stage-2 heads on a feature cache (thin wrappers over wbc.engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from wbc.cli.app import app
from wbc.cli.options import Fold, Out, Overwrite, Seed
from wbc.log import console

CacheArg = Annotated[str, typer.Argument(
    help="Zarr feature cache from `wbc extract`; '{fold}' in the path = one cache per fold "
         "(each fold's own Stage-1 backbone).", show_default=False, metavar="CACHE")]
LossOpt = Annotated[str, typer.Option(help="ce, cb_ce, focal, cb_focal_hybrid, logit_adjusted, balanced_softmax.")]
SamplerOpt = Annotated[str, typer.Option(help="class_balanced (weight 1/n_y, with replacement) or instance.")]
EpochsOpt = Annotated[int, typer.Option(help="Maximum epochs (an epoch = N draws).")]
LrOpt = Annotated[float, typer.Option(help="AdamW learning rate (cosine to 0).")]
WdOpt = Annotated[float, typer.Option(help="AdamW weight decay.")]
BatchOpt = Annotated[int, typer.Option(help="Batch size.")]
PatienceOpt = Annotated[int, typer.Option(help="Stop a head after this many epochs without a better validation MF1.")]
TauOpt = Annotated[str, typer.Option(help="Tau-normalisation of the head weights: a number (0 = off) or 'auto' "
                                          "(best validation MF1 over 0, 0.1, ..., 2).")]
LaOpt = Annotated[float, typer.Option(help="Post-hoc logit adjustment: logits - T * log(training prior); 0 = off.")]
MemoryOpt = Annotated[float, typer.Option(help="Feature data held in memory at most (GiB); bigger caches are "
                                               "streamed from Zarr in row blocks.")]
StreamOpt = Annotated[bool | None, typer.Option("--stream/--in-memory", help="Force streaming or in-memory "
                                                   "(default: stream only when over --memory-gb).")]
ThreadsOpt = Annotated[int, typer.Option(help="Torch CPU threads (0 = torch's default).")]


def _train_config(sampler, epochs, lr, weight_decay, batch_size, patience, seed, memory_gb, threads):
    from wbc.engine.train_heads import TrainConfig

    return TrainConfig(sampler=sampler, lr=lr, weight_decay=weight_decay, epochs=epochs, batch_size=batch_size,
                       patience=patience, seed=seed, memory_gb=memory_gb, threads=threads)


def _claim(out: Path):
    """The heads dir must be writable before training, and one job at a time writes it."""
    from wbc.fsutil import check_writable, output_lock

    return output_lock(check_writable(out, "heads directory"))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


@app.command()
def crt(
    cache: CacheArg,
    out: Out = Path("runs/crt"),
    fold: Fold = "all",
    loss: LossOpt = "cb_focal_hybrid",
    beta: Annotated[float, typer.Option(help="Effective-number beta in [0, 1) (class-balanced weights).")] = 0.9999,
    gamma: Annotated[float, typer.Option(help="Focal exponent >= 0.")] = 2.0,
    lam: Annotated[float, typer.Option(help="Hybrid weight in [0, 1]: (1-lam) CB-CE + lam CB-focal.")] = 0.5,
    sampler: SamplerOpt = "class_balanced",
    epochs: EpochsOpt = 50,
    lr: LrOpt = 1e-3,
    weight_decay: WdOpt = 5e-4,
    batch_size: BatchOpt = 256,
    patience: PatienceOpt = 10,
    tau: TauOpt = "0",
    logit_adjust: LaOpt = 0.0,
    seed: Seed = 0,
    memory_gb: MemoryOpt = 4.0,
    stream: StreamOpt = None,
    threads: ThreadsOpt = 0,
    overwrite: Overwrite = False,
) -> None:
    """Stage 2 (cRT): a fresh linear head per validation fold on cached embeddings (no images, no backbone)."""
    from wbc.engine.stage2 import crt as run_crt
    from wbc.losses import LossSpec
    from wbc.metrics import mean_std

    cfg = _train_config(sampler, epochs, lr, weight_decay, batch_size, patience, seed, memory_gb, threads)
    with _claim(out):
        runs = run_crt(cache, out, fold, LossSpec(loss, beta, gamma, lam), cfg, tau, logit_adjust, overwrite, stream)
    table = Table(title=f"cRT {LossSpec(loss, beta, gamma, lam).label()} (validation, %)")
    for col in ("fold", "epoch", "tau", "MF1", "BAcc", "MP", "MSpec", "Stage-1 MF1", "Stage-1 BAcc", "s"):
        table.add_column(col, justify="right")
    for r in runs:
        s1 = r.stage1 or {}
        table.add_row(str(r.fold), str(r.best_epoch), f"{r.tau:g}", *(_pct(r.metrics[m]) for m in ("mf1", "bacc", "mp", "mspec")),
                      _pct(s1["mf1"]) if s1 else "-", _pct(s1["bacc"]) if s1 else "-",
                      f"{r.seconds:.1f}" + (" (kept)" if r.resumed else ""))
    if len(runs) > 1:
        ms = mean_std([r.metrics for r in runs])
        table.add_row("mean ± std", "", "", *(f"{_pct(ms[m][0])} ± {_pct(ms[m][1])}" for m in ("mf1", "bacc", "mp", "mspec")),
                      "", "", "")
    console.print(table)
    console.print(f"heads: {Path(out) / 'fold{K}' / 'head.pt'}")


@app.command()
def ablate(
    cache: CacheArg,
    out: Out = Path("runs/ablate"),
    fold: Fold = "all",
    loss: Annotated[str, typer.Option(help="Comma-separated loss names (see `wbc crt --help`).")] = "cb_focal_hybrid",
    beta: Annotated[str, typer.Option(help="Comma-separated betas in [0, 1).")] = "0.99,0.999,0.9999",
    gamma: Annotated[str, typer.Option(help="Comma-separated focal exponents >= 0.")] = "0,1,2",
    lam: Annotated[str, typer.Option(help="Comma-separated hybrid weights in [0, 1].")] = "0,0.5,1",
    sampler: SamplerOpt = "class_balanced",
    epochs: EpochsOpt = 50,
    lr: LrOpt = 1e-3,
    weight_decay: WdOpt = 5e-4,
    batch_size: BatchOpt = 256,
    patience: PatienceOpt = 10,
    tau: TauOpt = "0",
    logit_adjust: LaOpt = 0.0,
    save_heads: Annotated[bool, typer.Option(help="Also save every configuration's heads under OUT/heads/.")] = False,
    seed: Seed = 0,
    memory_gb: MemoryOpt = 4.0,
    stream: StreamOpt = None,
    threads: ThreadsOpt = 0,
    overwrite: Overwrite = False,
) -> None:
    """Loss ablation: every (loss, beta, gamma, lam) configuration trained in one batched pass per fold."""
    from wbc.engine.ablate import ablate as run_ablate
    from wbc.engine.ablate import fmt, grid_specs, parse_floats
    from wbc.metrics import HEADLINE

    specs = grid_specs([x.strip() for x in loss.split(",") if x.strip()], parse_floats(beta, "beta"),
                       parse_floats(gamma, "gamma"), parse_floats(lam, "lam"))
    cfg = _train_config(sampler, epochs, lr, weight_decay, batch_size, patience, seed, memory_gb, threads)
    with _claim(out):
        rows = run_ablate(cache, out, specs, fold, cfg, tau, logit_adjust, save_heads, overwrite, stream)
    folds = len(rows[0].per_fold)
    table = Table(title=f"Loss ablation: {len(rows)} configurations, mean ± std over {folds} fold(s) (%)")
    for col in ("configuration", "MF1", "BAcc", "MP", "MSpec"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in rows:
        style = "bold green" if r.best else None
        table.add_row(("* " if r.best else "") + r.label, *(fmt(r.mean_std[m]) for m in HEADLINE), style=style)
    console.print(table)
    console.print(f"tables: {Path(out) / 'ablate.md'}  {Path(out) / 'ablate.csv'}")
