"""Stage 1: fine-tune a timm backbone end to end on the store's training folds, validate on one.

Outputs per fold (docs/ARCHITECTURE.md section 2): RUN/fold{K}/best.pt, last.pt, config.yaml,
metrics.jsonl. Every epoch ends with last.pt (write then rename), so an interrupted run resumes
exactly: the sampler order and augmentation RNG are functions of (seed, epoch, rank), and the
optimizer, scheduler, scaler and early-stopping state travel in last.pt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from wbc.backbones import alias_of, create_backbone, crop_resize, data_config, resolve_name
from wbc.config import save_config, to_dict
from wbc.data import StoreDataset, train_transform
from wbc.device import amp_dtype
from wbc.engine import distributed as dist
from wbc.engine.stage1 import checkpointing as ckp
from wbc.engine.stage1.config import Stage1Config
from wbc.engine.stage1.loops import NonFiniteLoss, StepSetup, predict_loader, train_epoch
from wbc.engine.stage1.lp_ft import check_recipe, linear_probe, save_frozen
from wbc.errors import WbcError
from wbc.folds import resolve_folds
from wbc.fsutil import check_writable, output_lock
from wbc.log import progress
from wbc.metrics import classification_metrics
from wbc.store import ImageStore, open_store

log = logging.getLogger(__name__)


EpochHook = Callable[[int, torch.nn.Module], None]


def train(
    store_path: str | Path, out: str | Path, cfg: Stage1Config, fold: int | str | Sequence[int] = 0,
    resume: bool = False, overwrite: bool = False, on_epoch_end: EpochHook | None = None,
) -> list[Path]:
    """Train each requested fold in turn (`fold`: an index, a list, or "all"); returns fold dirs."""
    resolve_name(cfg.backbone)  # fail on a bad name before any work
    check_recipe(cfg.recipe)
    check_writable(out, "run directory")
    cfg = dataclasses.replace(cfg, resize=cfg.resize or crop_resize(cfg.crop))  # record the resolved side
    store = open_store(store_path)
    folds = resolve_folds(fold, range(store.num_folds), str(store.path))
    env = dist.setup(cfg.device)
    try:
        return [
            _locked_fold(store, Path(out) / f"fold{k}", dataclasses.replace(cfg, fold=k), env,
                       resume=resume, overwrite=overwrite, on_epoch_end=on_epoch_end)
            for k in folds
        ]
    finally:
        env.close()


def _locked_fold(store: ImageStore, run: Path, cfg: Stage1Config, env: dist.DistEnv, **kw) -> Path:
    """train_fold while rank 0 holds the run dir's lock (RUN.lock): a second job training the
    same fold is refused, on every rank, before it touches the run dir (--overwrite included)."""
    with contextlib.ExitStack() as held:
        err = None
        if env.is_main:
            try:
                held.enter_context(output_lock(run))
            except WbcError as e:
                err = e
        if env.any(err is not None):
            raise err or WbcError(f"{run} is being written by another job (see rank 0)")
        return train_fold(store, run, cfg, env, **kw)


def _split(store: ImageStore, k: int) -> tuple[np.ndarray, np.ndarray]:
    folds, labels = store.folds, np.asarray(store.labels)
    train_idx = np.flatnonzero((folds >= 0) & (folds != k) & (labels >= 0))
    val_idx = np.flatnonzero((folds == k) & (labels >= 0))
    missing = sorted(set(range(store.num_classes)) - set(labels[train_idx].tolist()))
    if missing:
        log.warning("training folds (all but %d) have no %s: the model cannot learn %s",
                    k, ", ".join(store.class_names[c] for c in missing),
                    "it" if len(missing) == 1 else "them")
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise WbcError(f"fold {k} of {store.path} leaves no training or no validation images")
    return train_idx, val_idx


def _prepare_dir(run: Path, resume: bool, overwrite: bool, env: dist.DistEnv) -> dict | None:
    """Return last.pt to resume from (or None for a fresh start); refuse to clobber silently."""
    last = run / "last.pt"
    existing = [p for p in (last, run / "best.pt", run / "metrics.jsonl") if p.exists()]
    if resume and last.exists():
        return ckp.load_last(last)
    if existing and not overwrite:
        if resume:
            raise WbcError(f"{run} has outputs but no last.pt to resume from; use --overwrite")
        raise WbcError(f"{run} already has a run; pass --resume to continue it or --overwrite to start again")
    env.barrier()  # every rank has looked before rank 0 deletes
    if env.is_main:
        for p in existing:
            p.unlink()
    return None


def _micro_batch(cfg: Stage1Config, world: int) -> int:
    per = cfg.batch_size // (cfg.accum_steps * world)
    if per < 1 or per * cfg.accum_steps * world != cfg.batch_size:
        raise WbcError(
            f"--batch-size {cfg.batch_size} must be a multiple of accum steps ({cfg.accum_steps}) "
            f"x processes ({world})"
        )
    return per


def train_fold(
    store: ImageStore, run: Path, cfg: Stage1Config, env: dist.DistEnv,
    resume: bool = False, overwrite: bool = False, on_epoch_end: EpochHook | None = None,
) -> Path:
    ckpt = _prepare_dir(run, resume, overwrite, env)
    if ckpt is not None:
        ckp.check_resumable(ckpt, to_dict(cfg), store.content_id, run / "last.pt")
        if ckpt["complete"]:
            log.info("fold %d: %s is complete (epoch %d); nothing to do", cfg.fold, run, ckpt["epoch"])
            return run
    micro = _micro_batch(cfg, env.world)
    train_idx, val_idx = _split(store, cfg.fold)
    timm_name, n_cls = resolve_name(cfg.backbone), store.num_classes

    torch.manual_seed(cfg.seed)  # head init (and random init with --pretrained none)
    # A resume takes every weight from last.pt, so it never needs the hub again.
    model = create_backbone(timm_name, n_cls, "none" if ckpt else cfg.pretrained, crop=cfg.crop)
    dcfg = data_config(model, cfg.crop, cfg.resize)
    aug = train_transform(cfg.augment, num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude)
    train_ds = StoreDataset(store, train_idx, dcfg, transform=aug, preload=cfg.preload)
    # Each rank validates a strided share; predictions are gathered so all ranks agree on stopping.
    val_ds = StoreDataset(store, val_idx[env.rank :: env.world], dcfg, preload=cfg.preload)

    dev = env.device
    amp = amp_dtype(dev, cfg.amp)
    cl = cfg.channels_last and dev.type == "cuda"
    model.to(dev, memory_format=torch.channels_last if cl else torch.preserve_format)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.min_lr)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    stop = {"best_mf1": -1.0, "best_epoch": 0, "bad_epochs": 0}
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ts = ckpt["train_state"]
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        if scaler is not None and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        stop, start = dict(ts["stopper"]), int(ckpt["epoch"])
        log.info("fold %d: resuming %s after epoch %d", cfg.fold, run, start)
    # A resume holds the probed head. Under DDP each rank validates its own share, so ranks may pick
    # different L2 strengths: DDP's constructor below broadcasts rank 0's head to all of them.
    if ckpt is None and cfg.recipe in ("lp-ft", "frozen-pretrained"):
        linear_probe(model, train_ds, StepSetup(dev, dcfg["mean"], dcfg["std"], amp, cl, 1), micro, val_ds=val_ds)
    net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if env.distributed else model

    meta = {"timm_name": timm_name, "alias": alias_of(timm_name), "class_names": store.class_names,
            "store_content_id": store.content_id, "store": str(store.path), "fold": cfg.fold,
            "config": to_dict(cfg), "data_config": dcfg}
    if env.is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_config({**to_dict(cfg), "ran": _ran(dev, amp, cl, micro, env)}, run / "config.yaml")
        ckp.truncate_metrics(run / "metrics.jsonl", start)
    setup = StepSetup(dev, dcfg["mean"], dcfg["std"], amp, cl, cfg.accum_steps)
    if cfg.recipe == "frozen-pretrained":  # no fine-tuning: the pretrained backbone, probed head
        return save_frozen(model, meta, _validate(model, val_ds, micro, cfg, setup, env, n_cls), run, env.is_main)
    sampler = DistributedSampler(train_ds, num_replicas=env.world, rank=env.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    log.info("fold %d: %s (%s) on %s, %d train / %d val images, micro-batch %d x %d accum x %d proc, "
             "%s, crop %d (resize %d)", cfg.fold, cfg.backbone, timm_name, dev, len(train_idx),
             len(val_idx), micro, cfg.accum_steps, env.world, f"AMP {amp}" if amp else "fp32",
             cfg.crop, dcfg["resize"])

    for epoch in range(start, cfg.epochs):
        _seed_epoch(cfg.seed, epoch, env.rank)
        sampler.set_epoch(epoch)
        loader = _loader(train_ds, micro, cfg, dev, sampler, epoch, env.rank)
        lr = opt.param_groups[0]["lr"]
        with _bar(env) as bar:
            task = bar.add_task(f"fold {cfg.fold} epoch {epoch + 1}/{cfg.epochs}", total=len(loader), info="")
            try:
                loss, seen, secs = train_epoch(net, loader, opt, scaler, setup, env, epoch, bar, task)
            except torch.OutOfMemoryError:
                raise _oom_error(cfg, micro, run) from None
            except NonFiniteLoss as e:
                kept = f"{run / 'last.pt'} keeps epoch {epoch}, the last good one" if epoch else "no epoch finished"
                raise WbcError(f"{e}; stopped ({kept}); try a lower --lr or --no-amp") from None
        sched.step()
        row = _validate(model, val_ds, micro, cfg, setup, env, n_cls)
        loss, seen = env.sum_floats(loss * seen, float(seen))
        loss /= max(seen, 1)
        improved = row["val_mf1"] > stop["best_mf1"]
        if improved:
            stop.update(best_mf1=row["val_mf1"], best_epoch=epoch + 1, bad_epochs=0)
        else:
            stop["bad_epochs"] += 1
        done = epoch + 1 == cfg.epochs or stop["bad_epochs"] >= cfg.patience
        row = {"epoch": epoch + 1, "loss": loss, "lr": lr, **row, "images_per_s": seen / secs,
               "seconds": secs, **stop}
        if env.is_main:
            val = {k: v for k, v in row.items() if k.startswith("val_")}
            if improved:
                ckp.save_atomic(ckp.stage1_dict(model, **meta, epoch=epoch + 1, val=val), run / "best.pt")
            ckp.append_metrics(run / "metrics.jsonl", row)
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "scaler": scaler.state_dict() if scaler else None, "stopper": dict(stop)}
            last = ckp.stage1_dict(model, **meta, epoch=epoch + 1, val=val, complete=done)
            ckp.save_atomic({**last, "train_state": state}, run / "last.pt")
            if done:
                _mark_best_complete(run / "best.pt")
        log.info("fold %d epoch %d/%d: loss %.4f, val MF1 %.4f (best %.4f @ %d), %.1f img/s",
                 cfg.fold, epoch + 1, cfg.epochs, loss, row["val_mf1"], stop["best_mf1"],
                 stop["best_epoch"], row["images_per_s"])
        env.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        if done:
            if stop["bad_epochs"] >= cfg.patience:
                log.info("fold %d: early stop, no better val MF1 for %d epochs", cfg.fold, cfg.patience)
            break
    return run


def _ran(dev: torch.device, amp: torch.dtype | None, channels_last: bool, micro: int, env: dist.DistEnv) -> dict:
    """What ran, beside what was asked (`amp: true` asks; only CUDA runs it)."""
    from wbc import __version__

    return {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "amp": amp is not None, "dtype": str(amp or torch.float32).replace("torch.", ""),
            "grad_scaler": amp == torch.float16, "channels_last": channels_last, "processes": env.world,
            "micro_batch": micro, "torch": torch.__version__.split("+")[0], "wbc": __version__}


def _oom_error(cfg: Stage1Config, micro: int, run: Path) -> WbcError:
    return WbcError(
        f"out of GPU memory with {micro} images of {cfg.crop}px per step; lower --batch-size or "
        f"raise --accum-steps (e.g. --accum-steps {cfg.accum_steps * 2}) to keep the effective batch; "
        f"{run / 'last.pt'} holds the last finished epoch"
    )


def _mark_best_complete(path: Path) -> None:
    best = torch.load(path, map_location="cpu", weights_only=True)  # our own file, plain types
    best["complete"] = True
    ckp.save_atomic(best, path)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    # Augmentation RNG depends only on (seed, epoch, rank): a resumed epoch replays exactly.
    s = (seed * 1_000_003 + epoch * 7919 + rank) % 2**31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)  # wbc.degrade's RandomDegradation draws from `random` (workers=0 path)


def _loader(ds, micro: int, cfg: Stage1Config, dev: torch.device, sampler, epoch: int, rank: int) -> DataLoader:
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch * 7919 + rank) % 2**31)
    return DataLoader(ds, batch_size=micro, sampler=sampler, num_workers=cfg.workers,
                      generator=g, pin_memory=dev.type == "cuda", drop_last=False)


def _validate(model, val_ds, micro, cfg, setup, env, n_cls) -> dict:
    loader = DataLoader(val_ds, batch_size=micro, shuffle=False, num_workers=cfg.workers,
                        pin_memory=setup.device.type == "cuda")
    preds, labels, loss = predict_loader(model, loader, setup)
    preds, labels = env.gather_arrays(preds, labels)
    (loss,) = env.sum_floats(loss)
    m = classification_metrics(labels, preds, n_cls)
    return {"val_loss": loss / max(len(labels), 1), "val_mf1": float(m["mf1"]), "val_bacc": float(m["bacc"]),
            "val_mp": float(m["mp"]), "val_mspec": float(m["mspec"])}


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


def _bar(env: dist.DistEnv):
    return progress(transient=True) if env.is_main else _NoBar()
