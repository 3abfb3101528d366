"""Training of one unified RLR model on the normal images of all classes (DESIGN.md §2).

Per step, for a batch of clean tokens f of every level:

    f_j  = f + n,  n ~ N(0, 1) * ||f_t||_2 / C * s       (jitter on all tokens, s = jitter_scale)
    loss = sum over levels [ MSE(f_hat, f) + mean_t(1 - cos(f_hat_t, f_t)) ],  f_hat = level(f_j)

and ONE Adam step on the summed loss. (The original code steps the optimiser once per level on
that level's loss; since the levels share no parameters, one step on the sum differs only through
Adam's per-step bookkeeping, and it halves the optimiser work.)

Tokens come from the feature cache (rlr.features), so the backbone runs once per image, not per
epoch. The checkpoint is rewritten atomically after every epoch (and every ``save_every``
optimiser steps) with the optimiser and RNG states, so ``resume=True`` continues exactly where
training stopped: a mid-epoch checkpoint holds the RNG states of its epoch's start and the steps
done, and resuming redraws the epoch's order and replays the noise draws of those steps, so the
run goes on with the same batches and noise as if never stopped. The test set is never read
here: the final model is the last epoch's, no selection on test data.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .atomic import remove_temporaries
from .backbone import create_backbone
from . import distributed
from .config import CONFIG_FILE, RLRConfig
from .data import DatasetError, load_dataset
from .features import FeatureCache
from .inference import Scorer, bf16_is_native, image_scores, resolve_device, score_statistics
from .model import RLRModel
from . import threshold as thresholds
from .run import CHECKPOINT_FILE, RunError, level_shapes, read_run, save_checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int             # epochs completed in total
    history: list           # one dict per epoch: epoch, loss, seconds, images_per_second
    train_images: int
    seconds: float          # wall time of this call


def trains_in_bf16(config: RLRConfig, device: torch.device) -> bool:
    """``precision`` "bf16"; "auto" where bf16 is native on ``device``; otherwise fp32."""
    return config.precision == "bf16" or (config.precision == "auto" and bf16_is_native(device))


def add_jitter(tokens: Tensor, scale: float, generator: torch.Generator) -> Tensor:
    """tokens (B, L, C) + N(0, 1) * ||token||_2 / C * scale, on every token."""
    if scale == 0:
        return tokens
    noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
    return tokens + noise * (tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]) * scale


def reconstruction_loss(reconstruction: Tensor, target: Tensor) -> Tensor:
    """MSE over all elements + mean over tokens of (1 - cosine similarity)."""
    reconstruction = reconstruction.float()
    return F.mse_loss(reconstruction, target) + (1 - F.cosine_similarity(reconstruction, target, dim=-1)).mean()


def training_loss(model, clean: list, jitter_scale: float, noise: torch.Generator, bf16: bool,
                  device_type: str) -> Tensor:
    """The objective of one batch: each level's clean tokens jittered (the noise drawn level by level, in
    order), reconstructed by ``model`` (under bf16 autocast where ``bf16``), the levels' losses summed."""
    noisy = [add_jitter(f, jitter_scale, noise) for f in clean]
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
        reconstructions = model(noisy)
    return sum(reconstruction_loss(r, f) for r, f in zip(reconstructions, clean))


def training_samples(splits: dict, holdout: float = 0.0, seed: int = 0) -> tuple:
    """(union of the classes' normal training images, class by class; {class: held-out images}).

    Holdout rule (docs/usage.md): a class with n >= HOLDOUT_MIN_IMAGES normal images keeps
    max(1, round(holdout * n)) of them out of training, those whose sha256(seed, class, file name)
    ranks lowest: the same images on every machine, whatever the folder's location or listing order.
    Smaller classes train on all their images.
    """
    samples, held_out = [], {}
    for name, split in splits.items():
        count = len(split.train)
        take = max(1, round(holdout * count)) if holdout > 0 and count >= HOLDOUT_MIN_IMAGES else 0
        rank = sorted(split.train, key=lambda s: hashlib.sha256(f"{seed}/{name}/{Path(s.path).name}".encode()).digest())
        chosen = {s.path for s in rank[:take]}
        samples.extend(s for s in split.train if s.path not in chosen)
        held_out[name] = [s for s in split.train if s.path in chosen]
    if not samples:
        raise DatasetError(f"no training images in classes {sorted(splits)}")
    return samples, held_out


