"""`wbc robustness`: a thin wrapper over wbc.engine.evaluate.robustness.robustness."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from wbc.cli.app import app
from wbc.cli.options import Degradations, Device, Out, Workers
from wbc.engine.evaluate.config import RobustnessConfig
from wbc.errors import WbcError
from wbc.log import console

_R = RobustnessConfig()  # defaults come from the config, so the CLI never disagrees with the library


def parse_severities(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise WbcError(f"--severities must be comma-separated integers 0..4, got {text!r}") from None


@app.command()
def robustness(
    store: Annotated[Path, typer.Argument(help="Image store whose held-out test rows are degraded "
                                          "(the one the members' caches were extracted from).")],
    ensemble: Annotated[Path, typer.Option(help="ENSEMBLE.yaml whose members carry feature caches "
                                           "(`wbc ensemble save --cache`), or pass --cache; or an "
                                           "ADAPTED.yaml (`wbc adapt`), scored through the images.")],
    out: Out = Path("reports/robustness"),
    degradation: Degradations = None,
    severities: Annotated[str, typer.Option(help="Comma-separated severities 1..4 (0, clean, is always scored).")] = ",".join(map(str, _R.severities)),
    max_images: Annotated[int, typer.Option(help="Stratified, seeded subset of the test rows (0 = all).")] = _R.max_images,
    seed: Annotated[int, typer.Option(help="Seed of the --max-images subset.")] = _R.seed,
    views: Annotated[str, typer.Option(help="Views of the degraded extraction: a set or comma-separated "
                                       "names among the cache's (default: the cache's views).")] = _R.views,
    cache: Annotated[list[Path] | None, typer.Option(
        "--cache", help="Feature cache per ensemble member, in member order (overrides the ensemble's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (0 = 32 GPU / 8 CPU).")] = _R.batch_size,
    workers: Workers = _R.workers,
    device: Device = _R.device,
) -> None:
    """MF1/BAcc of each ensemble row per degradation x severity on the held-out test images.

    Degraded features are extracted once into each member's cache (groups degraded.NAME.SEVERITY)
    and read back on reruns; writes robustness.md/.json/.csv and a PNG of MF1 against severity.
    """
    from wbc.engine.evaluate.robustness import robustness as run

    cfg = RobustnessConfig(degradations=tuple(degradation or ()), severities=parse_severities(severities),
                           max_images=max_images, seed=seed, views=views, batch_size=batch_size,
                           workers=workers, device=device)
    from wbc.fsutil import check_writable

    check_writable(out, "report directory")  # before the degraded extractions, not after
    res = run(ensemble, store, out, cfg, caches=cache or None)
    t = Table("Model", "clean MF1", "mean MF1 (degraded)", "worst", title=f"Robustness ({out})")
    for s in res.summary:
        t.add_row(s["row"], f"{100 * s['clean_mf1']:.1f}", f"{100 * s['mean_mf1']:.1f}",
                  f"{s['worst']} ({100 * s['worst_mf1']:.1f})")
    console.print(t)
    how = (f"{len(res.extracted)} degraded groups extracted, {len(res.reused)} reused" if not res.adapted
           else "adapted ensemble: every image through its members (no cache)")
    console.print(f"{how}; report: {res.paths['md']}  plot: {res.paths['png']}")
