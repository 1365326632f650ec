"""Overlap-tile prediction (Fig. 2) and test-time augmentation (Sec. 4)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from skimage import io as skio
from torch import nn

from ronneberger2015.__main__ import main
from ronneberger2015.network import UNet
from ronneberger2015.tiling import DIHEDRAL, _dihedral, _largest_tile, _undo, cli, load_model, predict


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny networks here run fastest on one thread (no OpenMP hand-offs on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(depth=3, seed=0, **kwargs) -> UNet:
    torch.manual_seed(seed)
    return UNet(base_channels=2, depth=depth, **kwargs).eval()


def random_image(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def mirror(image: np.ndarray, before: int, after: tuple[int, int]) -> np.ndarray:
    """Mirror padding written out: index i maps to the reflection of i about 0 and n - 1, repeatedly."""
    def fold(n, pad_after):
        i = np.arange(-before, n + pad_after)
        if n == 1:
            return np.zeros_like(i)
        i = np.mod(i, 2 * (n - 1))
        return np.where(i < n, i, 2 * (n - 1) - i)

    return image[np.ix_(fold(image.shape[0], after[0]), fold(image.shape[1], after[1]))]


def whole_pass(model: nn.Module, padded: np.ndarray) -> np.ndarray:
    """Soft-max of one forward pass over a whole padded (H, W) image."""
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(np.ascontiguousarray(padded))[None, None]), 1)[0].numpy()


class Echo(nn.Module):
    """Has a depth-3 U-Net's sizes; logits (0, x) of the centre, so p(class 1) = sigmoid(image)."""

    in_channels, num_classes, base_channels, depth = 1, 2, 1, 3
    border = UNet(depth=3, base_channels=1).border

    def forward(self, x):
        b = self.border
        centre = x[:, :, b:-b, b:-b]
        return torch.cat([torch.zeros_like(centre), centre], dim=1)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# Seamlessness and mirroring (Fig. 2)


@pytest.fixture(scope="module")
def seamless_case():
    model, image = tiny(), random_image(900, 700)
    return model, image, whole_pass(model, np.pad(image, model.border, mode="reflect"))


@pytest.mark.parametrize("tile", [None, 60, 124, (252, 124)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_tiles_equal_one_pass_over_the_mirrored_image(seamless_case, tile, batch_size):
    model, image, expected = seamless_case
    got = predict(model, image, output_tile=tile, batch_size=batch_size)
    assert got.dtype == np.float32 and got.shape == (2, 900, 700)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(37, 23), (5, 120), (1, 9), (61, 44)])
