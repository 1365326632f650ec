"""Data augmentation of Sec. 3.1: elastic deformation, shift, rotation, flip, gray values.

"We primarily need shift and rotation invariance as well as robustness to
deformations and gray value variations. [...] We generate smooth deformations
using random displacement vectors on a coarse 3 by 3 grid. The displacements
are sampled from a Gaussian distribution with 10 pixels standard deviation.
Per-pixel displacements are then computed using bicubic interpolation."

Everything runs in torch on the data's device, batched, with every random
number drawn from one ``torch.Generator``: a training step never waits for the
CPU. Per sample the ``Augmenter`` composes the shift, rotation, flip and
elastic field into ONE map from input-tile pixels to source-slice pixels and
resamples image, label and weight map once each with ``grid_sample``.
Positions outside the slice are mirror-reflected about the edge pixels (numpy
``reflect``), as the network's input is at test time (Fig. 2).

Coordinates are (row, col) in pixels, pixel centres at integers.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

__all__ = ["displacement_field", "random_displacement", "AugmentParams", "Augmenter"]

INTERPOLATIONS = ("bilinear", "bicubic")


def displacement_field(nodes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Per-pixel displacements of an (H, W) tile from vectors at lattice nodes (Sec. 3.1).

    ``nodes`` is (..., 2, g_h, g_w): (row, col) displacements in pixels at a
    lattice whose outer nodes lie on the tile's corner pixel centres, evenly
    spaced in between. Returns (..., 2, H, W). The "bicubic interpolation" is
    Keys' cubic convolution (a = -0.75), ``F.interpolate(mode="bicubic",
    align_corners=True)``: it interpolates, so at a node the field equals the
    node's vector; taps beyond the outer nodes repeat the outer node.
    """
    lead, lattice = nodes.shape[:-3], nodes.shape[-3:]
    field = F.interpolate(nodes.reshape(-1, *lattice), size=tuple(shape), mode="bicubic", align_corners=True)
    return field.view(*lead, *field.shape[-3:])