HOLDOUT_MIN_IMAGES = 5


def normal_images(splits: dict, samples: list, held_out: dict, holdout: float) -> tuple:
    """({class: [Sample]}, source, share): the normal images a run's threshold and scoring statistics come from.

    The held-out ones; else (the paper's training set stays whole, or every class was too small to hold
    images out) the training images themselves, said so by ``source`` "train".
    """
    if any(held_out.values()):
        return held_out, "holdout", holdout
    return {name: [s for s in samples if s.class_name == name] for name in splits}, "train", 0.0


def normal_token_scores(model: RLRModel, cache: FeatureCache, images: dict, device, batch_size: int = 16) -> dict:
    """{class: [per-level token scores (B, L) of a batch, ...]} of normal ``images`` ({class: [Sample]}): read
    and scored once, for both a standardising scoring's statistics and the threshold."""
    scorer = Scorer(model, cache.extractor, device)
    scores = {}
    for name, samples in images.items():
        table = cache.features([s.path for s in samples], f"{name} normal images")
        scores[name] = [scorer.level_scores(table.tensors(range(i, min(i + batch_size, len(samples))), device))
                        for i in range(0, len(samples), batch_size)]
    return scores


def pooled_statistics(scores: dict, scoring: str) -> list:
    """Per-level (mean, std) of :func:`normal_token_scores` in ``scoring``'s space, the classes pooled (a unified
    model scores without a class label): a standardising scoring's statistics."""
    return score_statistics((batch for batches in scores.values() for batch in batches), scoring)


def store_threshold(out: Path, scorer: Scorer, scores: dict, source: str, holdout: float,
                    log=print) -> thresholds.Threshold:
    """Image scores of each class's normal images from their token scores (:func:`normal_token_scores`, combined
    by ``scorer``'s scoring) and RUN/threshold.json from them (rlr.threshold)."""
    image_scores_by_class = {name: np.concatenate([image_scores(scorer.maps_from_scores(batch)) for batch in batches])
                             if batches else np.zeros(0) for name, batches in scores.items()}
    chosen = thresholds.choose(image_scores_by_class, source, holdout)
    thresholds.save(out, chosen)
    per_class = ", ".join(f"{k} {v.threshold:.4g} ({v.images} img)" for k, v in chosen.classes.items())
    log(f"threshold from {chosen.global_cut.images} {'held-out' if source == 'holdout' else 'training'} images: "
        f"global {chosen.global_cut.threshold:.4g}; {per_class} -> {out / thresholds.THRESHOLD_FILE}")
    return chosen