def test_small_images_are_mirrored_repeatedly(shape):
    """Sides shorter than the border are reflected again and again, as predict's docstring states (a row
    a b c continues b a b c b a b ...): the result equals one pass over the image padded by ``mirror``."""
    model, image = tiny(), random_image(*shape)
    b, step = model.border, 2**model.depth
    extend = [-(-(n - 4) // step) * step + 4 - n for n in shape]  # up to the next valid output (8k + 4)
    expected = whole_pass(model, mirror(image, b, (b + extend[0], b + extend[1])))[:, : shape[0], : shape[1]]
    np.testing.assert_allclose(predict(model, image), expected, atol=1e-5)


def test_stack_tiles_batch_across_slices():
    model, stack = tiny(), random_image(3, 40, 50)
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    got = predict(model, (stack * 255).astype(np.uint8), batch_size=3)
    assert shapes == [(3, 1, 44 + 88, 52 + 88)]  # one tile per slice, all three in one pass
    for z in range(3):
        np.testing.assert_allclose(got[z], predict(model, (stack[z] * 255).astype(np.uint8)), atol=1e-6)


def test_memory_does_not_grow_with_the_image():
    model = tiny(depth=2)
    budget = 3 * 2**20
    largest = {}
    for side in (300, 1200):
        shapes = []
        handle = model.register_forward_pre_hook(lambda module, args, shapes=shapes: shapes.append(args[0].shape))
        predict(model, random_image(side, side), memory_budget=budget)
        handle.remove()
        largest[side] = max(shapes, key=lambda s: s.numel())
    assert largest[300] == largest[1200]
    assert largest[1200].numel() * 6 * model.base_channels * 4 <= budget


def test_default_tile_fits_the_budget():
    model = UNet(base_channels=1)  # the paper's sizes; the estimate scales with base_channels
    assert _largest_tile(4, 92, 6 * 64 * 4, 2 * 2**30) == 996
    assert _largest_tile(4, 92, 6 * 64 * 2, 2 * 2**30) == 1476
    with pytest.raises(ValueError, match="memory_budget"):
        predict(model, random_image(30, 30), memory_budget=1000)


# Test-time augmentation (Sec. 4)


def test_dihedral_transforms_are_eight_and_undone():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    seen = {tuple(_dihedral(x, *t).flatten().tolist()) + tuple(_dihedral(x, *t).shape) for t in DIHEDRAL}
    assert len(seen) == 8
    for t in DIHEDRAL:
        assert torch.equal(_undo(_dihedral(x, *t), *t), x)


@pytest.mark.parametrize("tile", [None, (52, 36)])
def test_tta_inverts_each_transform(tile):
    image = random_image(70, 45)
    got = predict(Echo(), image, output_tile=tile, tta=True, batch_size=5)
    np.testing.assert_allclose(got[1], sigmoid(image), atol=1e-6)


def test_tta_equals_mean_over_transformed_passes():
    model, image = tiny(seed=1), random_image(100, 76)
    padded = torch.from_numpy(np.pad(image, model.border, mode="reflect"))[None, None]
    with torch.no_grad():
        expected = torch.stack([_undo(torch.softmax(model(_dihedral(padded, *t)), 1), *t) for t in DIHEDRAL]).mean(0)
    got = predict(model, image, output_tile=(52, 36), tta=True, batch_size=3)
    np.testing.assert_allclose(got, expected[0].numpy(), atol=1e-5)


def test_tta_changes_nothing_for_an_equivariant_model():
    model = tiny(seed=2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                w = module.weight
                w.copy_(torch.stack([_dihedral(w, *t) for t in DIHEDRAL]).mean(0))
    image = random_image(90, 130)
    plain = predict(model, image)
    assert np.abs(plain[1] - plain[1].mean()).max() > 1e-3  # not a constant output
    np.testing.assert_allclose(predict(model, image, tta=True), plain, atol=1e-5)


# Model state, precision, channels


def test_eval_mode_during_prediction_and_flag_restored():
    model = tiny(dropout=0.5).train()
    image = random_image(40, 40)
    first, second = predict(model, image), predict(model, image)
    assert model.training
    np.testing.assert_array_equal(first, second)


def test_bf16_autocast_is_close_to_fp32():
    model, image = tiny(), random_image(60, 60)
    np.testing.assert_allclose(predict(model, image, precision="bf16"), predict(model, image), atol=3e-2)


@pytest.mark.cuda
def test_cuda_predicts_what_the_cpu_predicts(monkeypatch):
    """Overlap-tile prediction with TTA on the GPU (channels_last, batched tiles) gives the CPU's probabilities:
    to rounding in fp32 (TF32 off), within bf16's error in bf16 autocast; the model stays on its device."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, stack = tiny(depth=4), random_image(3, 300, 260)
    on_cpu = predict(model, stack, tta=True, output_tile=100, device="cpu")
    for precision, tolerance in (("fp32", 1e-5), ("bf16", 5e-2)):
        on_gpu = predict(model, stack, tta=True, output_tile=100, device="cuda", precision=precision)
        assert on_gpu.shape == on_cpu.shape and np.isfinite(on_gpu).all()
        assert np.abs(on_gpu - on_cpu).max() < tolerance, precision


def test_multichannel_model():
    model, stack = tiny(in_channels=2, num_classes=3), random_image(2, 2, 30, 20)
    got = predict(model, stack)
    assert got.shape == (2, 3, 30, 20)
    np.testing.assert_allclose(predict(model, stack[1]), got[1], atol=1e-6)


@pytest.mark.parametrize(
    "image, in_channels, message",
    [
        (np.zeros(10, np.uint8), 1, r"expected an image of shape \(H, W\) or \(Z, H, W\), got shape \(10,\)"),
        (np.zeros((1, 1, 1, 8, 8), np.uint8), 1, "got shape"),
        (np.zeros((2, 3, 8, 8), np.uint8), 1, r"has 3 channel\(s\) but the model takes 1"),
        (np.zeros((3, 8, 8), np.uint8), 2, r"has 3 channel\(s\) but the model takes 2; give \(2, H, W\)"),
        (np.zeros((8, 8), np.uint8), 2, r"has 1 channel\(s\) but the model takes 2"),
        (np.array([[0.5, np.nan]], np.float32), 1, "NaN"),
        (np.full((4, 4), 2.0, np.float32), 1, r"not \[0, 1\]"),
        (np.zeros((0, 8), np.uint8), 1, "empty"),
    ],
)
def test_bad_images(image, in_channels, message):
    with pytest.raises(ValueError, match=message):
        predict(tiny(in_channels=in_channels), image)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output_tile": 490}, "valid output tiles near 490: 484 and 500"),
        ({"output_tile": (388, 390)}, "valid output tiles near 390: 388 and 404"),
        ({"output_tile": 4}, "tile sides must be integers >= 2\\*\\*depth = 16"),
        ({"output_tile": (388, 388, 388)}, "one side or a"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"precision": "fp16"}, "precision must be one of"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        predict(UNet(base_channels=1), random_image(8, 8), **kwargs)


# Command line


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny(seed=3)
    path = tmp_path / "model.pt"
    network = {"in_channels": 1, "num_classes": 2, "base_channels": 2, "depth": 3, "dropout": 0.5, "variant": "paper"}
    torch.save({"model": model.state_dict(), "config": {"network": network}}, path)
    return model, path


def test_cli_writes_cell_probabilities_per_slice(tmp_path, checkpoint):
    model, path = checkpoint
    stack = (random_image(2, 30, 40) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", stack)
    assert cli([str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--checkpoint", str(path), "--tta"]) == 0
    assert main(["predict", str(tmp_path / "in.tif"), "-o", str(tmp_path / "membrane.tif"),
                 "--checkpoint", str(path), "--tile", "20", "--device", "cpu", "--tta", "--membrane"]) == 0
    cells, membrane = tifffile.imread(tmp_path / "out.tif"), tifffile.imread(tmp_path / "membrane.tif")
    assert cells.dtype == np.float32 and cells.shape == (2, 30, 40)
    np.testing.assert_allclose(cells, predict(model, stack, tta=True)[:, 1], atol=1e-6)
    np.testing.assert_allclose(membrane, 1 - cells, atol=1e-5)


def test_cli_reads_png(tmp_path, checkpoint):
    model, path = checkpoint
    image = (random_image(25, 33) * 255).astype(np.uint8)
    skio.imsave(tmp_path / "in.png", image, check_contrast=False)
    assert cli([str(tmp_path / "in.png"), "-o", str(tmp_path / "out.tif"), "--checkpoint", str(path)]) == 0
    np.testing.assert_allclose(tifffile.imread(tmp_path / "out.tif"), predict(model, image)[1], atol=1e-6)


def test_bad_checkpoints(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"model": {}, "config": {}}, tmp_path / "nonet.pt")
    torch.save({"model": UNet(base_channels=2, depth=2).state_dict(), "config": {"network": {"depth": 3}}},
               tmp_path / "mismatch.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    for name, message in [("junk.pt", "cannot be read"), ("nonet.pt", "no config\\['network'\\]"),
                          ("mismatch.pt", "do not fit UNet")]:
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path / name)
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((8, 8), np.uint8))
    assert main(["predict", str(tmp_path / "in.tif"), "-o", str(tmp_path / "o.tif"), "--checkpoint",
                 str(tmp_path / "junk.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint")
    assert not (tmp_path / "o.tif").exists()


def test_cli_folders_thresholds_and_instances(tmp_path, checkpoint, capsys):
    """A folder in, the same names out: probabilities as NAME.tif, masks and labels in the input's format."""
    from skimage.measure import label

    model, path = checkpoint
    (tmp_path / "in").mkdir()
    images = (random_image(3, 30, 40) * 255).astype(np.uint8)
    for name, image in zip(("a.png", "b.tif", "c.png"), images):
        (skio.imsave(tmp_path / "in" / name, image, check_contrast=False) if name.endswith(".png")
         else tifffile.imwrite(tmp_path / "in" / name, image))
    expected = predict(model, images)[:, 1]
    threshold = float(np.median(expected))
    run = ["predict", str(tmp_path / "in"), "--checkpoint", str(path)]
    assert main(run + ["-o", str(tmp_path / "p")]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["a.tif", "b.tif", "c.tif"]
    np.testing.assert_allclose(tifffile.imread(tmp_path / "p" / "c.tif"), expected[2], atol=1e-6)
    assert main(run + ["-o", str(tmp_path / "m"), "--threshold", str(threshold)]) == 0
    masks = skio.imread(tmp_path / "m" / "a.png")
    np.testing.assert_array_equal(masks, np.where(expected[0] > threshold, 255, 0))
    assert main(run + ["-o", str(tmp_path / "i"), "--instances", "--threshold", str(threshold)]) == 0
    cells = tifffile.imread(tmp_path / "i" / "b.tif")
    assert cells.dtype == np.uint16
    np.testing.assert_array_equal(cells, label(expected[1] > threshold, connectivity=1))
    assert "wrote cells (P > " in capsys.readouterr().out


def test_cli_never_writes_over_its_input(tmp_path, checkpoint, capsys):
    _, path = checkpoint
    image = (random_image(20, 20) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "x.tif", image)
    (tmp_path / "link.tif").symlink_to(tmp_path / "x.tif")
    for output in ("x.tif", "./x.tif", "link.tif"):
        assert main(["predict", str(tmp_path / "x.tif"), "-o", str(tmp_path / output), "--checkpoint", str(path)]) == 2
        assert "is an input: writing it would destroy" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    tifffile.imwrite(tmp_path / "folder" / "y.tif", image)
    assert main(["predict", str(tmp_path / "folder"), "-o", str(tmp_path / "folder"), "--checkpoint", str(path)]) == 2
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "x.tif"), image)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "folder" / "y.tif"), image)


