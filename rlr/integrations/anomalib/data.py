"""One training set from several anomalib datamodules (or categories), for one unified RLR model.

    UnifiedDataModule([MVTecAD(category="bottle"), MVTecAD(category="cable"), Folder(name="tiles", ...)])

anomalib trains one model per datamodule (one category); RLR's point is one model for many. This datamodule
joins its members' normal training images into one training set, holds out rlr's share of each category's
images (rlr's rule: the same images as ``rlr train``) as the validation set the threshold comes from, draws the
epochs with rlr's class balance, and tests each category on its own dataloader, so that the Evaluator reports
every category and their mean (:class:`~rlr.integrations.anomalib.components.UnifiedEvaluator`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from anomalib.data import AnomalibDataModule, ImageBatch
from anomalib.data.utils import ValSplitMode
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from ...data import ClassSplit, DatasetError, Sample
from ...distributed import class_balanced_order
from ...train import training_samples

logger = logging.getLogger(__name__)


class ClassBalancedSampler(Sampler):
    """rlr's epochs: each class drawn in proportion to (its image count) ** (1 - balance), as many draws as images
    (``rlr.distributed.class_balanced_order``; balance 0: a permutation). The generator is seeded as ``rlr train``
    seeds the stream of its epoch orders (seed + 1), so the same images in the same order give the same epochs."""

    def __init__(self, classes: torch.Tensor, balance: float, seed: int):
        self.classes, self.balance = classes, float(balance)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        if self.balance:
            order = class_balanced_order(self.classes, len(self.classes), self.generator, self.balance)
        else:
            order = torch.randperm(len(self.classes), generator=self.generator)
        return iter(order.tolist())


class ImagePaths(Dataset):
    """A training set's image paths, without decoding the images: with rlr's feature cache the model reads each
    image's tokens from the cache, so the loader need not decode (and resize) every image every epoch."""

    augmentations = None

    def __init__(self, dataset):
        self.samples = dataset.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> str:
        return str(self.samples.image_path.iloc[index])


@dataclass
class PathBatch:
    """A training batch of :class:`ImagePaths`: ``image_path`` only (``image`` None)."""

    image_path: list
    image: Optional[torch.Tensor] = None
    gt_mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.image_path)


def _collate_paths(paths: list) -> PathBatch:
    return PathBatch(list(paths))


def _collate_without_masks(items: list) -> ImageBatch:
    """Training needs no masks, and categories with masks (zeros for normal images) and without (None) would not
    batch together."""
    return ImageBatch.collate([item.update(in_place=False, gt_mask=None) for item in items])


def _category(datamodule) -> str:
    return getattr(datamodule, "category", "") or getattr(datamodule, "name", "")


