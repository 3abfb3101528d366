"""The original code's formulation of RLR, and import of its checkpoints.

``OriginalRLR`` re-states the module of the public RLR code (hlr7999/RLR, models/model.py) with
the paper's defaults — blocks 'mca' + 'nsa', no gate, parallel blocks, dropout 0 — in its
formulation: ``nn.MultiheadAttention`` with dense (L, L) float masks and the reference repeated
for every sample. Parameter names follow the original, so its ``state_dict`` is that code's. It
serves to test checkpoint import and as the baseline in bench/.

``load_official_checkpoint`` turns a checkpoint of the original code
(``{'state_dict': [level state dicts], 'epoch': ...}``) into an ``RLRModel`` with the same
outputs.

Two details of the original are kept on purpose:
- the local ('mca') loop over reference copies rebinds the reference variable, so the masked
  ('nsa') block takes its keys from the LAST copy. For ref_len=1 this is the only copy; for
  ref_len>1 the import moves the last copy first (the sum over copies does not depend on their
  order), which makes ``RLRModel``'s r_1 the original's key copy.
- the mca output carries weight 2 and the nsa output weight 1 (``gate`` none).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from rlr_kernels.window import reach, window_mask

from .config import PAPER_BACKBONE, RLRConfig
from .model import RLRModel, sincos_position_table

CHECKPOINT_HINT = ("expected a checkpoint saved by the original RLR code: a dict with 'state_dict' = list of one "
                   "state dict per feature level (keys like 'encoder.encode_layers.0.mca.in_proj_weight')")


class CheckpointError(ValueError):
    """A file is not a usable checkpoint."""


# ----------------------------------------------------------------------------------------------
# The original formulation


def dense_window_mask(side: int, window: int, inside_allowed: bool) -> Tensor:
    """Float (L, L) additive mask of a side x side grid: 0 where attention is allowed, -inf elsewhere.

    ``inside_allowed=True`` lets each token see its window (the local block); False masks the
    window out (the masked block).
    """
    inside = window_mask(side, side, window)
    allowed = inside if inside_allowed else ~inside
    mask = torch.zeros(side * side, side * side)
    return mask.masked_fill(~allowed, float("-inf"))


def loop_window_mask(side: int, window: int, inside_allowed: bool, device=None) -> Tensor:
    """``dense_window_mask`` built the way the original code builds it on every layer call: a
    Python loop over the grid positions filling a (h, w, h, w) table, then a copy to the device."""
    half = reach(window)
    outside = torch.ones(side, side, side, side)
    for r in range(side):
        for c in range(side):
            outside[r, c, max(r - half, 0):min(r + half + 1, side), max(c - half, 0):min(c + half + 1, side)] = 0
    outside = outside.view(side * side, side * side)
    blocked = outside == 1 if inside_allowed else outside == 0
    return torch.zeros(side * side, side * side).masked_fill(blocked, float("-inf")).to(device)


class _ProjectEmbedding(nn.Module):
    def __init__(self, in_channels: int, d_model: int):
        super().__init__()
        self.project = nn.Conv1d(in_channels, d_model, kernel_size=1)
        nn.init.kaiming_normal_(self.project.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:   # (N, L, C) -> (N, L, D)
        return self.project(x.transpose(1, 2)).transpose(1, 2)


class _Embedding2D(nn.Module):
    def __init__(self, in_channels: int, d_model: int, side: int, ref_len: int = 1):
        super().__init__()
        self.project_embedding = _ProjectEmbedding(in_channels, d_model)
        self.ref_len = ref_len
        self.position = sincos_position_table(d_model, side, side)   # a plain attribute: not in the state dict

    def forward(self, x: Tensor) -> Tensor:
        pos = self.position.to(x.device, x.dtype).repeat(self.ref_len, 1)
        return self.project_embedding(x) + pos.unsqueeze(0).expand(x.shape[0], -1, -1)


class _Mlp(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _OriginalEncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn_ratio: int, side: int, window: int, rebuild_masks: bool):
        super().__init__()
        self.side, self.window, self.rebuild_masks = side, window, rebuild_masks
        self.mca = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.nsa = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = _Mlp(d_model, ffn_ratio * d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.seq_len = side * side
        self.register_buffer("local_mask", dense_window_mask(side, window, True), persistent=False)
        self.register_buffer("masked_mask", dense_window_mask(side, window, False), persistent=False)

    def forward(self, x: Tensor, reference: Tensor) -> Tensor:
        """x (N, L, D); reference (N, R*L, D), already repeated per sample."""
        local_mask, masked_mask = self.local_mask, self.masked_mask
        if self.rebuild_masks:   # the original's cost: masks rebuilt on every call
            local_mask = loop_window_mask(self.side, self.window, True, x.device)
        local = torch.zeros_like(x)
        for copy in reference.split(self.seq_len, dim=1):
            local = local + self.mca(x, copy, copy, attn_mask=local_mask, need_weights=False)[0]
        if self.rebuild_masks:
            masked_mask = loop_window_mask(self.side, self.window, False, x.device)
        # As in the original: the masked block reads the copy the loop above ended on (the last).
        masked = self.nsa(x, copy, x, attn_mask=masked_mask, need_weights=False)[0]
        x = self.norm1(2 * local + masked)
        return self.norm2(x + self.ffn(x))


class _OriginalEncoder(nn.Module):
    def __init__(self, layers: Sequence[nn.Module], d_model: int):
        super().__init__()
        self.encode_layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, reference: Tensor) -> Tensor:
        for layer in self.encode_layers:
            x = layer(x, reference)
        return self.norm(x)


class OriginalRLR(nn.Module):
    """One level of the original RLR module: tokens (N, L, C) -> reconstruction (N, L, C).

    The parameter names are the original code's, so ``state_dict()`` is a level state dict of
    its checkpoints. The dense masks are built once and kept as buffers; ``rebuild_masks=True``
    rebuilds them in every layer call with a Python loop, as the original code does (its cost).
    """

    def __init__(self, seq_len: int, in_channels: int, d_model: int, heads: int = 8, layers: int = 4,
                 ffn_ratio: int = 4, ref_len: int = 1, window: Optional[int] = None, rebuild_masks: bool = False):
        super().__init__()
        side = math.isqrt(seq_len)
        if side * side != seq_len:
            raise ValueError(f"the original code works on square grids; seq_len {seq_len} is not a square")
        window = window if window is not None else {16: 5, 32: 7, 64: 11}[side]
        self.seq_len, self.ref_len = seq_len, ref_len
        self.embedding = _Embedding2D(in_channels, d_model, side)
        self.ref_mca = nn.Parameter(torch.randn(1, seq_len * ref_len, in_channels))
        self.ref_mca_embedding = _Embedding2D(in_channels, d_model, side, ref_len=ref_len)
        self.encoder = _OriginalEncoder(
            [_OriginalEncoderLayer(d_model, heads, ffn_ratio, side, window, rebuild_masks) for _ in range(layers)],
            d_model)
        self.projection = nn.Linear(d_model, in_channels)

    def forward(self, x: Tensor) -> Tensor:
        reference = self.ref_mca_embedding(self.ref_mca.repeat(x.shape[0], 1, 1))   # per sample, as the original
        return self.projection(self.encoder(self.embedding(x), reference))


# ----------------------------------------------------------------------------------------------
# Checkpoint import

_LAYER_KEY = re.compile(r"^encoder\.encode_layers\.(\d+)\.")
_SUPPORTED_LAYER_PARTS = {
    "mca.in_proj_weight", "mca.in_proj_bias", "mca.out_proj.weight", "mca.out_proj.bias",
    "nsa.in_proj_weight", "nsa.in_proj_bias", "nsa.out_proj.weight", "nsa.out_proj.bias",
    "norm1.weight", "norm1.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias",
    "norm2.weight", "norm2.bias",
}
_TOP_KEYS = {
    "embedding.project_embedding.project.weight", "embedding.project_embedding.project.bias",
    "ref_mca", "ref_mca_embedding.project_embedding.project.weight",
    "ref_mca_embedding.project_embedding.project.bias",
    "encoder.norm.weight", "encoder.norm.bias", "projection.weight", "projection.bias",
}


def _read_checkpoint(path: Path, trusted: bool):
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    # The original also pickles its AUROC values (numpy scalars): allow exactly those types.
    numpy_scalar_types = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32))]
    try:
        numpy_scalar_types.append(np._core.multiarray.scalar)
    except AttributeError:
        numpy_scalar_types.append(np.core.multiarray.scalar)
    try:
        with torch.serialization.safe_globals(numpy_scalar_types):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means: not a checkpoint we can read safely
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint with safe loading ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). {CHECKPOINT_HINT}. If you trust the file, retry "
            f"with trusted=True (CLI: --trust-checkpoint)"
        ) from None


def _check_level(index: int, state: dict, path) -> int:
    """Validate one level's keys; return its number of encoder layers."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict[{index}] is not a state dict of tensors. {CHECKPOINT_HINT}")
    layer_ids = set()
    for key in state:
        match = _LAYER_KEY.match(key)
        if match:
            layer_ids.add(int(match.group(1)))
            part = key[match.end():]
            if part not in _SUPPORTED_LAYER_PARTS:
                raise CheckpointError(
                    f"{path}: level {index} has key {key!r}: only the paper's configuration is supported "
                    f"(blocks mca + nsa, gate none, parallel blocks)")
        elif key not in _TOP_KEYS:
            raise CheckpointError(
                f"{path}: level {index} has unexpected key {key!r} (gated or non-default blocks are not supported). "
                f"{CHECKPOINT_HINT}")
    missing = sorted(k for k in _TOP_KEYS if k not in state)
    if missing:
        raise CheckpointError(f"{path}: level {index} lacks {missing}. {CHECKPOINT_HINT}")
    layers = len(layer_ids)
    if layers == 0 or layer_ids != set(range(layers)):
        raise CheckpointError(f"{path}: level {index} has encoder layers {sorted(layer_ids)}, expected 0..n-1")
    for i in range(layers):
        absent = sorted(p for p in _SUPPORTED_LAYER_PARTS if f"encoder.encode_layers.{i}.{p}" not in state)
        if absent:
            raise CheckpointError(f"{path}: level {index} layer {i} lacks {absent}")
    return layers


