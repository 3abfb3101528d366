"""RLR as an anomalib model: rlr's model, kernels, recipe, feature cache, scoring and threshold, driven by anomalib's
Engine (Lightning). Nothing of the method is implemented twice: the model is ``rlr.model.RLRModel`` (attention
through ``rlr_kernels``), the training step is ``rlr.train``'s (``training_loss``: jitter, loss, bf16 autocast;
learning rate per optimiser step), the scoring ``rlr.inference``'s, the threshold ``rlr.threshold``'s, the export graph's
operators ``rlr.export``'s. What anomalib brings: its datamodules, Engine, callbacks, metrics, visualiser, export.

Training step by step (what differs from ``rlr train`` is named):

- the tokens of the training images come from rlr's feature cache (the backbone runs once per image, not once per
  epoch) when the images reach the model through rlr's pipeline unchanged (the default pre-processor, no training
  augmentation); otherwise the frozen backbone runs on each batch;
- the epochs are the loader's: anomalib's shuffled batches, or with :class:`~.data.UnifiedDataModule` rlr's own
  epochs (class balance, seed), so that the same images give ``rlr train``'s run;
- the threshold: after each validation, the max of the scores of the validation set's normal images (rlr's
  holdout with UnifiedDataModule; the datamodule's validation split otherwise), set into the post-processor;
- the epoch count of the learning-rate schedule is the trainer's ``max_epochs``.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
from anomalib import LearningType, __version__ as anomalib_version
from anomalib.data import Batch, InferenceBatch
from anomalib.models import AnomalibModule
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import ConcatDataset
from torchvision.transforms.v2 import Compose

from ... import threshold as thresholds
from ...backbone import FeatureExtractor, create_backbone
from ...config import STANDARDIZING_SCORINGS, ConfigError, RLRConfig
from ...export import MIN_OPSET, WindowedAttention
from ...features import FeatureCache
from ...inference import GaussianBlur, combine_levels, token_scores
from ...model import RLRModel
from ...run import CHECKPOINT_FILE, RunError, level_shapes, save_checkpoint
from ...train import pooled_statistics, training_loss, trains_in_bf16
from .components import RLRPostProcessor, RLRPreProcessor, RLRResize, UnifiedEvaluator
from .data import UnifiedDataModule, describe_data

logger = logging.getLogger(__name__)

_CONFIG_FIELDS = set(RLRConfig.__dataclass_fields__)


class RLRInferenceModel(nn.Module):
    """What anomalib calls the torch model: pre-processed images (B, 3, S, S) -> raw scores (B,) and blurred anomaly
    maps (B, S, S), rlr's scoring (``rlr.inference``; the image score is the max of the blurred map).

    ``exporting``: the attention runs as rlr.export's standard operators instead of rlr_kernels, for an ONNX graph.
    ``scoring``: the run's (rlr.config.SCORINGS). ``level_stats``: a standardising scoring's per-level (mean, std),
    set after training; None under the paper's.
    """

    def __init__(self, extractor: FeatureExtractor, model: RLRModel, scoring: str = "paper"):
        super().__init__()
        self.scoring = scoring
        self.extractor, self.rlr = extractor, model
        self.blur = GaussianBlur(extractor.input_size)
        self.export_attention = nn.ModuleList(WindowedAttention(level.grid, level.layers[0].window)
                                              for level in model.levels)
        self.level_stats: Optional[list] = None
        self.exporting = False

    def level_scores(self, images: torch.Tensor) -> list:
        """Each level's token scores (B, L) float32."""
        tokens = self.extractor(images)
        attention = list(self.export_attention) if self.exporting else [None] * len(tokens)
        reconstructions = [level(t, a) for level, t, a in zip(self.rlr.levels, tokens, attention)]
        return [token_scores(t, r) for t, r in zip(tokens, reconstructions)]

    def maps(self, scores: list, provisional: bool = False) -> torch.Tensor:
        """Blurred anomaly maps (B, S, S) from token scores. ``provisional``: where a standardising scoring has no
        statistics yet (validation before the end of the first epoch computes them), the levels' plain mean."""
        size = self.extractor.input_size
        if provisional and self.level_stats is None:
            return self.blur(combine_levels(scores, self.rlr.grids, size))
        return self.blur(combine_levels(scores, self.rlr.grids, size, self.level_stats, self.scoring))

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        maps = self.maps(self.level_scores(images))
        return InferenceBatch(pred_score=maps.flatten(1).amax(dim=1), anomaly_map=maps)


