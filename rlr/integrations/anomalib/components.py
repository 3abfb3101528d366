"""rlr's input pipeline, threshold and per-class metrics as anomalib components (pre-processor, post-processor,
evaluator) of :class:`rlr.integrations.anomalib.RLR`.

- :class:`RLRResize` / :class:`RLRPreProcessor`: rlr's pipeline on anomalib's tensors. anomalib reads an image
  file as float RGB in [0, 1] (its 8-bit values / 255); the resize rounds to those 8-bit values and resizes with
  Pillow's Lanczos filter exactly as ``rlr.backbone.resize_image`` (masks: nearest, pixel centres aligned, as
  ``rlr.data.load_mask``), then ImageNet mean/std. So the images the model sees in anomalib are the ones
  ``rlr train`` / ``rlr.load`` see, and a run trained here scores the same in rlr. Being a ``Resize``, anomalib
  also applies it to each dataset item before batching (its datamodules append the model's resize).
- :class:`RLRPostProcessor`: anomalib's post-processing with rlr's threshold (the max of held-out normal images'
  scores, rlr.threshold) in its buffers, chosen so that anomalib's normalised score equals rlr's.
- :class:`UnifiedEvaluator`: anomalib's metrics per category (one test dataloader per category) and their mean.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from anomalib.metrics.evaluator import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import Compose, Normalize, Resize

from ... import threshold as thresholds
from ...backbone import IMAGENET_MEAN, IMAGENET_STD, resize_image
from ...export import LanczosResize

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- pre-processing

def _to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Float RGB in [0, 1] -> float 0..255 holding the 8-bit values the file decoded to (as rlr.export's input)."""
    return torch.floor(images * 255 + 0.5).clamp(0, 255)


class RLRResize(Resize):
    """Resize to ``size`` x ``size`` as rlr does: Pillow's Lanczos on the 8-bit values (images; each with Pillow itself,
    ``rlr.backbone.resize_image``), nearest with pixel centres aligned (masks). Images already at that size pass
    unchanged, as in rlr."""

    def __init__(self, size: int):
        super().__init__((int(size), int(size)), antialias=True)
        self.side = int(size)

    def transform(self, inpt: Any, params: dict) -> Any:
        if isinstance(inpt, Image.Image):
            return Image.fromarray(resize_image(np.asarray(inpt.convert("RGB")), self.side))
        if not isinstance(inpt, torch.Tensor) or tuple(inpt.shape[-2:]) == (self.side, self.side):
            return inpt
        if isinstance(inpt, tv_tensors.Mask):
            return tv_tensors.wrap(self._resize_mask(inpt.as_subclass(torch.Tensor)), like=inpt)
        resized = self._resize_image(inpt.as_subclass(torch.Tensor))
        return tv_tensors.wrap(resized, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else resized

    def _resize_mask(self, mask: torch.Tensor) -> torch.Tensor:
        flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
        out = F.interpolate(flat, size=(self.side, self.side), mode="nearest-exact")
        return out.reshape(*mask.shape[:-2], self.side, self.side).to(mask.dtype)

    def _resize_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() not in (3, 4) or images.shape[-3] != 3:
            raise ValueError(f"RLRResize takes RGB images (3, H, W) or (N, 3, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"RLRResize takes float RGB in [0, 1] (anomalib's images), got {images.dtype}")
        height, width = images.shape[-2:]
        batch = _to_pixels(images).reshape(-1, 3, height, width).to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
        out = np.stack([resize_image(np.ascontiguousarray(image), self.side) for image in batch])
        out = torch.from_numpy(out).permute(0, 3, 1, 2).to(images.device, images.dtype) / 255
        return out.reshape(*images.shape[:-2], self.side, self.side)


class RLRPreProcessor(PreProcessor):
    """anomalib's pre-processor with rlr's pipeline: :class:`RLRResize` to ``input_size``, ImageNet mean/std.

    In Lightning's loops anomalib applies ``transform`` (and the datamodules apply the resize to each item). Called as
    a module (``RLR.forward``, what anomalib exports) it runs the same pipeline in standard operators: the resize of
    one input size (:meth:`prepare_export`) as rlr.export's ``LanczosResize``, bit-exact to Pillow; other sizes are
    resized with Pillow outside a traced graph.
    """

    def __init__(self, input_size: int = 256):
        super().__init__(transform=self.pipeline(input_size))
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.export_resize: Optional[LanczosResize] = None

    @staticmethod
    def pipeline(input_size: int) -> Compose:
        return Compose([RLRResize(input_size), Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))])

    def prepare_export(self, image_size: tuple) -> None:
        """Make the graph's resize that of (H, W) images (none for the model's own size)."""
        size = (self.input_size, self.input_size)
        image_size = tuple(int(s) for s in image_size)
        self.export_resize = LanczosResize(*image_size, self.input_size).to(self.mean.device) \
            if image_size != size else None

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = _to_pixels(batch)
        if tuple(pixels.shape[-2:]) != (self.input_size, self.input_size):
            if self.export_resize is not None and self.export_resize.source == tuple(pixels.shape[-2:]):
                pixels = self.export_resize(pixels)
            elif torch.compiler.is_compiling():
                raise ValueError(f"the graph resizes {tuple(self.export_resize.source) if self.export_resize else 'no'} "
                                 f"input size, not {tuple(pixels.shape[-2:])}: export with input_size=(H, W)")
            else:
                pixels = _to_pixels(RLRResize(self.input_size)(batch))
        return (pixels / 255 - self.mean) / self.std

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if getattr(batch, "image", None) is not None:   # None: a batch of image paths (UnifiedDataModule, cached)
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # anomalib's hook takes no dataloader index, which Lightning passes with several validation dataloaders
        # (UnifiedDataModule: one per category).
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx)

    # anomalib persists only its own registry of transforms in a checkpoint: this one is rebuilt from its size.
    def checkpoint_config(self) -> dict:
        return {"input_size": self.input_size}

    def load_checkpoint_config(self, config: dict) -> None:
        if config.get("input_size") is not None and int(config["input_size"]) != self.input_size:
            self.input_size = int(config["input_size"])
            self.transform = self.pipeline(self.input_size)
            self.export_resize = None