def original_to_rlr_state(state: dict, ref_len: int) -> dict:
    """Map one level's original state dict to ``RLRLevel`` parameter names."""
    out = {
        "embedding.proj.weight": state["embedding.project_embedding.project.weight"].squeeze(-1),
        "embedding.proj.bias": state["embedding.project_embedding.project.bias"],
        "reference_embedding.proj.weight": state["ref_mca_embedding.project_embedding.project.weight"].squeeze(-1),
        "reference_embedding.proj.bias": state["ref_mca_embedding.project_embedding.project.bias"],
        "norm.weight": state["encoder.norm.weight"],
        "norm.bias": state["encoder.norm.bias"],
        "projection.weight": state["projection.weight"],
        "projection.bias": state["projection.bias"],
    }
    reference = state["ref_mca"][0]                                   # (R*L, C)
    copies = list(reference.chunk(ref_len, dim=0))
    out["reference"] = torch.cat([copies[-1]] + copies[:-1], dim=0)    # the original's key copy first
    layer = 0
    while f"encoder.encode_layers.{layer}.norm1.weight" in state:
        src = f"encoder.encode_layers.{layer}."
        dst = f"layers.{layer}."
        mca_w, mca_b = state[src + "mca.in_proj_weight"], state[src + "mca.in_proj_bias"]
        nsa_w, nsa_b = state[src + "nsa.in_proj_weight"], state[src + "nsa.in_proj_bias"]
        d = mca_w.shape[1]
        q, k, v = slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)
        out[dst + "input_proj.weight"] = torch.cat([mca_w[q], nsa_w[q], nsa_w[v]])
        out[dst + "input_proj.bias"] = torch.cat([mca_b[q], nsa_b[q], nsa_b[v]])
        out[dst + "reference_proj.weight"] = torch.cat([mca_w[k], mca_w[v], nsa_w[k]])
        out[dst + "reference_proj.bias"] = torch.cat([mca_b[k], mca_b[v], nsa_b[k]])
        for name_from, name_to in (("mca.out_proj", "local_out"), ("nsa.out_proj", "masked_out"),
                                   ("norm1", "norm1"), ("ffn.fc1", "ffn.fc1"), ("ffn.fc2", "ffn.fc2"),
                                   ("norm2", "norm2")):
            out[dst + name_to + ".weight"] = state[src + name_from + ".weight"]
            out[dst + name_to + ".bias"] = state[src + name_from + ".bias"]
        layer += 1
    return out