def random_displacement(
    shape: Sequence[int],
    *,
    grid: int = 3,
    displacement_std: float = 10.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A smooth random (2, H, W) displacement field in pixels (Sec. 3.1).

    Displacement vectors on a ``grid`` x ``grid`` lattice spanning the tile are
    drawn from N(0, displacement_std^2) per axis and interpolated bicubically to every
    pixel (see ``displacement_field``). ``device`` defaults to the generator's.
    """
    device = _device(generator, device)
    nodes = displacement_std * torch.randn(2, grid, grid, generator=generator, device=device, dtype=dtype)
    return displacement_field(nodes, shape)


class AugmentParams(NamedTuple):
    """The random draws for a batch of B tiles; ``Augmenter.apply`` turns them into tiles.

    slice_index: (B,) int64, which source slice.
    centre: (B, 2) the shift: source pixel (row, col) of tile pixel (in_h // 2,
        in_w // 2), the tile's centre pixel and the pivot of rotation and flip.
    angle: (B,) rotation in radians, from the row axis towards the column axis.
    flip: (B,) bool, mirror the tile's columns before rotating.
    nodes: (B, 2, grid, grid) elastic displacement vectors in pixels.
    contrast: (B,) factor on the deviation from the tile's mean gray value.
    brightness: (B,) shift of the gray values.
    """

    slice_index: torch.Tensor
    centre: torch.Tensor
    angle: torch.Tensor
    flip: torch.Tensor
    nodes: torch.Tensor
    contrast: torch.Tensor
    brightness: torch.Tensor


class Augmenter:
    """Random training tiles from whole slices, as in Sec. 3.1; batched, on the data's device.

    Per sample it draws (the paper gives no ranges except for the elastic field;
    docs/augmentation.md gives the reasons for each choice):

    - a source slice, uniformly;
    - the shift: the tile's centre pixel uniform over the slice's pixels, so
      tiles near the edge reach into the mirror-reflected surround;
    - a rotation angle uniform in [0, 2 pi) if ``rotation``, else 0;
    - a flip of the tile's columns with probability 1/2 if ``flip``;
    - the elastic field: a ``grid`` x ``grid`` lattice of N(0, displacement_std^2)
      displacements spanning the INPUT tile, interpolated bicubically;
    - a gray-value change: contrast factor log-uniform in [1/contrast, contrast]
      about the tile's mean, and a brightness shift uniform in
      [-brightness, brightness].

    Input-tile pixel ``q`` (relative to the centre pixel) is read from source
    position ``centre + R(angle) Flip (q + d(q))``: the tile is cut out of the
    shifted, rotated, flipped slice and then elastically deformed. The image is
    resampled with ``image_interpolation`` (bilinear by default; "bicubic" is
    Keys' cubic), labels with nearest neighbour, weights bilinearly, all with
    reflection padding. Labels and weights are resampled only on the centred
    ``output_size`` crop of the same map, so they align with the network's
    output pixels. The gray-value change is applied to the image only, after
    resampling, and the image is then clipped to [0, 1].

    Parameters
    ----------
    input_size : int | Sequence[int]
        network input tile, int or (h, w) (572 in the paper).
    output_size : int | Sequence[int]
        network output tile, int or (h, w) (388); ``input - output``
        must be even on both axes.
    grid : int, displacement_std : float
        elastic lattice nodes per axis and the standard
        deviation of their displacements in pixels (the paper's 10).
    rotation, flip : bool
        draw them, or not.
    contrast : float
        largest contrast factor (>= 1; 1 switches it off).
    brightness : float
        largest brightness shift (>= 0; 0 switches it off).
    image_interpolation : str
        "bilinear" or "bicubic".
    """

    def __init__(
        self,
        input_size: int | Sequence[int],
        output_size: int | Sequence[int],
        *,
        grid: int = 3,
        displacement_std: float = 10.0,
        rotation: bool = True,
        flip: bool = True,
        contrast: float = 1.25,
        brightness: float = 0.1,
        image_interpolation: str = "bilinear",
    ):
        self.input_shape, self.output_shape = _pair(input_size), _pair(output_size)
        if any(o > i or (i - o) % 2 for i, o in zip(self.input_shape, self.output_shape)):
            raise ValueError(
                f"output_size {self.output_shape} must fit centred in input_size {self.input_shape}: "
                "not larger, and input - output even on both axes"
            )
        if grid < 1 or displacement_std < 0 or contrast < 1 or brightness < 0:
            raise ValueError("need grid >= 1, displacement_std >= 0, contrast >= 1 and brightness >= 0")
        if image_interpolation not in INTERPOLATIONS:
            raise ValueError(f"image_interpolation must be one of {INTERPOLATIONS}, got {image_interpolation!r}")
        self.grid, self.displacement_std, self.rotation, self.flip = grid, displacement_std, rotation, flip
        self.contrast, self.brightness = contrast, brightness
        self.image_interpolation = image_interpolation
        self.border = tuple((i - o) // 2 for i, o in zip(self.input_shape, self.output_shape))

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        *,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` augmented tiles from the (Z, H, W) stacks: (x, y, w).

        ``images`` float in [0, 1], ``labels`` int64 class map, ``weights`` float
        weight map, all on one device with ``generator``. Returns x (B, 1, in_h,
        in_w), y (B, out_h, out_w) int64 and w (B, out_h, out_w).
        """
        params = self.draw(batch_size, images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return self.apply(params, images, labels, weights)

    def draw(
        self,
        batch_size: int,
        source_shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> AugmentParams:
        """The random draws for ``batch_size`` tiles from a (Z, H, W) stack, on ``device``.

        All options draw the same random numbers (a switched-off one is then
        ignored), so e.g. ``flip=False`` does not change the other draws.
        """
        depth, height, width = source_shape
        draw = dict(generator=generator, device=_device(generator, device))
        # The centre is a source pixel, so without rotation and deformation a
        # tile is an exact crop of the mirror-padded slice.
        slice_index = torch.randint(depth, (batch_size,), **draw)
        centre = torch.stack([torch.randint(n, (batch_size,), dtype=dtype, **draw) for n in (height, width)], 1)
        uniform = torch.rand(batch_size, 4, dtype=dtype, **draw)
        nodes = torch.randn(batch_size, 2, self.grid, self.grid, dtype=dtype, **draw) * self.displacement_std
        return AugmentParams(
            slice_index=slice_index,
            centre=centre,
            angle=uniform[:, 0] * (2 * math.pi if self.rotation else 0.0),
            flip=uniform[:, 1] < (0.5 if self.flip else 0.0),
            nodes=nodes,
            contrast=torch.pow(self.contrast**2, uniform[:, 2]) / self.contrast,
            brightness=uniform[:, 3] * (2 * self.brightness) - self.brightness,
        )

    def coordinates(self, params: AugmentParams) -> torch.Tensor:
        """Source-slice pixel positions (B, 2, in_h, in_w), (row, col), read for each input-tile pixel."""
        nodes = params.nodes
        tile = _tile_pixels(self.input_shape, nodes.device, nodes.dtype)
        deformed = tile + displacement_field(nodes, self.input_shape)
        cos, sin = torch.cos(params.angle), torch.sin(params.angle)
        mirror = torch.where(params.flip, -1.0, 1.0).to(nodes.dtype)
        rotate_flip = torch.stack([cos, -sin * mirror, sin, cos * mirror], 1).view(-1, 2, 2, 1, 1)
        # Elementwise rather than a matrix product, which TF32 would round to ~1e-3.
        positions = torch.addcmul(params.centre[..., None, None], rotate_flip[:, :, 0], deformed[:, None, 0])
        return positions.addcmul_(rotate_flip[:, :, 1], deformed[:, None, 1])

    def apply(
        self, params: AugmentParams, images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Resample the tiles described by ``params`` from the (Z, H, W) stacks: (x, y, w)."""
        if images.ndim != 3 or labels.shape != images.shape or weights.shape != images.shape:
            raise ValueError(
                f"images, labels and weights must be (Z, H, W) stacks of one shape, got "
                f"{tuple(images.shape)}, {tuple(labels.shape)}, {tuple(weights.shape)}"
            )
        rows, cols = self.coordinates(params).to(images.dtype).unbind(1)
        # grid_sample wants (x, y) = (col, row) in [-1, 1], -1 and 1 being the edge pixel centres.
        height, width = images.shape[1:]
        grid = torch.stack([cols * (2 / (width - 1)) - 1, rows * (2 / (height - 1)) - 1], -1)
        (top, left), (out_h, out_w) = self.border, self.output_shape
        crop = grid[:, top : top + out_h, left : left + out_w]
        index = params.slice_index
        x = _resample(images.index_select(0, index), grid, self.image_interpolation)
        y = _resample(labels.index_select(0, index).to(images.dtype), crop, "nearest").long()
        w = _resample(weights.index_select(0, index), crop, "bilinear")
        mean = x.mean(dim=(-2, -1), keepdim=True)
        x = torch.lerp(mean, x, params.contrast.view(-1, 1, 1, 1).to(x.dtype))
        x = x + params.brightness.view(-1, 1, 1, 1).to(x.dtype)
        return x.clamp_(0.0, 1.0), y[:, 0], w[:, 0]


@functools.lru_cache(maxsize=8)
def _tile_pixels(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(2, h, w) (row, col) offsets of a tile's pixels from its centre pixel (h // 2, w // 2); cached."""
    rows, cols = (torch.arange(n, dtype=dtype, device=device) - n // 2 for n in shape)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))


def _resample(stack: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, H, W) slices read at ``grid`` with mirror reflection about the edge pixels: (B, 1, h, w).

    With ``align_corners=True`` torch reflects about the edge pixel centres
    (numpy ``reflect``, the edge not repeated), repeatedly for any distance.
    """
    return F.grid_sample(stack.unsqueeze(1), grid, mode=mode, padding_mode="reflection", align_corners=True)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    pair = (int(size), int(size)) if isinstance(size, int) else tuple(int(n) for n in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"a tile size is a positive int or an (h, w) pair, got {size!r}")
    return pair


def _device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str | None:
    """``device`` if given, else the generator's (None: torch's default)."""
    return device if device is not None or generator is None else generator.device
