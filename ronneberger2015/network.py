"""The U-Net of the paper's Fig. 1 (Sec. 2): unpadded convolutions, crop and concatenate.

Contracting path: per level two 3x3 unpadded convolutions, each followed by a
ReLU, then 2x2 max pooling with stride 2 that halves the size; the channels
double at each down step (64, 128, 256, 512, 1024). Expansive path: a learned
2x2 up-convolution with stride 2 that halves the channels, concatenation with
the centre-cropped feature map of the same level, and two 3x3 convolutions with
ReLU. A 1x1 convolution maps the 64 features to the classes. 18 + 4 + 1 = 23
convolution layers.

Sizes: every convolution loses 2 px, so only some tile sizes make every 2x2
pooling see an even size ("select the input tile size such that all 2x2
max-pooling operations are applied to a layer with an even x- and y-size").
At depth 4 the valid sides are 16k + 60 (k >= 8), with output = input - 184:
572 -> 388 (Fig. 1), 700 -> 516 (a whole 512x512 ISBI slice).
"""
from __future__ import annotations

import numbers
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "output_size", "input_size", "VARIANTS"]

VARIANTS = ("paper", "release")


def _trace(size: int, depth: int) -> int | None:
    """Output side for an input side, or None where a layer would be empty or a pooling odd."""
    for _ in range(depth):
        size -= 4
        if size < 2 or size % 2:
            return None
        size //= 2
    size -= 4
    for _ in range(depth):
        size = 2 * size - 4
        if size < 1:
            return None
    return size if size >= 1 else None


def _neighbours(size: int, depth: int) -> str:
    """Describe the valid input sides nearest to ``size``, with their outputs."""
    step = 2**depth
    below = next((n for n in range(size - 1, max(size - step, 0), -1) if _trace(n, depth)), None)
    above = next(n for n in range(size + 1, 10**9) if _trace(n, depth))
    pairs = [f"{n} (-> {_trace(n, depth)})" for n in (below, above) if n is not None]
    return " and ".join(pairs)


def output_size(input_size: int | Sequence[int], depth: int = 4):
    """Output side(s) of the unpadded U-Net for an input side (or an (H, W) pair).

    Raises ``ValueError`` naming the nearest valid sizes when a side is not a
    valid tile size (a pooling would see an odd size, or a layer would be empty).
    """
    if not isinstance(input_size, numbers.Integral):
        return tuple(output_size(side, depth) for side in input_size)
    size = int(input_size)
    result = _trace(size, depth) if size > 0 else None
    if result is None:
        raise ValueError(
            f"input size {size} is not a valid tile side for a depth-{depth} U-Net "
            f"(every 2x2 max-pooling must see an even size, Sec. 2); "
            f"the nearest valid sizes are {_neighbours(max(size, 1), depth)}"
        )
    return result


def input_size(min_output_size: int, depth: int = 4) -> int:
    """Smallest valid input side whose output side is at least ``min_output_size``."""
    if min_output_size < 1:
        raise ValueError(f"min_output_size must be >= 1, got {min_output_size}")
    size = min_output_size + 1
    while (out := _trace(size, depth)) is None or out < min_output_size:
        size += 1
    return size


def _center_crop(skip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centred (height, width) window of ``skip`` (the "cropped feature map", Sec. 2)."""
    top = (skip.shape[-2] - height) // 2
    left = (skip.shape[-1] - width) // 2
    return skip[..., top : top + height, left : left + width]


class _DoubleConv(nn.Sequential):
    """Two 3x3 unpadded convolutions, each followed by a ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3),
            nn.ReLU(inplace=True),
        )


def current_name(key: str) -> str:
    """A parameter's name now for its name in a checkpoint of version 0.1, where the expansive path's
    layers were ``upconv.i.*`` and ``up.i.k.*`` (now ``up.i.upconv.*`` and ``up.i.convs.k.*``)."""
    if match := re.fullmatch(r"upconv\.(\d+)\.(.+)", key):
        return f"up.{match[1]}.upconv.{match[2]}"
    if match := re.fullmatch(r"up\.(\d+)\.(\d+\..+)", key):
        return f"up.{match[1]}.convs.{match[2]}"
    return key