def load_official_checkpoint(path, input_size: int = 256, out_indices: Sequence[int] = (2, 3), heads: int = 8,
                             ref_len: int = 1, *, backbone: str = PAPER_BACKBONE, avg_pool: bool = True,
                             trusted: bool = False, **config_overrides) -> RLRModel:
    """Load a checkpoint of the original RLR code into an ``RLRModel`` with the same outputs.

    Channels, widths, layer count and FFN ratio are read from the tensors; the settings the
    tensors do not fix (input size, out indices, heads, ref_len, backbone, avg pool) must match
    the run that wrote the checkpoint. The returned model's ``config`` records them.
    ``trusted=True`` loads arbitrary pickles (only for files you trust).
    """
    path = Path(path)
    checkpoint = _read_checkpoint(path, trusted)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not an original RLR checkpoint: no 'state_dict' entry. {CHECKPOINT_HINT}")
    states = checkpoint["state_dict"]
    if not isinstance(states, (list, tuple)):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(states).__name__}, not a list of per-level state "
                              f"dicts. {CHECKPOINT_HINT}")
    return model_from_original_states(states, input_size, out_indices, heads, ref_len, backbone=backbone,
                                      avg_pool=avg_pool, source=str(path), **config_overrides)


def model_from_original_states(states: Sequence[dict], input_size: int = 256, out_indices: Sequence[int] = (2, 3),
                               heads: int = 8, ref_len: int = 1, *, backbone: str = PAPER_BACKBONE,
                               avg_pool: bool = True, source: str = "state dicts", **config_overrides) -> RLRModel:
    """``RLRModel`` from per-level state dicts of the original module (e.g. ``[l.state_dict() for l in
    levels]`` of ``OriginalRLR`` levels); the settings as in ``load_official_checkpoint``."""
    out_indices = tuple(out_indices)
    if len(states) != len(out_indices):
        raise CheckpointError(f"{source} holds {len(states)} levels but out_indices={out_indices} asks for "
                              f"{len(out_indices)}: pass the out indices the checkpoint was trained with")
    channels, grids, d_models, layer_counts, ffn_ratios = [], [], [], [], []
    for index, (state, out_index) in enumerate(zip(states, out_indices)):
        layer_counts.append(_check_level(index, state, source))
        c, d = state["projection.weight"].shape
        tokens = state["ref_mca"].shape[1]
        if tokens % ref_len:
            raise CheckpointError(f"{source}: level {index} reference has {tokens} tokens, not a multiple of "
                                  f"ref_len={ref_len}")
        side = math.isqrt(tokens // ref_len)
        expected = input_size // 2 ** (out_index + 1)
        if side * side * ref_len != tokens or side != expected:
            raise CheckpointError(
                f"{source}: level {index} reference has {tokens} tokens; input_size={input_size}, out index "
                f"{out_index} and ref_len={ref_len} give {expected}x{expected}x{ref_len} = "
                f"{expected * expected * ref_len}: pass the settings the checkpoint was trained with")
        channels.append(c)
        grids.append((side, side))
        d_models.append(d)
        ffn_ratios.append(state["encoder.encode_layers.0.ffn.fc1.weight"].shape[0] // d)
    if len(set(layer_counts)) != 1 or len(set(ffn_ratios)) != 1:
        raise CheckpointError(f"{source}: levels differ in layer count {layer_counts} or FFN ratio {ffn_ratios}")
    for d in d_models:
        if d % heads:
            raise CheckpointError(f"{source}: d_model {d} is not divisible by heads={heads}")
    config = RLRConfig(backbone=backbone, input_size=input_size, out_indices=out_indices, avg_pool=avg_pool,
                       heads=heads, layers=layer_counts[0], ffn_ratio=ffn_ratios[0], ref_len=ref_len,
                       d_models=tuple(d_models), **config_overrides)
    model = RLRModel(config, channels, grids)
    for level, state in zip(model.levels, states):
        level.load_state_dict(original_to_rlr_state(state, ref_len))
    return model


def save_original_checkpoint(path, levels: Sequence[OriginalRLR], epoch: int = 0) -> None:
    """Write ``levels`` in the original code's checkpoint format (used by tests and bench)."""
    torch.save({"state_dict": [level.state_dict() for level in levels], "epoch": epoch,
                "best_img_auc": 0.0, "best_pix_auc": 0.0, "best_img_aucs": [], "best_pix_aucs": []}, path)


def import_official_run(checkpoint, out, *, input_size: int = 256, out_indices: Sequence[int] = (2, 3),
                        heads: int = 8, ref_len: int = 1, backbone: str = PAPER_BACKBONE,
                        backbone_weights: Optional[str] = None, avg_pool: bool = True, trusted: bool = False,
                        **config_overrides) -> Path:
    """Write a checkpoint of the original code as an rlr run folder (for `rlr test` / `rlr predict`)."""
    from .run import CHECKPOINT_FILE, RunError, level_shapes, save_checkpoint

    out = Path(out)
    if (out / CHECKPOINT_FILE).exists():
        raise RunError(f"{out} already holds a run; choose another --out")
    model = load_official_checkpoint(checkpoint, input_size, out_indices, heads, ref_len, backbone=backbone,
                                     avg_pool=avg_pool, trusted=trusted, backbone_weights=backbone_weights,
                                     **config_overrides)
    model.config.save(out)
    save_checkpoint(out / CHECKPOINT_FILE, {
        "model": model.state_dict(), "levels": level_shapes(model), "epoch": None, "history": [],
        "data": {}, "backbone_weights_sha256": None, "imported_from": str(Path(checkpoint).resolve()),
    }, model.config)
    return out