def test_cli_checks_outputs_before_predicting(tmp_path, checkpoint, capsys, monkeypatch):
    import ronneberger2015.tiling as tiling

    _, path = checkpoint
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((20, 20), np.uint8))
    monkeypatch.setattr(tiling, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["predict", str(tmp_path / "x.tif"), "-o", str(tmp_path / "x.png"), "--checkpoint", str(path)]) == 2
    assert "float results are written as .tif or .tiff" in capsys.readouterr().err


def test_cli_old_tile_flag_takes_an_input_side(tmp_path, capsys):
    model = tiny(depth=4, seed=1)  # depth 4: input sides 16k + 60 and output sides 16k - 124 never coincide
    network = {"base_channels": 2, "depth": 4}
    torch.save({"model": model.state_dict(), "config": {"network": network}}, tmp_path / "m.pt")
    image = (random_image(40, 40) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "x.tif", image)
    assert main(["predict", str(tmp_path / "x.tif"), "-o", str(tmp_path / "o.tif"), "--checkpoint",
                 str(tmp_path / "m.pt"), "--tile", "204"]) == 0
    err = capsys.readouterr().err
    assert "--tile is now called --output-tile" in err and "204 is an input tile side; taking --output-tile 20" in err
    np.testing.assert_allclose(tifffile.imread(tmp_path / "o.tif"), predict(model, image, output_tile=20)[1], atol=1e-6)


def test_non_finite_output_is_refused(tmp_path):
    model = tiny(seed=1)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="output is not finite"):
        predict(model, random_image(20, 20))


def test_an_image_is_not_a_checkpoint(tmp_path):
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="is an image, not a checkpoint") as raised:
        load_model(tmp_path / "x.tif")
    assert "delete" not in str(raised.value)