class UnifiedDataModule(AnomalibDataModule):
    """Several anomalib datamodules as one unified training set with per-category validation and test.

    Args:
        datamodules: the members, one category each (``MVTecAD(category=...)``, ``Folder(name=...)``, ``Visa``, ...),
            with distinct category names (a Folder's category is its ``name``).
        holdout: share of each category's normal training images held out (rlr's rule: ``max(1, round(share * n))``
            of a category with n >= 5 images, those whose sha256(seed, category, file name) ranks lowest) to choose
            the threshold; None: the RLR model's recipe (fast: 0.1, paper: 0). The members' own validation splits
            are not used (a Folder's default would take half of its test images).
        class_balance: how epochs draw the categories (rlr's ``--class-balance``); None: the model's recipe.
        seed: the holdout's and the epochs' seed; None: the model's.
        train_batch_size: None: the model's recipe. ``eval_batch_size`` and ``num_workers`` apply to the joined
            training loader; validation and test use each member's own loaders.

    Without an RLR model (another anomalib model) the defaults are holdout 0, class balance 0, seed 0, batch 32.
    """

    def __init__(self, datamodules: Sequence[AnomalibDataModule], *, holdout: Optional[float] = None,
                 class_balance: Optional[float] = None, seed: Optional[int] = None,
                 train_batch_size: Optional[int] = None, eval_batch_size: int = 32, num_workers: int = 0):
        datamodules = list(datamodules)
        if not datamodules:
            raise ValueError("UnifiedDataModule needs at least one datamodule")
        for member in datamodules:
            if not isinstance(member, AnomalibDataModule):
                raise TypeError(f"UnifiedDataModule joins anomalib datamodules, got {type(member).__name__}")
        names = [_category(m) for m in datamodules]
        if any(not name for name in names):
            raise ValueError("every datamodule needs a category name (e.g. MVTecAD(category=...), Folder(name=...))")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"category names must be distinct; repeated: {repeated} (rename a Folder with name=...)")
        super().__init__(train_batch_size=train_batch_size or 32, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed)
        self.datamodules, self.categories = datamodules, names
        self.holdout, self.class_balance, self._batch_size = holdout, class_balance, train_batch_size
        self.held_out: dict = {}          # category -> held-out image paths
        self.val_categories: list = []    # category of each validation dataloader (those with held-out images)
        self.test_categories: list = []   # category of each test dataloader (those with test images)
        self._train_classes: Optional[torch.Tensor] = None
        self.holdout_share: Optional[float] = None   # the share held out, once set up

    @property
    def name(self) -> str:
        return "Unified"

    @property
    def category(self) -> str:
        joined = "+".join(self.categories)
        return joined if len(joined) <= 64 else f"{len(self.categories)}_categories"

    @category.setter
    def category(self, value: str) -> None:   # anomalib's base class assigns one; the members' names are the truth
        pass

    def _settings(self) -> tuple:
        """(holdout, class balance, seed, batch size): given, else the RLR model's, else anomalib-like defaults."""
        from .model import RLR

        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        config = model.config if isinstance(model, RLR) else None

        def pick(given, from_config, default):
            return given if given is not None else (from_config if config is not None else default)

        return (pick(self.holdout, config and config.holdout, 0.0),
                pick(self.class_balance, config and config.class_balance, 0.0),
                pick(self.seed, config and config.seed, 0),
                pick(self._batch_size, config and config.batch_size, 32))

    def prepare_data(self) -> None:   # e.g. MVTecAD downloads its data set here when it is missing
        for member in self.datamodules:
            member.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        if not self._is_setup:
            holdout, balance, seed, batch_size = self._settings()
            self.train_batch_size, self._balance, self._seed = batch_size, balance, seed
            self.holdout_share = holdout
            splits = {}
            for name, member in zip(self.categories, self.datamodules):
                member.trainer = getattr(self, "trainer", None)   # so the member resizes with the model's pre-processor
                if member.val_split_mode != ValSplitMode.NONE:
                    logger.info("%s: its validation split (%s) is replaced by rlr's holdout of its training images",
                                name, member.val_split_mode.value)
                    member.val_split_mode = ValSplitMode.NONE
                member.setup(stage)
                paths = [str(p) for p in member.train_data.samples.image_path]
                if not paths:
                    raise DatasetError(f"category {name} has no training images")
                splits[name] = ClassSplit(name, train=[Sample(p, name, 0, "good", None) for p in paths])
            _, held_out = training_samples(splits, holdout, seed)   # rlr's holdout rule, the images `rlr train` holds out
            self.held_out = {name: [s.path for s in samples] for name, samples in held_out.items()}
            classes = []
            for number, (name, member) in enumerate(zip(self.categories, self.datamodules)):
                paths = [str(p) for p in member.train_data.samples.image_path]
                chosen = set(self.held_out[name])
                kept = [i for i, p in enumerate(paths) if p not in chosen]
                held = [i for i, p in enumerate(paths) if p in chosen]
                if held:
                    member.val_data = member.train_data.subsample(held)
                member.train_data = member.train_data.subsample(kept)
                classes += [number] * len(kept)
            self._train_classes = torch.tensor(classes)
            self.train_data = ConcatDataset([member.train_data for member in self.datamodules])
            self.val_categories = [n for n, m in zip(self.categories, self.datamodules) if hasattr(m, "val_data")]
            self.test_categories = [n for n, m in zip(self.categories, self.datamodules)
                                    if hasattr(m, "test_data") and len(m.test_data)]
            self._is_setup = True
        for member in self.datamodules:
            member.trainer = getattr(self, "trainer", None)
            member._update_augmentations()

    def train_dataloader(self) -> DataLoader:
        from .model import RLR

        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        sampler = ClassBalancedSampler(self._train_classes, self._balance, self._seed)
        members = [member.train_data for member in self.datamodules]
        if isinstance(model, RLR) and model.cached_feature_paths(members)[0] is not None:
            return DataLoader(ConcatDataset([ImagePaths(d) for d in members]), batch_size=self.train_batch_size,
                              sampler=sampler, collate_fn=_collate_paths)
        return DataLoader(self.train_data, batch_size=self.train_batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=_collate_without_masks)

    def val_dataloader(self) -> list:
        return [m.val_dataloader() for n, m in zip(self.categories, self.datamodules) if n in self.val_categories]

    def test_dataloader(self) -> list:
        return [m.test_dataloader() for n, m in zip(self.categories, self.datamodules) if n in self.test_categories]

    def predict_dataloader(self) -> list:
        return self.test_dataloader()

    def _setup(self, _stage: Optional[str] = None) -> None:   # abstract in anomalib; setup() above does the work
        raise NotImplementedError


def describe_data(datamodule, train_images: int) -> dict:
    """A datamodule's training data in an rlr checkpoint's terms ("data": root, layout, classes, holdout): the root
    and layout when every category is a class folder of one MVTec-layout root (``rlr test --run RUN`` then finds
    it), else None (``rlr test --run RUN --data-root DIR``)."""
    from ...data import find_mvtec_classes

    members = datamodule.datamodules if isinstance(datamodule, UnifiedDataModule) else [datamodule]
    names = datamodule.categories if isinstance(datamodule, UnifiedDataModule) else [_category(datamodule) or "default"]
    roots = {str(getattr(m, "root", "") or "") for m in members}
    root = roots.pop() if len(roots) == 1 else ""
    is_mvtec = bool(root) and Path(root).is_dir() and all(n in find_mvtec_classes(Path(root)) for n in names)
    held_out = datamodule.held_out if isinstance(datamodule, UnifiedDataModule) else {}
    return {"root": root if is_mvtec else None, "layout": "mvtec" if is_mvtec else None, "classes": list(names),
            "train_images": int(train_images), "fingerprint": None,
            "holdout": {"share": getattr(datamodule, "holdout_share", None), "images": held_out}}
