"""`wbc adapt`: a thin wrapper over wbc.adapt.adapt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wbc.cli.app import app
from wbc.cli.options import Device
from wbc.errors import WbcError
from wbc.log import console


@app.command()
def adapt(
    target: Annotated[Path, typer.Argument(help="The other lab's images: a folder (searched recursively) or a "
                                           "CSV with an 'image' column (any label column is never read).")],
    ensemble: Annotated[Path, typer.Option(help="ENSEMBLE.yaml whose members carry feature caches "
                                           "(`wbc ensemble save --cache`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ADAPTED.yaml to write (its files go beside it).")] = Path("adapted.yaml"),
    zoom: Annotated[str, typer.Option(help="Cell scale: 'auto' (estimated without labels; 1 unless clearly "
                                      "different) or a number.")] = "auto",
    no_zoom: Annotated[bool, typer.Option("--no-zoom", help="Keep the images' scale (zoom 1).")] = False,
    no_bn: Annotated[bool, typer.Option("--no-bn", help="Skip BatchNorm re-estimation (AdaBN).")] = False,
    align: Annotated[str, typer.Option(help="Feature alignment onto the training embeddings: meanstd, "
                                       "coral or none.")] = "meanstd",
    no_align: Annotated[bool, typer.Option("--no-align", help="Same as --align none.")] = False,
    mix: Annotated[str, typer.Option(help="Class mix of the target statistics for AdaBN and alignment: 'source' "
                                     "(target cells weighted to the training mix by the model's own predictions) "
                                     "or 'none' (the target's own mix).")] = "source",
    priors: Annotated[bool, typer.Option(help="Re-weight by the target's class priors, estimated by EM on "
                                         "calibrated posteriors (assumes only the class mix changed).")] = False,
    prototypes: Annotated[str, typer.Option(help="Class prototypes re-estimated on the target's embeddings "
                                            "(nearest centroid): 'blend' (mean of their and the head's "
                                            "probabilities), 'only' or 'off'.")] = "blend",
    no_guard: Annotated[bool, typer.Option("--no-guard", help="Run AdaBN, alignment, priors and prototypes even "
                                           "when the target looks in-domain (by default they are skipped there: "
                                           "they cost accuracy).")] = False,
    coverage: Annotated[float, typer.Option(help="Fraction of in-domain validation cells left un-flagged "
                                            "by `review`.")] = 0.95,
    max_images: Annotated[int, typer.Option(help="Target images used at most (a seeded sample beyond).")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: Device = "auto",
) -> None:
    """Adapt an ensemble to another lab's unlabelled images (cell scale, AdaBN, feature alignment,
    class priors) and write ADAPTED.yaml for `wbc predict` / `wbc evaluate --external`."""
    from wbc.adapt import AdaptConfig
    from wbc.adapt import adapt as run

    if align not in ("meanstd", "coral", "none"):
        raise WbcError(f"--align must be meanstd, coral or none, got {align!r}")
    if mix not in ("source", "none"):
        raise WbcError(f"--mix must be source or none, got {mix!r}")
    if not 0 < coverage <= 1:
        raise WbcError(f"--coverage must be in (0, 1], got {coverage}")
    if batch_size < 1 or max_images < 1:
        raise WbcError("--batch-size and --max-images must be positive")
    cfg = AdaptConfig(zoom="off" if no_zoom else zoom, bn=not no_bn, align="none" if no_align else align, mix=mix,
                      priors=priors, prototypes=prototypes, coverage=coverage, max_images=max_images,
                      batch_size=batch_size, device=device, guard=not no_guard)
    res = run(target, ensemble, out, cfg)
    d, steps = res.doc, res.doc["steps"]
    z = steps["zoom"]
    est = z.get("estimate") or {}
    console.print(f"target: {d['target']['n_used']} images used ({d['target']['n_failed']} unreadable, "
                  f"Macenko failed on {steps['stain']['n_failed']}, clamped {steps['stain']['n_clamped']})")
    console.print(f"zoom: {z['zoom']}" + (f" (raw {est['raw']:.3f}, 90% interval {est['low']:.3f}-{est['high']:.3f}, "
                                          f"{est['n_unmeasured']} unmeasurable; {est['reason']})" if est else ""))
    sh = steps.get("shift") or {}
    if sh.get("enabled"):
        console.print(f"shift: {100 * sh['share_beyond_val95']:.0f}% of cells beyond the in-domain 95th percentile of "
                      f"ood_score -> {'shifted: adapting' if sh['shifted'] else 'in-domain: AdaBN, alignment, priors and prototypes skipped'}")
    console.print(f"AdaBN: {'on' if steps['bn']['enabled'] else 'off'}; alignment: {steps['align']['method']}; "
                  f"class mix: {steps['align'].get('mix', 'none')}; "
                  f"priors: {'on' if steps['priors']['enabled'] else 'off'}; "
                  f"prototypes: {steps['prototypes'].get('mode', 'off') if steps['prototypes']['enabled'] else 'off'}")
    console.print(f"review: confidence < {d['review']['conf_min']:.3f} or ood_score > {d['review']['ood_max']:.2f} "
                  f"({100 * d['review']['achieved']:.1f}% of validation cells un-flagged)")
    console.print(f"predicted on the target: {d['predicted']}")
    console.print(f"adapted ensemble: {res.out}")
