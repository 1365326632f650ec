"""Training (Sec. 3): the loss goes down, resume is exact, bad checkpoints and NaN are caught,
and the fast engine computes the plain step."""
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from ronneberger2015 import training as train_module
from ronneberger2015.__main__ import main
from ronneberger2015.augment import Augmenter
from ronneberger2015.io import load_checkpoint, write_tiff
from ronneberger2015.loss import weighted_cross_entropy
from ronneberger2015.metrics import vrand
from ronneberger2015.network import UNet
from ronneberger2015.runtime import resolve_device
from ronneberger2015.tiling import load_model, predict
from ronneberger2015.training import PRESETS, TrainConfig, TrainingDiverged, forward_and_optimizer, train
from ronneberger2015.weightmap import separate_instances, target_and_weights

pytestmark = pytest.mark.filterwarnings("ignore::ronneberger2015.training.TrainingWarning")  # tiny runs do not learn

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

TINY = TrainConfig(iterations=20, input_tile=92, learning_rate=0.01, log_every=5, checkpoint_every=10,
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


@pytest.mark.slow
def test_smoke_lowers_the_loss(isbi, tmp_path):
    """The smoke preset with a tiny network, on 2 ISBI slices: the loss on fixed tiles drops.

    With this seed both engines end near 0.53x the initial loss; other seeds
    of so narrow a network can stay at the constant prediction for longer."""
    config = dataclasses.replace(PRESETS["smoke"], iterations=300, input_tile=124, log_every=10, checkpoint_every=50,
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


@pytest.mark.cuda
def test_cuda_run_resumes_validates_and_never_waits_for_the_host(two_slices, isbi, tmp_path):
    """On the GPU: a training step queues its work without a host-device synchronisation; a run validated on
    held-out crops and resumed from its checkpoint (the CUDA generators restored) reaches the weights of an
    uninterrupted run, up to cuDNN's choice of kernels."""
    stacks = train_module._stacks(*two_slices, TINY, torch.device("cuda"))
    model = UNet(**TINY.network).cuda().train()
    forward, optimizer = forward_and_optimizer(model, TINY)
    augmenter = Augmenter(TINY.input_tile, model.output_size(TINY.input_tile))
    generator = torch.Generator("cuda").manual_seed(0)
    train_module.training_step(forward, optimizer, augmenter, stacks, generator)  # warm-up: cuDNN's set-up syncs
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_module.training_step(forward, optimizer, augmenter, stacks, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    held_out = (isbi.train_images[20:22, :128, :128], isbi.train_labels[20:22, :128, :128])
    config = dataclasses.replace(TINY, validate_every=10)
    straight = train(*two_slices, tmp_path / "a", config, validation=held_out, device="cuda", progress=False)
    train(*two_slices, tmp_path / "b", dataclasses.replace(config, iterations=10), validation=held_out,
          device="cuda", progress=False)
    resumed = train(*two_slices, tmp_path / "b", config, validation=held_out, device="cuda", resume=True,
                    progress=False)
    for name, value in _weights(straight).items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-3, atol=1e-5, msg=name)
    rows = [row for row in train_module.read_log(tmp_path / "b" / "log.csv") if "vrand" in row]
    assert [row["iteration"] for row in rows] == [10, 20] and all(0 <= row["vrand"] <= 1 for row in rows)
    assert (tmp_path / "b" / "best.pt").is_file()


def test_learning_rate_steps(two_slices, tmp_path):
    """lr_steps (Caffe's "multistep"): the rate drops by lr_gamma after each listed iteration. A run with a step
    at 10 reaches the weights of a run that stops at 10 and is resumed with the lower rate; the log records
    each iteration's rate, and a resumed run continues the schedule."""
    config = dataclasses.replace(TINY, lr_steps=(10,), lr_gamma=0.1)
    assert [config.rate_at(i) for i in (1, 10, 11, 20)] == [0.01, 0.01, pytest.approx(0.001), pytest.approx(0.001)]
    assert TrainConfig(learning_rate=1.0, lr_steps=[2, 4]).rate_at(5) == pytest.approx(0.01)  # a list from JSON
    stepped = train(*two_slices, tmp_path / "a", config, device="cpu", progress=False)
    train(*two_slices, tmp_path / "b", dataclasses.replace(TINY, iterations=10), device="cpu", progress=False)
    lowered = train(*two_slices, tmp_path / "b", dataclasses.replace(TINY, learning_rate=0.001), device="cpu",
                    resume=True, progress=False)
    for name, value in _weights(stepped).items():
        assert torch.equal(value, lowered.state_dict()[name]), name
    rates = np.loadtxt(tmp_path / "a" / "log.csv", delimiter=",", skiprows=1)[:, 2]
    assert rates[:10].tolist() == [0.01] * 10 and rates[10:] == pytest.approx([0.001] * 10)
    train(*two_slices, tmp_path / "c", dataclasses.replace(config, iterations=15), device="cpu", progress=False)
    resumed = train(*two_slices, tmp_path / "c", config, device="cpu", resume=True, progress=False)
    for name, value in _weights(stepped).items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    with pytest.raises(ValueError, match="lr_steps must be"):
        TrainConfig(lr_steps=(0,))
    with pytest.raises(ValueError, match="lr_gamma in"):
        TrainConfig(lr_gamma=2.0)


def test_learning_rate_steps_from_the_command_line(two_slices, tmp_path):
    write_tiff(tmp_path / "i.tif", two_slices[0])
    write_tiff(tmp_path / "l.tif", two_slices[1])
    assert main(["train", str(tmp_path / "i.tif"), str(tmp_path / "l.tif"), "-o", str(tmp_path / "run"), "--preset",
                 "smoke", "--base-channels", "4", "--depth", "3", "--input-tile", "92", "--iterations", "50",
                 "--lr", "0.01", "--lr-steps", "25", "--lr-gamma", "0.5", "--device", "cpu"]) == 0
    rates = np.loadtxt(tmp_path / "run" / "log.csv", delimiter=",", skiprows=1, usecols=2)
    assert rates.tolist() == [0.01] * 25 + [0.005] * 25
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["lr_steps"] == [25] and config["config"]["lr_gamma"] == 0.5


def _as_version_0_1(checkpoint: dict) -> dict:
    """The checkpoint as version 0.1 wrote it: expansive-path keys upconv.i.* and up.i.k.*, and the parameters
    (hence the optimizer's positions) ordered contracting path, up-convolutions, their convolutions, head."""
    names = list(checkpoint["model"])
    part = [next(i for i, kind in enumerate(("down.", ".upconv.", ".convs.", "head.")) if kind in name)
            for name in names]
    earlier_order = sorted(range(len(names)), key=lambda i: part[i])  # stable: keeps each part's own order
    position = {now: before for before, now in enumerate(earlier_order)}

    def earlier(name):
        if ".upconv." in name:
            return name.replace(".upconv.", ".").replace("up.", "upconv.", 1)
        return name.replace(".convs.", ".")

    model = {earlier(names[i]): checkpoint["model"][names[i]] for i in earlier_order}
    (group,) = checkpoint["optimizer"]["param_groups"]
    optimizer = {"state": {position[i]: s for i, s in checkpoint["optimizer"]["state"].items()},
                 "param_groups": [{**group, "params": list(range(len(names)))}]}
    return {**checkpoint, "model": model, "optimizer": optimizer}


def test_resume_from_a_checkpoint_of_version_0_1(two_slices, tmp_path):
    """torch matches momentum to parameters by position; a run checkpointed by version 0.1, whose positions
    differ, continues with each momentum on its own parameter (it used to crash in the fused step)."""
    straight = train(*two_slices, tmp_path / "a", TINY, device="cpu", progress=False)
    train(*two_slices, tmp_path / "b", dataclasses.replace(TINY, iterations=10), device="cpu", progress=False)
    checkpoint = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    torch.save(_as_version_0_1(checkpoint), tmp_path / "b" / "checkpoint.pt")
    resumed = train(*two_slices, tmp_path / "b", TINY, device="cpu", resume=True, progress=False)
    for name, value in _weights(straight).items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_existing_run_needs_resume(two_slices, tmp_path):
    config = dataclasses.replace(TINY, iterations=5, checkpoint_every=5)
    train(*two_slices, tmp_path, config, device="cpu", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(*two_slices, tmp_path, config, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"other settings \(seed, w0\)"):
        train(*two_slices, tmp_path, dataclasses.replace(config, iterations=10, seed=3, w0=5.0), device="cpu",
              resume=True, progress=False)
    with pytest.raises(ValueError, match="has already trained 5 iterations"):
        train(*two_slices, tmp_path, config, device="cpu", resume=True, progress=False)


def test_corrupt_checkpoint_is_named(two_slices, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x02 half a pickle")
    with pytest.raises(ValueError, match="checkpoint.pt cannot be read.*corrupt"):
        train(*two_slices, tmp_path, TINY, device="cpu", resume=True, progress=False)


def test_nan_stops_and_keeps_last_good_checkpoint(two_slices, tmp_path, monkeypatch):
    calls = []

    def failing_loss(logits, target, weight):
        calls.append(torch.is_grad_enabled())  # training steps; the checkpoint's own check runs without grad
        loss = train_module.weighted_cross_entropy.__wrapped__(logits, target, weight)
        return loss * float("nan") if sum(calls) > 12 else loss

    failing_loss.__wrapped__ = train_module.weighted_cross_entropy
    monkeypatch.setattr(train_module, "weighted_cross_entropy", failing_loss)
    with pytest.raises(TrainingDiverged, match=r"nan at iteration 13;.*iteration 10\) is kept"):
        train(*two_slices, tmp_path, TINY, device="cpu", progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 10


def test_invalid_tile_names_neighbours():
    with pytest.raises(ValueError, match="nearest valid sizes are 556"):
        TrainConfig(input_tile=570)


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
                 "--preset", "smoke", "--iterations", "3", "--input-tile", "188", "--device", "cpu",
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
                 "--preset", "smoke", "--iterations", "1", "--input-tile", "188", "--device", "cpu", "--instances",
                 "--val", str(tmp_path / "i.tif"), str(tmp_path / "l.tif")])
    assert code == 0 and "vinfo" in capsys.readouterr().out
    scores = json.loads((tmp_path / "run" / "metrics.json").read_text())
    probabilities = predict(load_model(tmp_path / "run" / "checkpoint.pt"), images)[:, 1]
    separated, merged = separate_instances(labels) > 0, labels > 0
    assert scores["vrand"] == pytest.approx(vrand(probabilities, separated))
    assert vrand(probabilities, separated) != pytest.approx(vrand(probabilities, merged))  # the separation matters


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
    forward, optimizer = forward_and_optimizer(model, config)
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
    config = TrainConfig(input_tile=tile, learning_rate=1e-3, network=network)
    step = {(e, p): _one_step(reference, dataclasses.replace(config, engine=e, precision=p), tile, device)
            for e in ("plain", "fast") for p in ("fp32", "bf16")}
    exact = 1e-5 if device == "cpu" else 1e-4  # cuDNN picks other algorithms for the two layouts
    for plain, fast in zip(step["plain", "fp32"], step["fast", "fp32"]):  # logits, gradients, updated weights
        assert _relative(fast, plain) < exact
    (logits, gradients, _), (plain_logits, plain_gradients, _) = step["fast", "bf16"], step["plain", "bf16"]
    assert _relative(logits, step["plain", "fp32"][0]) < 2e-2
    assert _relative(logits, step["plain", "fp32"][0]) < 1.25 * _relative(plain_logits, step["plain", "fp32"][0])
    assert _relative(gradients, step["plain", "fp32"][1]) < 1.25 * _relative(plain_gradients, step["plain", "fp32"][1])


@pytest.mark.slow
def test_compiled_network_computes_the_plain_step():
    """``compile`` (torch.compile of the network, here on the CPU) gives the eager step's logits and gradients."""
    torch.manual_seed(0)
    network = dict(base_channels=4, depth=2, dropout=0.0)
    reference, config = UNet(**network), TrainConfig(input_tile=92, network=network)
    plain = _one_step(reference, dataclasses.replace(config, engine="plain"), 92, "cpu")
    compiled = _one_step(reference, dataclasses.replace(config, compile="default"), 92, "cpu")
    for a, b in zip(compiled, plain):
        assert _relative(a, b) < 1e-5


def test_engine_and_compile_are_checked():
    with pytest.raises(ValueError, match="engine must be one of"):
        TrainConfig(engine="turbo")
    with pytest.raises(ValueError, match="compile must be None or one of"):
        TrainConfig(compile="fast")


# ---------------------------------------------------------------------------
# Validation during training, best.pt, and the end-of-run diagnosis


def _validated(two_slices, isbi, tmp_path, config):
    validation = (isbi.train_images[20:21, :128, :128], isbi.train_labels[20:21, :128, :128])
    return train(*two_slices, tmp_path, config, validation=validation, device="cpu", progress=False)


def test_validation_logs_scores_keeps_the_best_and_changes_nothing(two_slices, isbi, tmp_path):
    config = dataclasses.replace(TINY, validate_every=5, select_by="pixel_error")
    plain = train(*two_slices, tmp_path / "plain", config, device="cpu", progress=False)
    validated = _validated(two_slices, isbi, tmp_path / "validated", config)
    for name, value in _weights(plain).items():  # validation draws no random numbers and restores the layout
        assert torch.equal(value, validated.state_dict()[name]), name
    rows = train_module.read_log(tmp_path / "validated" / "log.csv")
    scored = [row for row in rows if "vrand" in row]
    assert [row["iteration"] for row in scored] == [5, 10, 15, 20]
    assert set(scored[0]) >= {"vrand", "vinfo", "rand_error", "pixel_error", "warping_error", "iou", "dice"}
    best = min(scored, key=lambda row: row["pixel_error"])  # the first of equals: only a strict gain replaces it
    saved = load_checkpoint(tmp_path / "validated" / "best.pt")
    assert saved["iteration"] == best["iteration"] and saved["scores"]["pixel_error"] == best["pixel_error"]
    assert train_module.read_log(tmp_path / "plain" / "log.csv")[0].keys() == {"iteration", "loss", "learning_rate"}


def test_resume_keeps_validation_and_best(two_slices, isbi, tmp_path):
    config = dataclasses.replace(TINY, validate_every=5)
    _validated(two_slices, isbi, tmp_path / "a", config)
    _validated(two_slices, isbi, tmp_path / "b", dataclasses.replace(config, iterations=10))
    train(*two_slices, tmp_path / "b", config, validation=(isbi.train_images[20:21, :128, :128],
          isbi.train_labels[20:21, :128, :128]), device="cpu", resume=True, progress=False)
    assert (tmp_path / "a" / "log.csv").read_text() == (tmp_path / "b" / "log.csv").read_text()
    best = [load_checkpoint(tmp_path / run / "best.pt")["iteration"] for run in ("a", "b")]
    assert best[0] == best[1]


def test_instance_labels_are_validated_with_seg(tmp_path):
    """With cell ids, SEG of the cells at 0.5 is logged beside the ISBI scores and can choose best.pt."""
    from ronneberger2015 import label_cells, metrics, predict

    labels = np.zeros((2, 96, 96), np.uint16)
    labels[:, 10:50, 10:50], labels[:, 10:50, 50:80], labels[1, 60:90, 20:60] = 4, 7, 9  # 4 and 7 touch
    images = np.where(labels > 0, 170, 60).astype(np.uint8)
    config = dataclasses.replace(TINY, validate_every=10, select_by="seg")
    model = train(images, labels, tmp_path / "run", config, validation=(images, labels), device="cpu", progress=False)
    rows = [row for row in train_module.read_log(tmp_path / "run" / "log.csv") if "seg" in row]
    assert [row["iteration"] for row in rows] == [10, 20] and "vrand" in rows[0]
    cells = label_cells(predict(model, images, device="cpu")[:, 1])
    assert rows[-1]["seg"] == pytest.approx(metrics.seg(cells, labels))
    assert load_checkpoint(tmp_path / "run" / "best.pt")["scores"]["seg"] == max(row["seg"] for row in rows)
    with pytest.raises(ValueError, match="select_by seg scores cells against their ids"):
        train(images, labels, tmp_path / "binary", config, validation=(images, (labels > 0) * 255), device="cpu",
              progress=False)
    assert not (tmp_path / "binary").exists()


def test_empty_validation_slice_is_refused_before_training(two_slices, tmp_path):
    images = np.zeros((2, 64, 64), np.uint8)
    with pytest.raises(ValueError, match=r"validation slice\(s\) \[1\] have no cell"):
        train(*two_slices, tmp_path, TINY, validation=(images, np.stack([np.full((64, 64), 255), np.zeros((64, 64))])),
              device="cpu", progress=False)
    assert not tmp_path.joinpath("config.json").exists()


def test_diagnose_names_a_flat_loss_and_a_constant_output():
    from ronneberger2015.validation import diagnose

    falling = list(np.linspace(1.2, 0.6, 200))
    assert diagnose(falling, 0.4) == []
    flat = list(1.1 + 0.01 * np.sin(np.arange(200)))
    assert [w.split(":")[0] for w in diagnose(flat, 0.4)] == ["the loss has not fallen"]
    assert [w.split(" (")[0] for w in diagnose(falling, 0.001)] == ["the output is near-constant"]
    assert diagnose(flat[:50], 0.4) == []  # too short to judge


def test_a_run_that_does_not_learn_ends_with_a_warning(two_slices, tmp_path):
    config = dataclasses.replace(TINY, iterations=120, learning_rate=1e-12, checkpoint_every=60)
    with pytest.warns(train_module.TrainingWarning, match="the loss has not fallen"):
        train(*two_slices, tmp_path, config, device="cpu", progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iterations"] == 120 and any("not fallen" in w for w in summary["warnings"])


# ---------------------------------------------------------------------------
# Faults: divergence, a full disk, kills, refused runs


def test_divergence_keeps_only_a_checkpoint_that_predicts(two_slices, tmp_path):
    from ronneberger2015.tiling import load_model, predict

    """lr 1.0 makes NaN at iteration 4; with a checkpoint after every step, the one kept still predicts."""
    config = dataclasses.replace(TINY, iterations=8, learning_rate=1.0, log_every=1, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="resume and a lower --lr"):
        train(*two_slices, tmp_path, config, device="cpu", progress=False)
    assert np.isfinite(predict(load_model(tmp_path / "checkpoint.pt"), two_slices[0][0])).all()
    lower = dataclasses.replace(config, learning_rate=1e-3)
    train(*two_slices, tmp_path, lower, device="cpu", resume=True, progress=False)
    history = json.loads((tmp_path / "config.json").read_text())["resumed"]
    assert history[-1]["config"]["learning_rate"] == 1e-3
    rates = [row["learning_rate"] for row in train_module.read_log(tmp_path / "log.csv")]
    assert rates[0] == 1.0 and rates[-1] == 1e-3 and len(rates) == 8


def test_a_checkpoint_is_kept_only_if_its_weights_give_a_finite_loss(two_slices, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module._Run, "gives_finite_loss", lambda run: run.iteration < 20)
    with pytest.raises(TrainingDiverged, match=r"weights after iteration 20 give a non-finite loss.*iteration 10\)"):
        train(*two_slices, tmp_path, TINY, device="cpu", progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 10


def test_full_disk_keeps_the_previous_checkpoint(two_slices, tmp_path, monkeypatch):
    import errno

    real_save, saves = torch.save, []

    def save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            with open(path, "wb") as out:
                out.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="no space left on device while writing .*checkpoint.pt"):
        train(*two_slices, tmp_path, TINY, device="cpu", progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 10
    assert not list(tmp_path.glob(".*.part"))


def test_resume_clears_temporary_files_and_log_rows_after_the_checkpoint(two_slices, tmp_path):
    train(*two_slices, tmp_path, dataclasses.replace(TINY, iterations=10), device="cpu", progress=False)
    (tmp_path / ".checkpoint.pt.123.abcd.part").write_bytes(b"x" * 100)  # a kill during a checkpoint write
    rows = (tmp_path / "log.csv").read_text()
    # a kill after the log, before the checkpoint
    (tmp_path / "log.csv").write_text(rows + "11,0.9,0.01\n12,0.9,0.01\n")
    train(*two_slices, tmp_path, TINY, device="cpu", resume=True, progress=False)
    train(*two_slices, tmp_path / "straight", TINY, device="cpu", progress=False)
    assert not list(tmp_path.glob(".*.part"))
    assert (tmp_path / "log.csv").read_text() == (tmp_path / "straight" / "log.csv").read_text()


def test_refused_runs_leave_the_run_folder_as_it_was(two_slices, tmp_path, capsys):
    write_tiff(tmp_path / "i.tif", two_slices[0])
    write_tiff(tmp_path / "l.tif", two_slices[1])
    run = ["train", str(tmp_path / "i.tif"), str(tmp_path / "l.tif"), "-o", str(tmp_path / "run"), "--preset", "smoke",
           "--base-channels", "4", "--depth", "3", "--input-tile", "92", "--iterations", "5", "--device", "cpu"]
    assert main(run) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert main(run + ["--lr", "0.01"]) == 2  # exists, no --resume
    assert main(run + ["--seed", "1", "--resume"]) == 2  # other settings
    assert main(run + ["--resume"]) == 2  # already trained 5
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    err = capsys.readouterr().err
    assert "pass --resume" in err and "other settings (seed)" in err and "already trained 5 iterations" in err


def test_resume_without_a_run_says_so(two_slices, tmp_path):
    with pytest.warns(train_module.TrainingWarning, match="does not exist, so a new run starts"):
        train(*two_slices, tmp_path, dataclasses.replace(TINY, iterations=5), device="cpu", resume=True, progress=False)


@pytest.mark.slow
def test_ctrl_c_names_the_resume_command(two_slices, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    write_tiff(tmp_path / "i.tif", two_slices[0])
    write_tiff(tmp_path / "l.tif", two_slices[1])
    command = [sys.executable, "-m", "ronneberger2015", "train", str(tmp_path / "i.tif"), str(tmp_path / "l.tif"),
               "-o", str(tmp_path / "run"), "--preset", "smoke", "--base-channels", "4", "--depth", "3",
               "--input-tile", "92", "--iterations", "100000", "--device", "cpu", "--threads", "1"]
    # A shell's background job starts with SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # the child gets the default disposition, as under a terminal.
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.getcwd()},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"no exit within 60 s of Ctrl-C; stderr: {process.communicate()[1][-2000:]}")
    assert process.returncode == 130
    assert "interrupted; the checkpoint of iteration" in err and "--resume" in err and "Traceback" not in err


def test_a_busy_machine_gets_a_note_and_threads_are_never_chosen_from_the_load(monkeypatch, capsys):
    from ronneberger2015 import commandline

    before = torch.get_num_threads()
    monkeypatch.setattr(commandline.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(commandline.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    commandline.set_threads(None, note_if_busy=True)
    assert "--threads 1 is often several times faster" in capsys.readouterr().err
    commandline.set_threads(None)  # short commands stay quiet
    assert capsys.readouterr().err == ""
    monkeypatch.undo()
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        commandline.set_threads(0)
