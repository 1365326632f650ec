"""Sec. 3.1 data augmentation: elastic field, the composed warp, and a numpy/scipy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from ronneberger2015.augment import Augmenter, AugmentParams, displacement_field, random_displacement

# A plain numpy/scipy reference of the same warp, computed in float64 from the drawn parameters.


def keys_matrix(nodes: int, pixels: int, a: float = -0.75) -> np.ndarray:
    """(pixels, nodes) weights of Keys' cubic convolution, nodes spanning the pixels, edge taps clamped."""
    position = np.arange(pixels) * (nodes - 1) / (pixels - 1)
    base = np.floor(position).astype(int)
    matrix = np.zeros((pixels, nodes))
    for tap in range(-1, 3):
        s = np.abs(position - (base + tap))
        kernel = np.where(s <= 1, (a + 2) * s**3 - (a + 3) * s**2 + 1, a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a)
        np.add.at(matrix, (np.arange(pixels), np.clip(base + tap, 0, nodes - 1)), np.where(s < 2, kernel, 0.0))
    return matrix


def reference_coordinates(augmenter: Augmenter, params: AugmentParams) -> np.ndarray:
    """(B, 2, in_h, in_w) source positions: centre + R(angle) Flip (q + bicubic field)."""
    (in_h, in_w), grid = augmenter.input_shape, augmenter.grid
    nodes = params.nodes.double().numpy()
    field = np.einsum("hi,bcij,wj->bchw", keys_matrix(grid, in_h), nodes, keys_matrix(grid, in_w))
    tile = np.stack(np.meshgrid(np.arange(in_h) - in_h // 2, np.arange(in_w) - in_w // 2, indexing="ij"))
    row, col = (tile + field).transpose(1, 0, 2, 3)
    col = np.where(params.flip.numpy()[:, None, None], -col, col)
    angle = params.angle.double().numpy()[:, None, None]
    centre = params.centre.double().numpy()[:, :, None, None]
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([cos * row - sin * col, sin * row + cos * col], 1) + centre


def output_crop(augmenter: Augmenter, tiles: np.ndarray) -> np.ndarray:
    """The centred output_size window of (..., in_h, in_w) arrays."""
    (top, left), (out_h, out_w) = augmenter.border, augmenter.output_shape
    return tiles[..., top : top + out_h, left : left + out_w]


def reference_tiles(augmenter, params, images, labels, weights):
    """scipy ``map_coordinates`` with mode 'mirror' (numpy 'reflect'): image order 1, label 0, weights 1."""
    coordinates = reference_coordinates(augmenter, params)
    crop = output_crop(augmenter, coordinates)
    x, y, w = [], [], []
    for b, z in enumerate(params.slice_index.numpy()):
        tile = ndimage.map_coordinates(images[z].astype(np.float64), coordinates[b], order=1, mode="mirror")
        mean = tile.mean()
        x.append(np.clip(mean + params.contrast[b].item() * (tile - mean) + params.brightness[b].item(), 0, 1))
        y.append(ndimage.map_coordinates(labels[z], crop[b], order=0, mode="mirror"))
        w.append(ndimage.map_coordinates(weights[z].astype(np.float64), crop[b], order=1, mode="mirror"))
    return coordinates, np.stack(x)[:, None], np.stack(y), np.stack(w)


def smooth_stack(rng: np.random.Generator, shape, sigma: float = 1.5) -> np.ndarray:
    """Smooth random float32 slices in [0, 1]."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), (0, sigma, sigma))
    return ((noise - noise.min()) / np.ptp(noise)).astype(np.float32)


def random_stacks(seed: int, shape=(3, 64, 64)):
    """Smooth random images, 0/1 labels and weights in [1, 11], as numpy stacks."""
    rng = np.random.default_rng(seed)
    labels = (smooth_stack(rng, shape) > 0.5).astype(np.int64)
    return smooth_stack(rng, shape), labels, 1 + 10 * smooth_stack(rng, shape)


def as_tensors(images, labels, weights):
    return torch.from_numpy(images), torch.from_numpy(labels).long(), torch.from_numpy(weights)


STILL = dict(displacement_std=0.0, rotation=False, flip=False, contrast=1.0, brightness=0.0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_still_tile_is_a_crop_of_the_mirror_padded_slice(interpolation):
    """displacement_std = 0, no rotation or flip: the tile is the reflect-padded slice at the drawn shift, exactly.

    The 7 x 10 slices are much smaller than the 60 x 44 tiles, so positions lie
    several slice sizes outside and are reflected many times.
    """
    rng = np.random.default_rng(0)
    images, labels = rng.random((2, 7, 10), dtype=np.float32), rng.integers(0, 2, (2, 7, 10))
    weights = rng.random((2, 7, 10), dtype=np.float32)
    augmenter = Augmenter((60, 44), (40, 24), image_interpolation=interpolation, **STILL)
    params = augmenter.draw(8, images.shape, generator=torch.Generator().manual_seed(0))
    x, y, w = augmenter.apply(params, *as_tensors(images, labels, weights))
    pad = 64
    for b, z in enumerate(params.slice_index.numpy()):
        top, left = params.centre[b].numpy().astype(int) - (60 // 2, 44 // 2) + pad  # tile pixel (0, 0)
        window = np.s_[top : top + 60, left : left + 44]
        expected = [np.pad(stack[z], pad, mode="reflect")[window] for stack in (images, labels, weights)]
        np.testing.assert_allclose(x[b, 0].numpy(), expected[0], atol=1e-5)
        np.testing.assert_array_equal(y[b].numpy(), output_crop(augmenter, expected[1]))
        np.testing.assert_allclose(w[b].numpy(), output_crop(augmenter, expected[2]), atol=1e-5)


@pytest.mark.parametrize("grid, shape", [(3, (21, 31)), (4, (22, 31))])
def test_field_equals_the_vectors_at_the_nodes(grid, shape):
    nodes = 10 * torch.randn(2, grid, grid, generator=torch.Generator().manual_seed(1))
    field = displacement_field(nodes, shape)
    step_h, step_w = ((n - 1) // (grid - 1) for n in shape)
    assert field.shape == (2, *shape)
    torch.testing.assert_close(field[:, ::step_h, ::step_w], nodes, atol=1e-4, rtol=0)


def test_field_is_keys_cubic():
    """The stated cubic: Keys' convolution (a = -0.75), nodes on the corner pixels, edge taps clamped."""
    nodes = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = np.einsum("hi,bcij,wj->bchw", keys_matrix(3, 40), nodes.numpy(), keys_matrix(3, 57))
    np.testing.assert_allclose(displacement_field(nodes, (40, 57)).numpy(), expected, atol=1e-10)


def test_node_displacements_have_std_10():
    generator = torch.Generator().manual_seed(3)
    at_nodes = torch.stack([random_displacement((5, 7), generator=generator)[:, ::2, ::3] for _ in range(500)])
    assert at_nodes.shape == (500, 2, 3, 3)
    assert abs(at_nodes.std().item() - 10.0) < 0.5
    assert abs(at_nodes.mean().item()) < 0.5


def test_field_is_smooth():
    """Second differences stay below max|node| * 12 * 1.375 / spacing^2 (572 px tile: nodes 285.5 px apart).

    For Keys' kernel (a = -0.75) the taps at any position have sum |K''| <= 12
    along the differenced axis and sum |K| <= 1.375 along the other.
    """
    nodes = 10 * torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    field = displacement_field(nodes, (572, 572))
    bound = nodes.abs().max() * 12 * 1.375 / ((572 - 1) / 2) ** 2
    for axis in (1, 2):
        assert field.diff(n=2, dim=axis).abs().max() <= bound
    assert bound < 0.01  # the paper's field bends by less than 0.01 px per pixel^2


def test_torch_warp_matches_scipy_reference():
    images, labels, weights = random_stacks(5, (3, 50, 45))
    augmenter = Augmenter((48, 40), (28, 20))
    params = augmenter.draw(8, images.shape, generator=torch.Generator().manual_seed(5))
    x, y, w = augmenter.apply(params, *as_tensors(images, labels, weights))
    coordinates, x_ref, y_ref, w_ref = reference_tiles(augmenter, params, images, labels, weights)

    np.testing.assert_allclose(augmenter.coordinates(params).numpy(), coordinates, atol=1e-3)
    np.testing.assert_allclose(x.numpy(), x_ref, atol=1e-4)
    np.testing.assert_allclose(w.numpy(), w_ref, atol=1e-4)
    # Nearest neighbour: rounding ties (x.5) may go either way in float32 vs float64.
    crop = output_crop(augmenter, coordinates)
    clear = (np.abs(crop - np.floor(crop) - 0.5) > 1e-3).all(axis=1)
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(y.numpy()[clear], y_ref[clear])


def test_labels_keep_their_values():
    rng = np.random.default_rng(6)
    labels = rng.choice([0, 2, 5], size=(2, 40, 40))
    images = weights = rng.random((2, 40, 40), dtype=np.float32)
    augmenter = Augmenter(44, 24, displacement_std=30.0)
    generator = torch.Generator().manual_seed(6)
    _, y, _ = augmenter(*as_tensors(images, labels, weights), batch_size=6, generator=generator)
    assert y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 2, 5}


def test_image_and_label_stay_aligned(isbi):
    """Warp a label-coloured ISBI image with its labels (as labels and as weights) at 572 -> 388.

    The weights (bilinear on the crop) equal the image's centre crop. Every
    label agrees with the image: the nearest pixel has bilinear weight >= 1/4,
    so label 1 means x >= 1/4 and label 0 means x <= 3/4. Thresholded at 1/2 the
    image agrees with the labels on > 99% of pixels; the rest are staircase
    corners of the thin membranes, which bilinear interpolation rounds off and
    nearest neighbour keeps. One pixel off, agreement drops to about 95%.
    """
    labels = torch.from_numpy(isbi.train_labels[:4] > 0).long()
    images = labels.float()
    augmenter = Augmenter(572, 388, contrast=1.0, brightness=0.0)
    x, y, w = augmenter(images, labels, images, batch_size=4, generator=torch.Generator().manual_seed(7))
    inside = output_crop(augmenter, x[:, 0])
    torch.testing.assert_close(w, inside, atol=1e-6, rtol=0)
    assert (inside[y == 1] >= 0.25 - 1e-6).all() and (inside[y == 0] <= 0.75 + 1e-6).all()
    assert ((inside > 0.5) == y.bool()).float().mean() > 0.99
    shifted = x[:, 0, 93:-91, 92:-92] > 0.5
    assert (shifted == y.bool()).float().mean() < 0.97


def test_same_seed_same_tiles_different_seed_different_fields():
    stacks = as_tensors(*random_stacks(8))
    augmenter = Augmenter(60, 20)
    first, again, other = (augmenter(*stacks, batch_size=3, generator=torch.Generator().manual_seed(s))
                           for s in [0, 0, 1])
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    fields = [random_displacement((9, 9), generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(fields[0], fields[1]) and not torch.allclose(fields[0], fields[2])


def test_draw_ranges():
    shape, generator = (5, 30, 40), torch.Generator().manual_seed(9)
    params = Augmenter(21, 11).draw(4000, shape, generator=generator)
    assert params.slice_index.min() == 0 and params.slice_index.max() == 4
    assert (params.centre >= 0).all() and (params.centre[:, 0] <= 29).all() and (params.centre[:, 1] <= 39).all()
    assert params.angle.min() >= 0 and params.angle.max() < 2 * math.pi and params.angle.max() > 6.2
    assert abs(params.flip.float().mean().item() - 0.5) < 0.03
    assert params.contrast.min() >= 1 / 1.25 and params.contrast.max() <= 1.25
    assert abs(params.contrast.log().mean().item()) < 0.01  # log-uniform about 1
    assert params.brightness.abs().max() <= 0.1 and params.brightness.abs().max() > 0.099
    assert (params.centre == params.centre.round()).all()
    still = Augmenter(21, 11, **STILL).draw(4000, shape, generator=generator.manual_seed(9))
    assert (still.angle == 0).all() and not still.flip.any() and (still.contrast == 1).all()
    assert (still.brightness == 0).all() and (still.nodes == 0).all()
    assert torch.equal(still.centre, params.centre)  # switching options off keeps the other draws


def test_shapes_and_errors():
    images = torch.rand(2, 50, 60)
    labels, weights = (images > 0.5).long(), torch.ones_like(images)
    x, y, w = Augmenter((92, 76), (52, 36))(images, labels, weights, batch_size=3)
    assert (x.shape, y.shape, w.shape) == ((3, 1, 92, 76), (3, 52, 36), (3, 52, 36))
    assert (x.dtype, y.dtype, w.dtype) == (torch.float32, torch.int64, torch.float32)
    assert 0 <= x.min() and x.max() <= 1
    for input_size, output_size in [(60, 61), (60, 41), ((60,), 40)]:
        with pytest.raises(ValueError):
            Augmenter(input_size, output_size)
    with pytest.raises(ValueError, match="image_interpolation"):
        Augmenter(60, 40, image_interpolation="nearest")
    with pytest.raises(ValueError, match="one shape"):
        Augmenter(60, 40)(images, labels[:1], weights)


@pytest.mark.cuda
def test_cuda_matches_cpu_without_host_sync():
    stacks = as_tensors(*random_stacks(10))
    augmenter = Augmenter(60, 20)
    params = augmenter.draw(4, (3, 64, 64), generator=torch.Generator().manual_seed(10))
    on_cpu = augmenter.apply(params, *stacks)
    on_gpu = augmenter.apply(AugmentParams(*(p.cuda() for p in params)), *(s.cuda() for s in stacks))
    for a, b in zip(on_cpu, on_gpu):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
    cuda_stacks, generator = [s.cuda() for s in stacks], torch.Generator("cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        augmenter(*cuda_stacks, batch_size=4, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