def _rlr_pipeline_only(augmentations, size: int) -> bool:
    """Whether a dataset's augmentations are at most the model's own resize (appended by anomalib's datamodules)."""
    if augmentations is None:
        return True
    if isinstance(augmentations, RLRResize):
        return augmentations.side == size
    if isinstance(augmentations, Compose):
        return all(_rlr_pipeline_only(t, size) for t in augmentations.transforms)
    return False


class RLR(AnomalibModule):
    """RLR (He et al., ECCV 2024), one model for many classes, as an anomalib model.

    Args:
        backbone: a timm backbone name (None: rlr's default, the paper's ``tf_efficientnet_b6.aa_in1k`` from the
            timm hub; ``tf_efficientnet_lite0`` works offline).
        recipe: one of rlr's recipes (``"paper"``, ``"fast"``, ...; docs/recipes.md), as ``rlr train --recipe``.
        cache_dir: the feature cache's folder (default: ``$RLR_CACHE_DIR``, else ``~/.cache/rlr``).
        feature_cache: False computes the backbone features of every training batch instead.
        pre_processor, post_processor, evaluator, visualizer: anomalib's components; True: rlr's pipeline
            (:class:`RLRPreProcessor`), rlr's threshold (:class:`RLRPostProcessor`), anomalib's default metrics per
            category (:class:`UnifiedEvaluator`), anomalib's image visualiser.
        **settings: any other ``RLRConfig`` field (``input_size``, ``lr``, ``batch_size``, ``class_balance``,
            ``holdout``, ``scoring``, ``seed``, ``precision``, ``backend``, ...). The number of epochs is the
            trainer's: ``Engine(max_epochs=N)``.
    """

    def __init__(self, backbone: Optional[str] = None, recipe: str = "paper", *, cache_dir: Optional[str] = None,
                 feature_cache: bool = True, pre_processor=True, post_processor=True, evaluator=True,
                 visualizer=True, **settings):
        if "epochs" in settings:
            raise ConfigError("RLR trains for the trainer's number of epochs: pass it to the Engine "
                              "(Engine(max_epochs=N)), not to RLR")
        unknown = sorted(set(settings) - _CONFIG_FIELDS)
        if unknown:
            raise ConfigError(f"unknown RLR setting(s) {unknown}; the settings are RLRConfig's fields: "
                              f"{sorted(_CONFIG_FIELDS - {'epochs'})}")
        # Before anomalib's __init__: the default pre-processor is built from the input size.
        self.config = RLRConfig.from_recipe(recipe, backbone=backbone, **settings)
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        config = self.config
        self.cache_dir, self.feature_cache = cache_dir, feature_cache
        extractor = create_backbone(config.backbone, config.backbone_weights, config.out_indices, config.input_size,
                                    config.avg_pool)
        config.record_windows(extractor.grids)   # as `rlr train`: the window of every grid, in the run's config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)   # the initial weights `rlr train` gives with this seed
            rlr_model = RLRModel(config, extractor.channels, extractor.grids)
        self.model = RLRInferenceModel(extractor, rlr_model, self.config.scoring)
        self.threshold: Optional[thresholds.Threshold] = None
        self.history: list = []         # one dict per epoch, as in an rlr checkpoint
        self.data: dict = {}            # the training data, in rlr's checkpoint terms
        self._train_tokens: Optional[list] = None
        self._rows: Optional[dict] = None
        self._noise: Optional[torch.Generator] = None
        self._noise_state: Optional[torch.Tensor] = None
        self._val_scores: dict = {}
        self._threshold_epoch: Optional[int] = None

    # ------------------------------------------------------------------------------------------ anomalib's interface

    @property
    def extractor(self) -> FeatureExtractor:
        return self.model.extractor

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict:
        # A sanity check would run validation, and so set a threshold, with the untrained model.
        return {"num_sanity_val_steps": 0}

    def configure_pre_processor(self, image_size=None) -> RLRPreProcessor:
        if image_size is not None and len(set(image_size)) != 1:
            raise ConfigError(f"RLR takes square images (input_size), got image_size {tuple(image_size)}")
        return RLRPreProcessor(image_size[0] if image_size is not None else self.config.input_size)

    def configure_post_processor(self) -> RLRPostProcessor:
        return RLRPostProcessor()

    @staticmethod
    def configure_evaluator() -> UnifiedEvaluator:
        return UnifiedEvaluator(test_metrics=list(AnomalibModule.configure_evaluator().test_metrics))

    def configure_callbacks(self):
        # The metrics see the raw scores and maps (those `rlr test` scores: anomalib's normalisation clips, which
        # would tie the scores above the normalised range and change the AUROC); the post-processing, after them,
        # normalises what predict and the visualiser show.
        order = (self.pre_processor, self.evaluator, self.post_processor, self.visualizer)
        return [c for c in order if isinstance(c, Callback)]

    # ------------------------------------------------------------------------------------------ training

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ConfigError("RLR's learning-rate schedule needs a fixed number of epochs: Engine(max_epochs=N)")
        if epochs != self.config.epochs:
            logger.info("RLR trains for the trainer's %d epochs (the %s recipe's: %d)", epochs, self.config.recipe,
                        self.config.epochs)
        self.config.epochs = epochs
        datamodule = self.trainer.datamodule
        batch = self.config.batch_size
        size = getattr(datamodule, "train_batch_size", None)
        if datamodule is not None and not isinstance(datamodule, UnifiedDataModule) and size not in (None, batch):
            logger.warning("RLR: the %s recipe trains with batches of %d; the datamodule's train_batch_size %d is set "
                           "to %d (pass batch_size=%d to RLR to train with that)", self.config.recipe, batch, size,
                           batch, size)
            datamodule.train_batch_size = batch

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.rlr.parameters(), lr=self.config.lr,
                                fused=self.device.type in ("cpu", "cuda"))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # rlr's schedule: a function of the optimiser step, set before each step (no scheduler state to resume).
        steps = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        for group in optimizer.param_groups:
            group["lr"] = self.config.learning_rate(self.global_step, steps)
        optimizer.step(closure=optimizer_closure)

    def on_train_start(self) -> None:
        self._bf16 = trains_in_bf16(self.config, self.device)
        self._noise = torch.Generator(device=self.device).manual_seed(self.config.seed + 2)   # rlr train's stream
        if self._noise_state is not None:
            self._noise.set_state(self._noise_state)
            self._noise_state = None
        paths, categories, reason = self._training_images()
        if paths is not None:
            cache = FeatureCache(self.extractor, self.cache_dir, device=self.device,
                                 progress=self.trainer.progress_bar_callback is not None)
            table = cache.features(paths, "train features")
            self._train_tokens = [torch.from_numpy(a).to(self.device) for a in table.batch(range(len(table)))]
            self._rows = {path: row for row, path in enumerate(paths)}
            self._row_categories = categories
        else:
            self._train_tokens = self._rows = None
        datamodule = self.trainer.datamodule
        self.data = describe_data(datamodule, train_images=len(self.trainer.train_dataloader.dataset))
        logger.info("RLR: training on %d normal images of %d categories | %s | device %s | backbone %s | lr %g (%s, "
                    "warm-up %d steps) | batch %d | %s", self.data["train_images"], len(self.data["classes"]),
                    "features from rlr's cache" if paths is not None else f"backbone on every batch ({reason})",
                    self.device, self.config.backbone, self.config.lr, self.config.schedule,
                    self.config.warmup_steps, self.config.batch_size, "bf16 autocast" if self._bf16 else "fp32")

    def cached_feature_paths(self, datasets: list) -> tuple:
        """(image paths of ``datasets``, in order, None) when their tokens may come from rlr's feature cache: the
        images reach the model through rlr's pipeline unchanged (rlr's pre-processor, no training augmentation).
        Else (None, why not)."""
        if not self.feature_cache:
            return None, "feature_cache=False"
        if not isinstance(self.pre_processor, RLRPreProcessor) or self.pre_processor.input_size != self.config.input_size:
            return None, "a pre-processor other than rlr's"
        paths = []
        for dataset in datasets:
            samples = getattr(dataset, "samples", None)
            if samples is None or "image_path" not in samples:
                return None, "a training set without image paths"
            if not _rlr_pipeline_only(getattr(dataset, "augmentations", None), self.config.input_size):
                return None, "training augmentations"
            paths += [str(p) for p in samples.image_path]
        return paths, None

    def _training_images(self) -> tuple:
        """(image paths, category of each, None) of the training set when its tokens come from rlr's feature cache,
        else (None, None, why not)."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        leaves = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
        paths, reason = self.cached_feature_paths(leaves)
        if paths is None:
            return None, None, reason
        datamodule = self.trainer.datamodule
        names = getattr(datamodule, "categories", None) or [getattr(datamodule, "category", "") or
                                                             getattr(datamodule, "name", "") or "default"]
        categories = [names[min(number, len(names) - 1)] for number, leaf in enumerate(leaves) for _ in range(len(leaf))]
        return paths, categories, None

    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()
        self._epoch_loss = torch.zeros((), device=self.device)
        self._epoch_images = 0

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self._rows is not None:
            try:
                index = torch.tensor([self._rows[str(path)] for path in batch.image_path], device=self.device)
            except KeyError as err:
                raise RuntimeError(f"training image {err} was not in the training set when training started (its "
                                   f"features were cached then): the datamodule changed its images") from None
            clean = [tokens[index].float() for tokens in self._train_tokens]
        else:
            clean = [tokens.float() for tokens in self.extractor(batch.image)]
        loss = training_loss(self.model.rlr, clean, self.config.jitter_scale, self._noise, self._bf16,
                             self.device.type)
        count = len(clean[0])
        self._epoch_loss += loss.detach() * count
        self._epoch_images += count
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=count)
        return loss

    def on_train_epoch_end(self) -> None:
        seconds = time.perf_counter() - self._epoch_started
        images = max(self._epoch_images, 1)
        self.history.append({"epoch": len(self.history) + 1, "loss": float(self._epoch_loss) / images,
                             "seconds": seconds, "images_per_second": images / seconds,
                             "lr": self.optimizers().param_groups[0]["lr"]})

    def on_train_end(self) -> None:
        if self.threshold is None:
            if self._train_tokens is not None:
                self._threshold_from_training_images()
            else:
                logger.warning("RLR: no normal validation image was scored, so the model has no threshold (labels and "
                               "normalised scores stay empty): give the datamodule a validation split of normal "
                               "images (val_split_mode='from_train'), or use UnifiedDataModule (rlr's holdout)")
        elif self._threshold_epoch != len(self.history):
            logger.warning("RLR: the threshold comes from the validation after epoch %s, not after the last epoch "
                           "(%d): validate after the last epoch (check_val_every_n_epoch=1)", self._threshold_epoch,
                           len(self.history))
        self._train_tokens = self._rows = None   # the resident training tokens are no longer needed

    @torch.no_grad()
    def _threshold_from_training_images(self) -> None:
        """rlr's rule without held-out images: the training images' own scores (threshold.json source "train")."""
        was_training = self.model.training
        self.model.eval()
        scores: dict = {}
        count = len(self._row_categories)
        for start in range(0, count, 16):
            index = torch.arange(start, min(start + 16, count), device=self.device)
            tokens = [t[index].float() for t in self._train_tokens]
            level_scores = [token_scores(t, r) for t, r in zip(tokens, self.model.rlr(tokens))]
            for row, name in enumerate(self._row_categories[start:start + 16]):
                scores.setdefault(name, []).append([s[row:row + 1].cpu() for s in level_scores])
        self._set_threshold(scores, "train", 0.0)
        self.model.train(was_training)

    # ------------------------------------------------------------------------------------------ validation: threshold

    def on_validation_epoch_start(self) -> None:
        self._val_scores = {}

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Batch:
        scores = self.model.level_scores(batch.image)
        normal = (batch.gt_label == 0) if batch.gt_label is not None else torch.ones(len(batch.image), dtype=torch.bool)
        if bool(normal.any()):
            keep = normal.to(scores[0].device)
            self._val_scores.setdefault(self._category(dataloader_idx, "val_categories"), []).append(
                [s[keep].cpu() for s in scores])
        maps = self.model.maps(scores, provisional=True)   # the statistics come from this pass's normal images
        return batch.update(pred_score=maps.flatten(1).amax(dim=1), anomaly_map=maps)

    def _category(self, index: int, kind: str) -> str:
        datamodule = self.trainer.datamodule
        names = getattr(datamodule, kind, None)
        if names:
            return names[index]
        return getattr(datamodule, "category", "") or getattr(datamodule, "name", "") or "default"

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._val_scores:
            return
        datamodule = self.trainer.datamodule
        share = getattr(datamodule, "holdout_share", None)
        if share is None:
            images = sum(len(s[0]) for batches in self._val_scores.values() for s in batches)
            share = round(images / (images + self.data.get("train_images", 0) or images), 4)
        self._set_threshold(self._val_scores, "holdout", share)
        self._threshold_epoch = self.current_epoch + 1

    def _set_threshold(self, scores: dict, source: str, share: float) -> None:
        """rlr train's end of training on normal images' token scores ({category: [per-level (B, L) batches]}): the
        standardising scoring's statistics, then the per-category and global thresholds (rlr.threshold)."""
        scoring = self.config.scoring
        self.model.level_stats = pooled_statistics(scores, scoring) if scoring in STANDARDIZING_SCORINGS else None
        image_scores = {name: torch.cat([self.model.maps([s.to(self.device) for s in batch]).flatten(1).amax(dim=1)
                                         for batch in batches]).cpu().numpy() for name, batches in scores.items()}
        self.threshold = thresholds.choose(image_scores, source, share)
        if isinstance(self.post_processor, RLRPostProcessor):
            self.post_processor.set_threshold(self.threshold)

    # ------------------------------------------------------------------------------------------ test and predict

    def _scored(self, batch: Batch) -> Batch:
        if self.config.scoring in STANDARDIZING_SCORINGS and self.model.level_stats is None:
            raise RunError(f"this RLR model scores with scoring={self.config.scoring!r} but has no statistics yet: "
                           "they come from normal validation images at the end of training (engine.fit)")
        predictions = self.model(batch.image)
        if isinstance(self.post_processor, RLRPostProcessor):
            predictions = self.post_processor.labels(predictions)
        return batch.update(**{k: v for k, v in predictions._asdict().items() if v is not None})

    def test_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> Batch:
        return self._scored(batch)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Batch:
        return self._scored(batch)

    # ------------------------------------------------------------------------------------------ checkpoints, rlr runs

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rlr"] = {
            "config": self.config.to_dict(), "level_stats": self.model.level_stats, "history": self.history,
            "threshold": self.threshold.to_dict() if self.threshold else None, "data": self.data,
            "noise": self._noise.get_state() if self._noise is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("rlr")
        if not state:
            return
        self.config.epochs = state["config"]["epochs"]
        stats = state.get("level_stats")
        self.model.level_stats = [tuple(pair) for pair in stats] if stats else None
        self.history, self.data = list(state.get("history", [])), dict(state.get("data", {}))
        if state.get("threshold"):
            self.threshold = thresholds.Threshold.from_dict(state["threshold"], "the checkpoint's threshold")
            if isinstance(self.post_processor, RLRPostProcessor):
                self.post_processor.set_threshold(self.threshold)
        self._noise_state = state.get("noise")

    def save_run(self, run_dir, overwrite: bool = False) -> Path:
        """Write the trained model as an rlr run folder (config.json, checkpoint.pt, threshold.json): ``rlr.load``,
        ``rlr test``, ``rlr predict``, ``rlr export`` and ``rlr serve`` take it like a run of ``rlr train``."""
        if not self.history:
            raise RunError("the model has not been trained yet: train it with engine.fit(...) first")
        folder = Path(run_dir)
        if (folder / CHECKPOINT_FILE).exists() and not overwrite:
            raise RunError(f"{folder} already holds an rlr run; choose another folder or pass overwrite=True")
        folder.mkdir(parents=True, exist_ok=True)
        config = RLRConfig.from_dict(self.config.to_dict())
        config.save(folder)
        rlr_model = self.model.rlr
        save_checkpoint(folder / CHECKPOINT_FILE, {
            "model": {k: v.detach().cpu() for k, v in rlr_model.state_dict().items()}, "levels": level_shapes(rlr_model),
            "optimizer": None, "epoch": len(self.history), "step": 0, "partial_epoch": None, "rng": None,
            "history": self.history, "data": self.data, "backbone_weights_sha256": self.extractor.weights_id,
            "level_stats": self.model.level_stats, "trained_with": f"anomalib {anomalib_version}",
        }, config)
        stale = folder / thresholds.THRESHOLD_FILE
        if self.threshold is not None:
            thresholds.save(folder, self.threshold)
        elif stale.exists():
            stale.unlink()
        return folder

    def to_onnx(self, export_root, model_file_name: str = "model", input_size=None, **kwargs) -> Path:
        """anomalib's ONNX export of the whole module (pre-processing, RLR, post-processing) in standard operators.

        The graph takes (N, 3, H, W) float RGB in [0, 1] of one size, by default the model's input size (rlr's
        Lanczos resize is a pair of constant matrices of that size); opset 18 or later."""
        size = self.config.input_size
        input_size = tuple(int(s) for s in input_size) if input_size is not None else (size, size)
        if isinstance(self.pre_processor, RLRPreProcessor):
            self.pre_processor.prepare_export(input_size)
        kwargs.setdefault("opset_version", MIN_OPSET)
        self.model.exporting = True
        try:
            return super().to_onnx(export_root, model_file_name=model_file_name, input_size=input_size, **kwargs)
        finally:
            self.model.exporting = False