def _fingerprint(digests: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def _rng_states(shuffle: torch.Generator, noise: torch.Generator) -> dict:
    return {"shuffle": shuffle.get_state(), "noise": noise.get_state(), "noise_device": noise.device.type}


def train(out, data_root=None, config: Optional[RLRConfig] = None, *, classes=None, layout: str = "auto",
          cache_dir=None, device=None, resume: bool = False, epochs: Optional[int] = None,
          backend: Optional[str] = None, progress: bool = True, log=print,
          dist_timeout_minutes: Optional[float] = None, stop_after: Optional[int] = None,
          save_every: Optional[int] = None) -> TrainResult:
    """Train (or with ``resume=True`` continue) the run in folder ``out``.

    ``stop_after=N`` returns after epoch N without changing the run's epoch count (so its
    learning-rate schedule): ``resume=True`` later continues exactly (used for learning curves).
    ``save_every=N`` also writes the checkpoint every N optimiser steps (besides every epoch).

    A new run needs ``data_root`` and ``config`` (default: the paper's). On resume the run's own
    config, data root and classes are used; only ``epochs`` (and the runtime ``backend``) may change.

    Under torchrun (WORLD_SIZE > 1) every rank calls this and they train one model with DDP;
    ``dist_timeout_minutes`` bounds a collective's wait for a peer (rlr.distributed, docs/distributed.md).
    """
    if save_every is not None and (isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1):
        raise ValueError(f"--save-every must be a positive number of optimiser steps, got {save_every!r}")
    with distributed.session(device, dist_timeout_minutes, out, local_device=resolve_device) as dist:
        return _train(dist, out, data_root, config, classes=classes, layout=layout, cache_dir=cache_dir,
                      resume=resume, epochs=epochs, backend=backend, progress=progress, log=log,
                      stop_after=stop_after, save_every=save_every)


def _train(dist: distributed.Distributed, out, data_root, config, *, classes, layout, cache_dir, resume, epochs,
           backend, progress, log, stop_after=None, save_every=None) -> TrainResult:
    started = time.perf_counter()
    out = Path(out)
    device = dist.device
    if not dist.is_main:   # rank 0 alone logs and shows progress
        progress, log = False, (lambda *_: None)
    checkpoint = None
    if resume and not dist.from_main((out / CHECKPOINT_FILE).exists):
        # Killed before its first checkpoint: nothing to continue, so the run starts over, as the same command
        # without --resume would, with the settings it was started with when its config.json holds them.
        if data_root is None:
            where = f"{out} holds no checkpoint" if dist.from_main(out.is_dir) else f"run folder {out} does not exist"
            raise RunError(f"{where}: there is nothing to resume; to start the run, give its data (--data-root DIR)")
        stored = config is None and dist.from_main((out / CONFIG_FILE).is_file)
        if stored:
            config = dist.from_main(RLRConfig.load, out)
        log(f"{out} holds no checkpoint (the run stopped before its first epoch ended): --resume starts it from the "
            f"beginning{' with the settings of its config.json' if stored else ''}")
        resume = False
    if resume:
        config, checkpoint = dist.from_main(read_run, out)   # rank 0 reads the run folder for every rank
        if checkpoint.get("optimizer") is None:
            raise RunError(f"{out} holds no training state (an imported checkpoint?): it cannot be resumed")
        data_meta = checkpoint["data"]
        data_root = data_root or data_meta["root"]
        classes = data_meta["classes"]
        layout = data_meta["layout"]
        if epochs is not None:
            config.epochs = epochs
        if backend is not None:
            config.backend = backend
        dist.check_resume(checkpoint, config.batch_size, log)
    else:
        if dist.from_main((out / CHECKPOINT_FILE).exists):
            raise RunError(f"{out} already holds a trained run; pass --resume to continue it, or choose another --out")
        if data_root is None:
            raise ValueError("data_root is required to start a run (--data-root DIR)")
        config = config or RLRConfig()
        if epochs is not None:
            config.epochs = epochs

    splits = load_dataset(data_root, classes, layout)
    samples, held_out = training_samples(splits, config.holdout, config.seed)
    extractor = create_backbone(config.backbone, config.backbone_weights, config.out_indices,
                                config.input_size, config.avg_pool)
    config.record_windows(extractor.grids)   # a grid side the recipe's table lacks: the rule's window, written down
    torch.manual_seed(config.seed)   # model initialisation; built before the features, so bad settings fail fast
    model = RLRModel(config, extractor.channels, extractor.grids).to(device)
    cache = FeatureCache(extractor, cache_dir, device=device, progress=progress)
    # Each rank computes (and caches) the features of its own shard only; the fingerprint covers all.
    shard = dist.shard(samples)
    table = cache.features([s.path for s in shard], "train features")
    class_ids = {name: number for number, name in enumerate(splits)}
    shard_classes = torch.tensor([class_ids[s.class_name] for s in shard])
    fingerprint = _fingerprint(dist.gather(table.digests))
    if checkpoint is not None:
        if checkpoint["data"]["fingerprint"] != fingerprint:
            raise RunError(f"the training images under {data_root} differ from those the run in {out} started with; "
                           f"resume needs the same images (or start a new run)")
        if checkpoint["backbone_weights_sha256"] != extractor.weights_id:
            raise RunError(f"backbone weights differ from those the run in {out} started with ({config.backbone})")

    # All training tokens stay resident (float16) on the training device: batches are gathered by index.
    tokens = [torch.from_numpy(a).to(device) for a in table.batch(range(len(table)))]
    del table

    # The fused implementation (one kernel for all parameters) exists for CPU and CUDA tensors.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type in ("cpu", "cuda"))
    shuffle_gen = torch.Generator().manual_seed(config.seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed + 2)
    history, start_epoch, start_step = [], 0, 0
    level_stats = None   # a standardising scoring's statistics: computed when this call stops training
    if checkpoint is not None:
        level_stats = checkpoint.get("level_stats")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, history = checkpoint["epoch"], list(checkpoint["history"])
        start_step = checkpoint.get("step", 0)   # > 0: a mid-epoch checkpoint (checkpoints before --save-every: 0)
        shuffle_gen.set_state(checkpoint["rng"]["shuffle"])
        if checkpoint["rng"]["noise_device"] == device.type:
            noise_gen.set_state(checkpoint["rng"]["noise"])
        else:
            warnings.warn(f"resuming on {device.type} a run that trained on {checkpoint['rng']['noise_device']}: "
                          f"the jitter noise continues from a new seed, not bit-exactly", RuntimeWarning)
            noise_gen.manual_seed(config.seed + 2 + start_epoch)
        if start_epoch >= config.epochs and not start_step:
            log(f"{out} is already trained for {start_epoch} epochs (config epochs={config.epochs}); "
                f"pass --epochs N with N > {start_epoch} to train longer")
    if dist.is_main:
        for path in (out / CHECKPOINT_FILE, out / CONFIG_FILE):   # left by a process killed mid-write
            remove_temporaries(path)
        config.save(out)
    dist.end_setup()
    trainer = dist.wrap(model)   # DDP under torchrun (after loading the state: it starts from rank 0's weights)

    count = len(samples)
    data_meta = {"root": str(data_root), "layout": layout, "classes": list(splits), "train_images": count,
                 "fingerprint": fingerprint,
                 "holdout": {"share": config.holdout, "images": {k: [s.path for s in v] for k, v in held_out.items()}}}
    bf16 = trains_in_bf16(config, device)   # resolved once: it probes the hardware
    log(f"training on {count} normal images of {len(splits)} classes ({', '.join(splits)}) | device {device} | "
        f"backbone {config.backbone} | epochs {start_epoch}->{config.epochs} | lr {config.lr} "
        f"({config.schedule}, warm-up {config.warmup_steps} steps) | batch {config.batch_size} | "
        f"{'bf16 autocast' if bf16 else 'fp32'}")
    if dist.active:
        log(dist.describe(config.batch_size, config.lr, count))
    steps = math.ceil(dist.samples_per_rank(count) / config.batch_size)   # the same on every rank
    model.train()

    def save(epochs_done: int, step: int, rng: dict, partial: Optional[dict]) -> None:
        if dist.is_main:
            save_checkpoint(out / CHECKPOINT_FILE, {
                "model": model.state_dict(), "levels": level_shapes(model), "optimizer": optimizer.state_dict(),
                "epoch": epochs_done, "step": step, "partial_epoch": partial, "rng": rng, "history": history,
                "data": data_meta, "backbone_weights_sha256": extractor.weights_id, "level_stats": level_stats,
                **dist.checkpoint_info(config.batch_size),
            }, config)

    at_epoch_end = not start_step   # a mid-epoch checkpoint must not be overwritten by one that says "step 0"
    for epoch in range(start_epoch, min(config.epochs, stop_after or config.epochs)):
        level_stats = None   # they describe the model as it was: a checkpoint written while it changes holds none
        epoch_start = time.perf_counter()
        epoch_rng = _rng_states(shuffle_gen, noise_gen)   # a mid-epoch checkpoint restarts its epoch from these
        order = dist.epoch_order(epoch, len(tokens[0]), count, shuffle_gen, noise_gen, config.seed,
                                 shard_classes if config.class_balance else None, config.class_balance).to(device)
        first, earlier_seconds = 0, 0.0
        loss_sum = torch.zeros((), device=device)
        if epoch == start_epoch and start_step:
            first, partial = start_step, checkpoint["partial_epoch"]
            earlier_seconds = partial["seconds"]
            if dist.is_main:   # the saved loss sum is over all ranks
                loss_sum += partial["loss_sum"]
            for step in range(first):   # replay the noise draws of the steps done, so the noise continues exactly
                index = order[step * config.batch_size:(step + 1) * config.batch_size]
                for t in tokens:
                    add_jitter(t[index].float(), config.jitter_scale, noise_gen)
        bar = tqdm(range(first, steps), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not progress,
                   leave=False, initial=first, total=steps)
        for step in bar:
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            clean = [t[index].float() for t in tokens]
            loss = training_loss(trainer, clean, config.jitter_scale, noise_gen, bf16, device.type)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:   # warm-up / cosine: a function of the global step
                group["lr"] = config.learning_rate(epoch * steps + step, steps)
            optimizer.step()
            loss_sum += loss.detach() * len(index)
            if progress and (step % 10 == 0 or step == steps - 1):
                seen = min((step + 1 - first) * config.batch_size, len(order))
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / (time.perf_counter() - epoch_start):.1f}")
            if save_every and (epoch * steps + step + 1) % save_every == 0 and step < steps - 1:
                (total,) = dist.sum(float(loss_sum))
                save(epoch, step + 1, epoch_rng, {"loss_sum": total,
                                                  "seconds": earlier_seconds + time.perf_counter() - epoch_start})
        seconds = earlier_seconds + time.perf_counter() - epoch_start
        loss_total, samples_seen = dist.sum(float(loss_sum), len(order))
        record = {"epoch": epoch + 1, "loss": loss_total / samples_seen, "seconds": seconds,
                  "images_per_second": count / seconds, "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        save(epoch + 1, 0, _rng_states(shuffle_gen, noise_gen), None)
        at_epoch_end = True
        log(f"epoch {epoch + 1}/{config.epochs}  loss {record['loss']:.5f}  {seconds:.1f}s  "
            f"{record['images_per_second']:.1f} img/s")
    finished = bool(history) and history[-1]["epoch"] >= config.epochs
    normal, source, share = normal_images(splits, samples, held_out, config.holdout)
    # Also when stopped early (stop_after): a learning curve scores the run as it stands.
    need_stats = dist.is_main and history and at_epoch_end and config.scoring != "paper" and level_stats is None
    need_threshold = dist.is_main and finished and (stop_after is None or stop_after >= config.epochs)
    if need_stats or need_threshold:
        model.eval()
        normal_scores = normal_token_scores(model, cache, normal, device)
        if need_stats:
            level_stats = pooled_statistics(normal_scores, config.scoring)
            log(f"scoring {config.scoring}: per-level (mean, std) of "
                f"{'log ' if config.scoring == 'log-standardized' else ''}token scores on {sum(map(len, normal.values()))} "
                f"{'held-out' if source == 'holdout' else 'training'} images: "
                + ", ".join(f"level {i} {m:.4g} / {sd:.4g}" for i, (m, sd) in zip(config.out_indices, level_stats)))
            save(history[-1]["epoch"], 0, _rng_states(shuffle_gen, noise_gen), None)
        if need_threshold:
            scorer = Scorer(model, cache.extractor, device, level_stats=level_stats, scoring=config.scoring)
            store_threshold(out, scorer, normal_scores, source, share, log=log)
    return TrainResult(out, history[-1]["epoch"] if history else 0, history, count, time.perf_counter() - started)
