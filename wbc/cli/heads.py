"""`wbc crt` and `wbc ablate`: Stage-2 heads on a feature cache (thin wrappers over wbc.engine.stage2.crt /
wbc.engine.stage2.ablate, which run `wbc.stage2.fit` per fold)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from wbc.cli.app import app
from wbc.cli.options import Fold, Out, Overwrite, Seed
from wbc.log import console
from wbc.losses import LOSSES, LossSpec
from wbc.sampling import SAMPLERS
from wbc.stage2 import HeadConfig

_H, _L = HeadConfig(), LossSpec()  # defaults come from the config, so the CLI never disagrees with the library

CacheArg = Annotated[str, typer.Argument(
    help="Zarr feature cache from `wbc extract`; '{fold}' in the path = one cache per fold "
         "(each fold's own Stage-1 backbone).", show_default=False, metavar="CACHE")]
LossOpt = Annotated[str, typer.Option(help=f"One of: {', '.join(LOSSES.names())}.")]
SamplerOpt = Annotated[str, typer.Option(help=f"One of: {', '.join(SAMPLERS.names())} "
                                              "(class_balanced: weight 1/n_y, with replacement).")]
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


def _config(loss, sampler, epochs, lr, weight_decay, batch_size, patience, seed, tau, logit_adjust,
            memory_gb, stream, threads) -> HeadConfig:
    return HeadConfig(loss=loss, sampler=sampler, lr=lr, weight_decay=weight_decay, epochs=epochs,
                      batch_size=batch_size, patience=patience, seed=seed, tau=tau, logit_adjust=logit_adjust,
                      memory_gb=memory_gb, stream=stream, threads=threads)


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
    loss: LossOpt = _L.name,
    beta: Annotated[float, typer.Option(help="Effective-number beta in [0, 1) (class-balanced weights).")] = _L.beta,
    gamma: Annotated[float, typer.Option(help="Focal exponent >= 0.")] = _L.gamma,
    lam: Annotated[float, typer.Option(help="Hybrid weight in [0, 1]: (1-lam) CB-CE + lam CB-focal.")] = _L.lam,
    sampler: SamplerOpt = _H.sampler,
    epochs: EpochsOpt = _H.epochs,
    lr: LrOpt = _H.lr,
    weight_decay: WdOpt = _H.weight_decay,
    batch_size: BatchOpt = _H.batch_size,
    patience: PatienceOpt = _H.patience,
    tau: TauOpt = f"{_H.tau:g}",
    logit_adjust: LaOpt = _H.logit_adjust,
    seed: Seed = _H.seed,
    memory_gb: MemoryOpt = _H.memory_gb,
    stream: StreamOpt = _H.stream,
    threads: ThreadsOpt = _H.threads,
    overwrite: Overwrite = False,
) -> None:
    """Stage 2 (cRT): a fresh linear head per validation fold on cached embeddings (no images, no backbone)."""
    from wbc.engine.stage2.crt import crt as run_crt
    from wbc.metrics import mean_std

    cfg = _config(LossSpec(loss, beta, gamma, lam), sampler, epochs, lr, weight_decay, batch_size, patience, seed,
                  tau, logit_adjust, memory_gb, stream, threads)
    with _claim(out):
        runs = run_crt(cache, out, fold, cfg, overwrite)
    table = Table(title=f"cRT {cfg.loss.label()} (validation, %)")
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
    loss: Annotated[str, typer.Option(help=f"Comma-separated loss names: {', '.join(LOSSES.names())}.")] = _L.name,
    beta: Annotated[str, typer.Option(help="Comma-separated betas in [0, 1).")] = "0.99,0.999,0.9999",
    gamma: Annotated[str, typer.Option(help="Comma-separated focal exponents >= 0.")] = "0,1,2",
    lam: Annotated[str, typer.Option(help="Comma-separated hybrid weights in [0, 1].")] = "0,0.5,1",
    sampler: SamplerOpt = _H.sampler,
    epochs: EpochsOpt = _H.epochs,
    lr: LrOpt = _H.lr,
    weight_decay: WdOpt = _H.weight_decay,
    batch_size: BatchOpt = _H.batch_size,
    patience: PatienceOpt = _H.patience,
    tau: TauOpt = f"{_H.tau:g}",
    logit_adjust: LaOpt = _H.logit_adjust,
    save_heads: Annotated[bool, typer.Option(help="Also save every configuration's heads under OUT/heads/.")] = False,
    seed: Seed = _H.seed,
    memory_gb: MemoryOpt = _H.memory_gb,
    stream: StreamOpt = _H.stream,
    threads: ThreadsOpt = _H.threads,
    overwrite: Overwrite = False,
) -> None:
    """Loss ablation: every (loss, beta, gamma, lam) configuration trained in one batched pass per fold."""
    from wbc.engine.stage2.ablate import ablate as run_ablate
    from wbc.engine.stage2.ablate import grid_specs, parse_floats
    from wbc.report.ablate import rich_table

    specs = grid_specs([x.strip() for x in loss.split(",") if x.strip()], parse_floats(beta, "beta"),
                       parse_floats(gamma, "gamma"), parse_floats(lam, "lam"))
    cfg = _config(_L, sampler, epochs, lr, weight_decay, batch_size, patience, seed, tau, logit_adjust,
                  memory_gb, stream, threads)
    with _claim(out):
        rows = run_ablate(cache, out, specs, fold, cfg, save_heads, overwrite)
    console.print(rich_table(rows))
    console.print(f"tables: {Path(out) / 'ablate.md'}  {Path(out) / 'ablate.csv'}")