# ---------------------------------------------------------------------------------------------- post-processing

class RLRPostProcessor(PostProcessor):
    """anomalib's post-processor holding rlr's threshold instead of one fitted on labelled validation images.

    rlr's threshold t is the max of the scores of normal images training did not see (rlr.threshold); the module
    sets it after each validation (:meth:`set_threshold`). anomalib normalises a score s to
    clip((s - threshold) / (max - min) + 0.5, 0, 1); with threshold = t, min = t - span and max = t + span
    (span = t - the lowest of those normal scores) that is rlr's normalised score, 0.5 at the threshold. The
    anomaly map is cut at the same t (rlr's masks: the pixels of the blurred map that reach the image threshold).
    ``image_sensitivity`` moves the cut as in anomalib (0.5: at t).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.threshold: Optional[thresholds.Threshold] = None

    def set_threshold(self, threshold: thresholds.Threshold) -> None:
        cut = threshold.global_cut
        for prefix in ("image", "pixel"):
            getattr(self, f"_{prefix}_threshold").fill_(cut.threshold)
            getattr(self, f"{prefix}_min").fill_(cut.threshold - cut.span)
            getattr(self, f"{prefix}_max").fill_(cut.threshold + cut.span)
        self.threshold = threshold

    # The threshold follows rlr's rule (RLR.on_validation_epoch_end), not anomalib's F1-adaptive one.
    def on_validation_batch_end(self, *args, **kwargs) -> None:
        pass

    def on_validation_epoch_end(self, *args, **kwargs) -> None:
        pass

    def labels(self, predictions: InferenceBatch) -> InferenceBatch:
        """``predictions`` (raw scores and maps) with anomalib's labels and masks at this threshold; scores and maps
        stay raw (the metrics see what ``rlr test`` scores; the post-processing callback normalises them after)."""
        if self.threshold is None or not self.enable_thresholding:
            return predictions
        decided = self.forward(predictions)
        return predictions._replace(pred_label=decided.pred_label, pred_mask=decided.pred_mask)

    def checkpoint_config(self) -> dict:
        return dict(super().checkpoint_config(), rlr_threshold=self.threshold.to_dict() if self.threshold else None)

    def load_checkpoint_config(self, config: dict) -> None:
        super().load_checkpoint_config(config)
        if config.get("rlr_threshold"):
            self.set_threshold(thresholds.Threshold.from_dict(config["rlr_threshold"], "the checkpoint's threshold"))


# ---------------------------------------------------------------------------------------------- metrics per category

def categories_of_test(trainer) -> Optional[list]:
    """Names of the test dataloaders: the categories of a UnifiedDataModule, else the datamodule's category."""
    datamodule = getattr(trainer, "datamodule", None)
    names = getattr(datamodule, "test_categories", None)
    if names is not None:
        return list(names)
    if datamodule is not None:
        return [getattr(datamodule, "category", "") or getattr(datamodule, "name", "") or "default"]
    return None


class UnifiedEvaluator(Evaluator):
    """anomalib's Evaluator, per category: each test dataloader (a :class:`UnifiedDataModule` gives one per
    category) gets its own copy of every test metric. Logged: ``NAME/CATEGORY`` for each category when there are
    several, and ``NAME``, their mean (the figure of the unified setting: the mean over classes; with one category,
    its value). ``results`` holds the last test as rlr's metrics.json does: ``{"classes": {CATEGORY: {NAME: value}},
    "mean": {NAME: value}}`` (None where a metric had nothing to compute, e.g. pixel metrics without masks).
    """

    def __init__(self, val_metrics=None, test_metrics=None, compute_on_cpu: bool = True):
        super().__init__(val_metrics=val_metrics, test_metrics=test_metrics, compute_on_cpu=compute_on_cpu)
        self.per_category = nn.ModuleDict()
        self._names: list = []
        self.results: Optional[dict] = None

    def on_test_start(self, trainer, pl_module) -> None:
        self._names = categories_of_test(trainer) or []
        self.per_category = nn.ModuleDict()

    def _metrics(self, index: int) -> nn.ModuleList:
        name = self._names[index] if index < len(self._names) else f"dataloader_{index}"
        if name not in self.per_category:
            metrics = nn.ModuleList(copy.deepcopy(metric) for metric in self.test_metrics)
            for metric in metrics:
                metric.reset()
            if self.compute_on_cpu:
                self.metrics_to_cpu(metrics)
            self.per_category[name] = metrics
        return self.per_category[name]

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        for metric in self._metrics(dataloader_idx):
            metric.update(batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        per_class = {}
        for category, metrics in self.per_category.items():
            values = {}
            for metric in metrics:
                value = metric.compute()
                values[metric.name] = None if value is None else float(value)
                metric.reset()
            per_class[category] = values
        names = [metric.name for metric in self.test_metrics]
        mean = {}
        for name in names:
            present = [values[name] for values in per_class.values() if values.get(name) is not None]
            mean[name] = float(np.mean(present)) if present else None
        several = len(per_class) > 1
        for category, values in per_class.items():
            for name, value in values.items():
                if several and value is not None:
                    pl_module.log(f"{name}/{category}", value)
        for name, value in mean.items():
            if value is not None:
                pl_module.log(name, value)
        self.results = {"classes": per_class, "mean": mean}
