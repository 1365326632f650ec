"""Training (Sec. 3): the loss goes down, resume is exact, bad checkpoints and NaN are caught,
and the fast engine computes the plain step."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from ronneberger2015 import train as train_module
from ronneberger2015.__main__ import main
from ronneberger2015.io import load_checkpoint, write_tiff
from ronneberger2015.network import UNet
from ronneberger2015.weightmap import target_and_weights
from ronneberger2015.loss import weighted_cross_entropy
from ronneberger2015.train import PRESETS, TrainConfig, TrainingDiverged, engine, resolve_device, train

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

TINY = TrainConfig(iterations=20, tile=92, learning_rate=0.01, log_every=5, checkpoint_every=10,
                   network=dict(base_channels=4, depth=3, dropout=0.5, variant="paper"))


@pytest.fixture(scope="module")
def two_slices(isbi):
    return isbi.train_images[:2, :128, :128], isbi.train_labels[:2, :128, :128]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _centre_targets(model, labels, tile):
    """Target and weight map (Eq. 2) on the output pixels of the top-left input tile."""
    target, weight = target_and_weights(labels)
    border, out = (tile - model.output_size(tile)) // 2, model.output_size(tile)
    window = (slice(None), slice(border, border + out), slice(border, border + out))
    return torch.from_numpy(target[window]), torch.from_numpy(weight[window])


def _constant_prediction_loss(model, labels, tile):
    """Eq. 1 of the best constant prediction: p(cell) = its weighted frequency."""
    y, w = _centre_targets(model, labels, tile)
    cell, background = (w * y).sum(), (w * (1 - y)).sum()
    p = cell / (cell + background)
    return (-(cell * torch.log(p) + background * torch.log(1 - p)) / y.numel()).item()


def _fixed_tile_loss(model, images, labels, tile):
    """Eq. 1 on the un-augmented top-left tiles of the slices, in eval mode."""
    y, w = _centre_targets(model, labels, tile)
    x = torch.from_numpy(images[:, None, :tile, :tile] / np.float32(255))
    model.eval()
    with torch.no_grad():
        return weighted_cross_entropy(model(x), y, w).item()


def test_smoke_lowers_the_loss(isbi, tmp_path):
    """The smoke preset with a tiny network, on 2 ISBI slices: the loss on fixed tiles drops.

    With this seed both engines end near 0.53x the initial loss; other seeds
    of so narrow a network can stay at the constant prediction for longer."""
    config = dataclasses.replace(PRESETS["smoke"], iterations=300, tile=124, log_every=10, checkpoint_every=50,
                                 network=dict(base_channels=8, depth=3, dropout=0.5, variant="paper"))
    images, labels = isbi.train_images[:2], isbi.train_labels[:2]
    torch.manual_seed(config.seed)
    before = _fixed_tile_loss(UNet(**config.network), images, labels, 300)
    model = train(images, labels, tmp_path, config, device="cpu", progress=False)
    after = _fixed_tile_loss(model, images, labels, 300)
    assert after < 0.8 * before
    assert after < 0.9 * _constant_prediction_loss(model, labels, 300)  # learned more than the class frequencies
    rows = np.loadtxt(tmp_path / "log.csv", delimiter=",", skiprows=1)
    assert rows.shape == (300, 3) and rows[:, 0].tolist() == list(range(1, 301))
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "checkpoint.pt").is_file()


def test_resume_reaches_the_same_weights(two_slices, tmp_path):
    straight = train(*two_slices, tmp_path / "a", TINY, device="cpu", progress=False)
    train(*two_slices, tmp_path / "b", dataclasses.replace(TINY, iterations=10), device="cpu", progress=False)
    resumed = train(*two_slices, tmp_path / "b", TINY, device="cpu", resume=True, progress=False)
    for name, value in _weights(straight).items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert (tmp_path / "a" / "log.csv").read_text() == (tmp_path / "b" / "log.csv").read_text()


def test_existing_run_needs_resume(two_slices, tmp_path):
    config = dataclasses.replace(TINY, iterations=5, checkpoint_every=5)
    train(*two_slices, tmp_path, config, device="cpu", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(*two_slices, tmp_path, config, device="cpu", progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        train(*two_slices, tmp_path, dataclasses.replace(config, learning_rate=0.5), device="cpu", resume=True, progress=False)


def test_corrupt_checkpoint_is_named(two_slices, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x02 half a pickle")
    with pytest.raises(ValueError, match="checkpoint.pt cannot be read.*corrupt"):
        train(*two_slices, tmp_path, TINY, device="cpu", resume=True, progress=False)


def test_nan_stops_and_keeps_last_good_checkpoint(two_slices, tmp_path, monkeypatch):
    calls = []

    def failing_loss(logits, target, weight):
        calls.append(1)
        loss = train_module.weighted_cross_entropy.__wrapped__(logits, target, weight)
        return loss * float("nan") if len(calls) > 12 else loss

    failing_loss.__wrapped__ = train_module.weighted_cross_entropy
    monkeypatch.setattr(train_module, "weighted_cross_entropy", failing_loss)
    with pytest.raises(TrainingDiverged, match=r"nan at iteration 13;.*iteration 10\) is kept"):
        train(*two_slices, tmp_path, TINY, device="cpu", progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 10


def test_invalid_tile_names_neighbours():
    with pytest.raises(ValueError, match="nearest valid sizes are 556"):
        TrainConfig(tile=570)


def test_command_line_on_png_folders(two_slices, tmp_path, capsys):
    from skimage import io as skio

    images, labels = two_slices
    for folder, stack in (("images", images), ("labels", labels)):
        (tmp_path / folder).mkdir()
        for i, page in enumerate(stack):
            skio.imsave(tmp_path / folder / f"{i:02d}.png", page, check_contrast=False)
    write_tiff(tmp_path / "val.tif", images[:1])
    write_tiff(tmp_path / "val-labels.tif", labels[:1])
    code = main(["train", str(tmp_path / "images"), str(tmp_path / "labels"), "-o", str(tmp_path / "run"),
                 "--preset", "smoke", "--iterations", "3", "--tile", "188", "--device", "cpu",
                 "--val", str(tmp_path / "val.tif"), str(tmp_path / "val-labels.tif")])
    assert code == 0
    assert {"checkpoint.pt", "config.json", "log.csv", "metrics.json"} <= {p.name for p in (tmp_path / "run").iterdir()}
    assert "vrand" in capsys.readouterr().out


def test_command_line_validates_on_instance_labels(tmp_path, capsys):
    """Instance labels (touching cells with distinct ids) are scored against the separated mask."""
    labels = np.zeros((1, 188, 188), np.uint16)
    labels[0, 20:100, 20:100], labels[0, 20:100, 100:170] = 1, 2  # two cells sharing a border
    images = (labels * 100).astype(np.uint8)
    write_tiff(tmp_path / "i.tif", images)
    write_tiff(tmp_path / "l.tif", labels)
    code = main(["train", str(tmp_path / "i.tif"), str(tmp_path / "l.tif"), "-o", str(tmp_path / "run"),
                 "--preset", "smoke", "--iterations", "1", "--tile", "188", "--device", "cpu", "--instances",
                 "--val", str(tmp_path / "i.tif"), str(tmp_path / "l.tif")])
    assert code == 0 and "vinfo" in capsys.readouterr().out


def test_command_line_rejects_mismatched_pairs(tmp_path, capsys):
    write_tiff(tmp_path / "a.tif", np.zeros((2, 8, 8), np.uint8))
    write_tiff(tmp_path / "b.tif", np.zeros((3, 8, 8), np.uint8))
    assert main(["train", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "-o", str(tmp_path / "r")]) == 2
    assert "2 images but 3 label images" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_is_named(tmp_path, capsys):
    write_tiff(tmp_path / "a.tif", np.zeros((1, 188, 188), np.uint8))
    assert main(["train", str(tmp_path / "a.tif"), str(tmp_path / "a.tif"), "-o", str(tmp_path / "r"),
                 "--device", "cuda"]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")


def _one_step(reference, config, tile, device):
    """Logits, gradients and updated weights of one SGD step of a copy of ``reference`` as ``config`` runs it,
    on a fixed random tile (float64 for comparing)."""
    model = copy.deepcopy(reference).to(device)
    forward, optimizer = engine(model, config)
    generator = torch.Generator().manual_seed(1)
    out = model.output_size(tile)
    x = torch.rand(1, 1, tile, tile, generator=generator)
    y = (torch.rand(1, out, out, generator=generator) > 0.5).long()
    w = 1 + torch.rand(1, out, out, generator=generator)
    logits = forward(x.to(device))
    optimizer.zero_grad()
    weighted_cross_entropy(logits, y.to(device), w.to(device)).backward()
    gradients = torch.cat([p.grad.flatten() for p in model.parameters()])
    optimizer.step()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return [t.detach().double().cpu() for t in (logits, gradients, weights)]


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("device", DEVICES)
def test_fast_engine_computes_the_plain_step(device, monkeypatch):
    """The fast engine (channels_last, fused SGD) changes how the step runs, not what it computes: in fp32 it
    agrees with the plain step to rounding; in bf16 it is as far from the fp32 step as plain bf16 is."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 on a GPU too
    torch.manual_seed(0)
    network, tile = dict(base_channels=8, dropout=0.0), 252
    reference = UNet(**network)
    config = TrainConfig(tile=tile, learning_rate=1e-3, network=network)
    step = {(e, p): _one_step(reference, dataclasses.replace(config, engine=e, precision=p), tile, device)
            for e in ("plain", "fast") for p in ("fp32", "bf16")}
    exact = 1e-5 if device == "cpu" else 1e-4  # cuDNN picks other algorithms for the two layouts
    for plain, fast in zip(step["plain", "fp32"], step["fast", "fp32"]):  # logits, gradients, updated weights
        assert _relative(fast, plain) < exact
    (logits, gradients, _), (plain_logits, plain_gradients, _) = step["fast", "bf16"], step["plain", "bf16"]
    assert _relative(logits, step["plain", "fp32"][0]) < 2e-2
    assert _relative(logits, step["plain", "fp32"][0]) < 1.25 * _relative(plain_logits, step["plain", "fp32"][0])
    assert _relative(gradients, step["plain", "fp32"][1]) < 1.25 * _relative(plain_gradients, step["plain", "fp32"][1])


def test_compiled_network_computes_the_plain_step():
    """``compile`` (torch.compile of the network, here on the CPU) gives the eager step's logits and gradients."""
    torch.manual_seed(0)
    network = dict(base_channels=4, depth=2, dropout=0.0)
    reference, config = UNet(**network), TrainConfig(tile=92, network=network)
    plain = _one_step(reference, dataclasses.replace(config, engine="plain"), 92, "cpu")
    compiled = _one_step(reference, dataclasses.replace(config, compile="default"), 92, "cpu")
    for a, b in zip(compiled, plain):
        assert _relative(a, b) < 1e-5


def test_engine_and_compile_are_checked():
    with pytest.raises(ValueError, match="engine must be one of"):
        TrainConfig(engine="turbo")
    with pytest.raises(ValueError, match="compile must be None or one of"):
        TrainConfig(compile="fast")