def _earlier_names(state_dict: dict, prefix: str, *args) -> None:
    """Load hook: rename the keys of checkpoints written by version 0.1 (``current_name``)."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        name = current_name(key[len(prefix):])
        if name != key[len(prefix):]:
            state_dict[prefix + name] = state_dict.pop(key)


class _UpBlock(nn.Module):
    """One step of the expansive path (Sec. 2): "an upsampling of the feature map followed by a 2x2
    convolution ('up-convolution') that halves the number of feature channels, a concatenation with the
    correspondingly cropped feature map from the contracting path, and two 3x3 convolutions, each followed
    by a ReLU". ``relu_after_upconv``: the authors' release also rectifies the up-convolution's output."""

    def __init__(self, in_channels: int, up_channels: int, skip_channels: int, out_channels: int,
                 relu_after_upconv: bool = False):
        super().__init__()
        self.upconv = nn.ConvTranspose2d(in_channels, up_channels, 2, stride=2)
        self.relu_after_upconv = relu_after_upconv
        self.convs = _DoubleConv(up_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upconv(x)
        if self.relu_after_upconv:
            x = F.relu(x)
        return self.convs(torch.cat([x, _center_crop(skip, x.shape[-2], x.shape[-1])], dim=1))


class UNet(nn.Module):
    """The unpadded U-Net of Ronneberger et al. (2015), Fig. 1.

    Parameters
    ----------
    in_channels : int
        input channels (1 for the EM images).
    num_classes : int
        output classes K of the 1x1 head (2: membrane, cell).
    base_channels : int
        channels of the first level (64 in the paper); they
        double at each of the ``depth`` down steps (1024 at the bottom).
    depth : int
        number of 2x2 max-poolings (4 in the paper).
    dropout : float
        drop-out probability "at the end of the contracting path"
        (Sec. 3.1). As in the authors' release (``dropout_d3c``,
        ``dropout_d4c``, in place, training only), it acts on the outputs
        of the two deepest levels, so the skip connection of the
        second-deepest level (512 channels) is dropped out as well.
    variant : str
        ``"paper"`` (Fig. 1) or ``"release"`` (the authors' phseg_v5
        network: a ReLU after every up-convolution, and the last
        up-convolution keeps 2 * base_channels = 128 channels).

    Weights are drawn from N(0, sqrt(2/N)), N the fan-in of one output unit
    (Sec. 3: "for a 3x3 convolution and 64 feature channels in the previous
    layer N = 9 * 64 = 576"); for an up-convolution N = 4 * C_out, as Caffe
    counts it for a deconvolution blob. Biases start at 0.

    The input's spatial sides must be valid tile sizes (see ``output_size``);
    the output is smaller by ``2 * border`` (184 px at depth 4).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        dropout: float = 0.5,
        variant: str = "paper",
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if depth < 1 or base_channels < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError("depth, base_channels, in_channels and num_classes must all be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.base_channels, self.depth, self.variant = base_channels, depth, variant
        channels = [base_channels * 2**level for level in range(depth + 1)]

        self.down = nn.ModuleList(
            _DoubleConv(c_in, c_out) for c_in, c_out in zip([in_channels] + channels[:-1], channels)
        )
        self.dropout = nn.Dropout(dropout)
        release = variant == "release"
        self.up = nn.ModuleList(
            _UpBlock(channels[level + 1], 2 * channels[0] if release and level == 0 else channels[level],
                     channels[level], channels[level], relu_after_upconv=release)
            for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(channels[0], num_classes, 1)
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(_earlier_names)

    def reset_parameters(self) -> None:
        """He initialisation: weights ~ N(0, sqrt(2 / fan_in)), biases 0 (Sec. 3).

        Drawn contracting path first, then the up-convolutions, the expansive
        path's convolutions and the head: the order of version 0.1, so that a
        seed still gives the same network.
        """
        order = (self.down, *(block.upconv for block in self.up), *(block.convs for block in self.up), self.head)
        for module in (module for part in order for module in part.modules()):
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                # torch's fan_in of a ConvTranspose2d weight (C_in, C_out, k, k) is C_out * k * k.
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    @property
    def border(self) -> int:
        """Pixels lost on each side between input and output (92 at depth 4)."""
        size = input_size(1, self.depth)
        return (size - output_size(size, self.depth)) // 2

    def output_size(self, input_size: int | Sequence[int]):
        """Output side(s) for an input side (or (H, W)); see the module function."""
        return output_size(input_size, self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_channels, H, W) to class scores (B, num_classes, H - 2b, W - 2b)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (batch, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        self.output_size(tuple(x.shape[-2:]))  # raises with the nearest valid sizes
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = F.max_pool2d(x, 2)
            x = block(x)
            if level >= self.depth - 1:
                x = self.dropout(x)
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)
