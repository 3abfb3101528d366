"""The RLR reconstruction transformer (DESIGN.md §2), one per backbone feature level.

Shapes: B batch, L = h*w tokens (row-major), C backbone channels, D model width, H heads,
d = D / H, R reference copies.

Each level reconstructs its tokens from a learnable reference ``Ref`` (R*L, C)::

    x  = E(f)                      r = E_ref(Ref)   (computed once per forward, not per sample)
    a  = sum_c MHA_local(x, r_c, r_c)      local reference attention, window W(i)
    b  = MHA_masked(x, r_1, x)             keys from the reference, values from the input, W(i) masked out
    x' = LN1(2a + b)                       no residual from x: the input cannot be copied through
    x  = LN2(x' + FFN(x'))                 (x 4 layers), then LN and Linear_{D->C}

The attention itself runs in rlr_kernels; the in-projections are fused: one matmul of x gives
the local queries, masked queries and masked values, one matmul of r gives the local keys and
values and the masked keys.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rlr_kernels
from rlr_kernels.validate import check_masked_args

from .config import RLRConfig


def sincos_position_table(d_model: int, height: int, width: int) -> Tensor:
    """The 2-D sine-cosine table P (h*w, D), row-major tokens.

    Channels [0, D/2) encode the column and [D/2, D) the row; within each half channel 2k is
    sin(pos * w_k) and 2k+1 is cos(pos * w_k), w_k = exp(-2k ln(1e4) / (D/2)), k < D/4.
    """
    if d_model % 4:
        raise ValueError(f"d_model must be divisible by 4 for the 2-D sine-cosine table, got {d_model}")
    half = d_model // 2
    omega = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(1e4) / half))  # (D/4,)
    rows = torch.arange(height, dtype=torch.float64)[:, None] * omega   # (h, D/4)
    cols = torch.arange(width, dtype=torch.float64)[:, None] * omega    # (w, D/4)
    table = torch.zeros(height, width, d_model, dtype=torch.float64)
    table[:, :, 0:half:2] = torch.sin(cols)[None, :, :]
    table[:, :, 1:half:2] = torch.cos(cols)[None, :, :]
    table[:, :, half::2] = torch.sin(rows)[:, None, :]
    table[:, :, half + 1::2] = torch.cos(rows)[:, None, :]
    return table.reshape(height * width, d_model).float()


class TokenEmbedding(nn.Module):
    """E(t) = Linear_{C->D}(t) + P, for ``copies`` stacked grids of tokens (P repeated)."""

    def __init__(self, in_channels: int, d_model: int, grid: tuple, copies: int = 1):
        super().__init__()
        self.proj = nn.Linear(in_channels, d_model)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_in", nonlinearity="leaky_relu")
        table = sincos_position_table(d_model, *grid).repeat(copies, 1)
        self.register_buffer("position", table, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:   # (..., copies*L, C) -> (..., copies*L, D)
        return self.proj(tokens) + self.position


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.activation = nn.GELU()   # exact (erf) GELU; no parameters
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class ReferenceEncoderLayer(nn.Module):
    """One encoder layer: local reference attention + masked learnable-key attention, then FFN.

    ``input_proj`` rows are [W_q local; W_q masked; W_v masked] (all read x);
    ``reference_proj`` rows are [W_k local; W_v local; W_k masked] (all read the reference).
    """

    def __init__(self, d_model: int, heads: int, ffn_ratio: int, grid: tuple, window: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.d_model, self.heads, self.grid, self.window = d_model, heads, tuple(grid), window
        self.input_proj = nn.Linear(d_model, 3 * d_model)
        self.reference_proj = nn.Linear(d_model, 3 * d_model)
        self.local_out = nn.Linear(d_model, d_model)
        self.masked_out = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_ratio * d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self._init_like_multihead_attention()

    def _init_like_multihead_attention(self):
        # nn.MultiheadAttention's init: xavier-uniform on each (3D, D) in-projection, zero biases.
        for proj in (self.input_proj, self.reference_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        for out in (self.local_out, self.masked_out):
            nn.init.zeros_(out.bias)

    def _heads(self, t: Tensor) -> Tensor:
        """(N, L, 3D) -> (3, N, H, L, d)."""
        n, length, _ = t.shape
        return t.view(n, length, 3, self.heads, self.d_model // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x: Tensor, reference: Tensor, backend: Optional[str] = None, attention=None) -> Tensor:
        """x (B, L, D), reference (R, L, D) -> (B, L, D).

        ``attention``: None (rlr_kernels, ``backend``), or an object with ``local(q, k, v)`` and
        ``masked(q, k, v)`` computing the same two ops (rlr.export's standard-operator form).
        """
        batch, length, _ = x.shape
        copies = reference.shape[0]
        q_local, q_masked, v_masked = self._heads(self.input_proj(x))            # (B, H, L, d) each
        k_local, v_local, k_masked = self._heads(self.reference_proj(reference))  # (R, H, L, d) each
        if attention is None:
            local = rlr_kernels.local_reference_attention(
                q_local, k_local, v_local, grid=self.grid, window=self.window, backend=backend)
            masked = rlr_kernels.masked_key_attention(
                q_masked, k_masked[0], v_masked, grid=self.grid, window=self.window, backend=backend)
        else:
            local = attention.local(q_local, k_local, v_local)
            masked = attention.masked(q_masked, k_masked[0], v_masked)
        local = local.transpose(1, 2).reshape(batch, length, self.d_model)
        masked = masked.transpose(1, 2).reshape(batch, length, self.d_model)
        # The sum over copies of full MHA outputs carries the out-projection bias once per copy.
        a = F.linear(local, self.local_out.weight) + copies * self.local_out.bias
        b = self.masked_out(masked)
        x = self.norm1(2 * a + b)
        return self.norm2(x + self.ffn(x))


def _check_window(grid: tuple, window: int, head_dim: int, heads: int) -> None:
    """Reject a grid/window pair the kernels would refuse, when the model is built (not at step 1)."""
    q = torch.empty(1, heads, grid[0] * grid[1], head_dim, device="meta")
    try:
        check_masked_args(q, q[0], q, grid, window)
    except (ValueError, TypeError) as err:
        raise ValueError(f"level with a {grid[0]}x{grid[1]} token grid: {err}") from None


class RLRLevel(nn.Module):
    """The RLR transformer of one feature level: tokens (B, L, C) -> reconstruction (B, L, C)."""

    def __init__(self, in_channels: int, grid: tuple, d_model: int, heads: int = 8, layers: int = 4,
                 ffn_ratio: int = 4, ref_len: int = 1, window: int = 5, backend: Optional[str] = None):
        super().__init__()
        self.in_channels, self.grid, self.ref_len, self.backend = in_channels, tuple(grid), ref_len, backend
        self.tokens = grid[0] * grid[1]
        _check_window(self.grid, window, d_model // heads, heads)
        self.embedding = TokenEmbedding(in_channels, d_model, grid)
        self.reference = nn.Parameter(torch.randn(ref_len * self.tokens, in_channels))
        self.reference_embedding = TokenEmbedding(in_channels, d_model, grid, copies=ref_len)
        self.layers = nn.ModuleList(
            ReferenceEncoderLayer(d_model, heads, ffn_ratio, grid, window) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.projection = nn.Linear(d_model, in_channels)

    def forward(self, tokens: Tensor, attention=None) -> Tensor:
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.tokens, self.in_channels):
            raise ValueError(f"tokens must have shape (B, {self.tokens}, {self.in_channels}) for a "
                             f"{self.grid[0]}x{self.grid[1]} grid of {self.in_channels} channels, "
                             f"got {tuple(tokens.shape)}")
        x = self.embedding(tokens)
        # The reference does not depend on the input: embed it once for the whole batch.
        reference = self.reference_embedding(self.reference).view(self.ref_len, self.tokens, -1)
        for layer in self.layers:
            x = layer(x, reference, self.backend, attention)
        return self.projection(self.norm(x))


class RLRModel(nn.Module):
    """One RLR transformer per backbone feature level.

    Args:
        config: the run's settings (widths, heads, layers, windows, ref_len, backend).
        channels: backbone channels C of each level, in ``config.out_indices`` order.
        grids: token grid (h, w) of each level; default ``input_size // 2**(i+1)`` square grids
            (the stride of timm's out index i for EfficientNets and ResNets).

    ``forward(features)`` takes one (B, L_i, C_i) token tensor per level and returns the
    reconstructions in the same shapes; ``levels[i]`` is level i's module.
    """

    def __init__(self, config: RLRConfig, channels: Sequence[int], grids: Optional[Sequence[tuple]] = None):
        super().__init__()
        if len(channels) != len(config.out_indices):
            raise ValueError(f"channels {list(channels)} needs one entry per out index {config.out_indices}")
        if grids is None:
            grids = [(config.input_size // 2 ** (i + 1),) * 2 for i in config.out_indices]
        if len(grids) != len(channels):
            raise ValueError(f"grids {list(grids)} needs one entry per level ({len(channels)})")
        self.config = config
        self.channels = [int(c) for c in channels]
        self.grids = [tuple(int(s) for s in g) for g in grids]
        self.levels = nn.ModuleList(
            RLRLevel(c, g, d, heads=config.heads, layers=config.layers, ffn_ratio=config.ffn_ratio,
                     ref_len=config.ref_len, window=config.window_for(g), backend=config.backend)
            for c, g, d in zip(self.channels, self.grids, config.level_d_models())
        )

    def set_backend(self, backend: Optional[str]) -> None:
        """Attention backend of every level (None = fastest available for the device)."""
        for level in self.levels:
            level.backend = backend

    def forward(self, features: Sequence[Tensor]) -> list:
        if len(features) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature levels, got {len(features)}")
        return [level(f) for level, f in zip(self.levels, features)]


# ---------------------------------------------------------------------------------------------- inference copy

@functools.lru_cache(maxsize=None)
def onednn_linear_takes(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN build runs ``mkldnn._linear_pointwise`` in ``dtype`` (asked once per dtype)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        with torch.no_grad():
            torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 4, dtype=dtype), torch.zeros(4, 4, dtype=dtype), None,
                                               "none", [], "")
    except RuntimeError:
        return False
    return True


class FusedLinear(nn.Module):
    """An inference ``nn.Linear``, and the GELU after it if any, as one oneDNN call on a CPU
    (``mkldnn._linear_pointwise``, what torch.compile's CPU backend emits for the pattern): the activation
    is applied as the product is written, and oneDNN's GEMM beats ``addmm`` on the levels' token matrices
    (8192 x 64 -> 256: 1.2 against 1.5 ms with the GELU, one of two threads). Elsewhere F.linear then
    the activation."""

    def __init__(self, linear: nn.Linear, activation: str = "none"):
        super().__init__()
        if activation not in ("none", "gelu"):
            raise ValueError(f"activation must be 'none' or 'gelu', got {activation!r}")
        self.weight, self.bias, self.activation = linear.weight, linear.bias, activation
        self.onednn = self.weight.device.type == "cpu" and onednn_linear_takes(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, activation={self.activation}, onednn={self.onednn}"

    def forward(self, x: Tensor) -> Tensor:
        if self.onednn and x.device.type == "cpu":
            algorithm = "none" if self.activation == "gelu" else ""   # oneDNN's GELU variant: "none" = erf
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if self.activation == "gelu" else y


def inference_copy(model: RLRModel, device, dtype: torch.dtype = torch.float32) -> RLRModel:
    """A frozen copy of ``model`` for inference on ``device`` in ``dtype``: weights in that type (no autocast
    casts on every call) and every Linear a :class:`FusedLinear`, each FFN's GELU fused into its first.
    Scores equal the model's to float32 rounding (tests/test_model.py). A dtype the CPU's oneDNN lacks
    runs F.linear instead (:func:`onednn_linear_takes`). The model itself is untouched (it trains, it is
    saved and exported)."""
    fast = copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)

    def replace(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, FeedForward):
                child.fc1, child.activation, child.fc2 = FusedLinear(child.fc1, "gelu"), nn.Identity(), \
                    FusedLinear(child.fc2)
            elif isinstance(child, nn.Linear):
                setattr(parent, name, FusedLinear(child))
            else:
                replace(child)

    replace(fast)
    return fast
