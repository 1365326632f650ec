"""Overlap-tile prediction of Zarr volumes with Dask (Fig. 2): equal to ``predict`` in memory, resumable."""
from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from ronneberger2015.__main__ import main
from ronneberger2015.network import UNet
from ronneberger2015.tiling import predict
from ronneberger2015.volume import DONE, RECORD, _block_shape, _reflect, is_zarr, names_zarr, predict_volume

zarr = pytest.importorskip("zarr", reason="the volume extra: pip install 'ronneberger2015[volume]'")
LocalCluster = pytest.importorskip("distributed", reason="the volume extra").LocalCluster

NETWORK = {"in_channels": 1, "num_classes": 2, "base_channels": 2, "depth": 3, "dropout": 0.5, "variant": "paper"}


@pytest.fixture(autouse=True)
def watchdog():
    """A test that hangs (a cluster that never answers) ends the run with tracebacks instead of stalling it."""
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def cluster():
    """An in-process Dask cluster: the distributed scheduler without process start-up; one worker thread
    and one torch thread, on which the tiny networks here run fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as local:
        yield local.scheduler_address
    torch.set_num_threads(threads)


def tiny(seed=0, model=UNet) -> UNet:
    torch.manual_seed(seed)
    return model(**NETWORK).eval()


def volume(path: Path, data: np.ndarray, chunks, **kwargs) -> Path:
    zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, **kwargs)[...] = data
    return path


def random_volume(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random(shape, dtype=np.float32) if dtype == np.float32 else rng.integers(0, 256, shape).astype(dtype)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model": tiny(seed=3).state_dict(), "config": {"network": NETWORK}}, path)
    return path


# Equality with predict in memory (Fig. 2)


def test_reflect_is_numpys_reflect_padding():
    for size in (1, 2, 5):
        index = np.arange(-13, size + 13)
        np.testing.assert_array_equal(_reflect(index, size), np.pad(np.arange(size), 13, mode="reflect"))


def test_default_blocks():
    """The input's chunk depth; in the plane, the first multiple of the step at least 2 (chunk + 2 border)."""
    assert _block_shape(None, (30, 9000, 9000), (4, 1024, 1024), (512, 512), 92) == (4, 2560, 2560)
    assert _block_shape(None, (500, 9000, 9000), (64, 64, 64), (992, 992), 92) == (64, 992, 992)
    assert _block_shape(None, (9000, 9000), (500, 300), (384, 384), 92) == (1, 1536, 1152)


@pytest.mark.parametrize("shape, dtype, chunks, tile, block", [
    ((3, 157, 203), np.uint8, (2, 50, 70), 44, (2, 80, 80)),  # 157 = 80 + 77; 3 slices = 2 + 1
    ((83, 100), np.float32, (40, 40), 44, 40),          # the last tile starts in the block before its own (100),
                                                        # and writes past its block (83 = 2 * 40 + 3)
    ((2, 9, 30), np.uint16, (1, 9, 30), None, None),    # smaller than the border: mirrored repeatedly;
                                                        # default blocks
])
@pytest.mark.parametrize("tta", [False, True])
def test_equals_predict_in_memory(tmp_path, cluster, shape, dtype, chunks, tile, block, tta):
    model, data = tiny(), random_volume(shape, dtype)
    source = volume(tmp_path / "in.zarr", data, chunks)
    out = predict_volume(model, source, tmp_path / "out.zarr", output_tile=tile, block=block, tta=tta,
                         scheduler=cluster)
    assert out.shape == shape and out.dtype == np.float32 and out.attrs[RECORD]["complete"]
    np.testing.assert_allclose(out[...], predict(model, data, output_tile=tile, tta=tta)[..., 1, :, :], atol=1e-5)
    assert not (tmp_path / "out.zarr" / DONE).exists()


def test_uint8_output_and_membrane_class(tmp_path, cluster):
    model, data = tiny(), random_volume((2, 70, 50))
    source = volume(tmp_path / "in.zarr", data, (1, 32, 32))
    out = predict_volume(model, source, tmp_path / "out.zarr", dtype="uint8", class_index=0, output_tile=28,
                         scheduler=cluster)
    assert out.dtype == np.uint8
    expected = np.rint(predict(model, data, output_tile=28)[:, 0] * 255)
    assert np.abs(out[...] - expected).max() <= 1  # float rounding can flip a .5


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_metadata_is_copied(tmp_path, cluster, version):
    """The full-resolution dataset is read; the output is an OME-Zarr image with that dataset's geometry."""
    model, data = tiny(), random_volume((2, 40, 52))
    fmt = 2 if version == "0.4" else 3
    axes = [{"name": "z", "type": "space", "unit": "nanometer"}, {"name": "y", "type": "space", "unit": "nanometer"},
            {"name": "x", "type": "space", "unit": "nanometer"}]
    image = {"axes": axes, "datasets": [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [50.0, 4.0, 4.0]}]},
        {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [50.0, 8.0, 8.0]}]}]}
    attributes = ({"multiscales": [{"version": "0.4", **image}]} if fmt == 2
                  else {"ome": {"version": "0.5", "multiscales": [image]}})
    group = zarr.create_group(str(tmp_path / "in.zarr"), zarr_format=fmt, attributes={**attributes, "omero": {}})
    names = {"dimension_names": ["z", "y", "x"]} if fmt == 3 else {}
    group.create_array("s0", shape=data.shape, chunks=(1, 20, 26), dtype=np.uint8, **names)[...] = data
    group.create_array("s1", shape=(2, 20, 26), chunks=(1, 20, 26), dtype=np.uint8, **names)

    predict_volume(model, tmp_path / "in.zarr", tmp_path / "out.zarr", scheduler=cluster)
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    ome = out.attrs.asdict() if fmt == 2 else out.attrs["ome"]
    assert out.metadata.zarr_format == fmt and "omero" not in out.attrs
    assert ome["multiscales"][0]["axes"] == axes and ome["multiscales"][0]["datasets"] == image["datasets"][:1]
    assert ome.get("version", ome["multiscales"][0].get("version")) == version
    assert list(out) == ["s0"]
    if fmt == 3:
        assert out["s0"].metadata.dimension_names == ("z", "y", "x")
    np.testing.assert_allclose(out["s0"][...], predict(model, data)[:, 1], atol=1e-5)


# Two worker processes, from the command line


def run_cli(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """``python -m ronneberger2015 predict ...`` in its own process group, all of it killed after ``timeout``."""
    process = subprocess.Popen([sys.executable, "-m", "ronneberger2015", "predict", *args], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_cli_two_worker_processes(tmp_path, checkpoint):
    data = random_volume((2, 75, 90))
    source = volume(tmp_path / "in.zarr", data, (1, 40, 40))
    result = run_cli(str(source), "-o", str(tmp_path / "out.zarr"), "--checkpoint", str(checkpoint),
                     "--workers", "2", "--device", "cpu", "--output-tile", "36", "--block", "64", "--tta")
    assert result.returncode == 0, result.stderr
    assert "8/8" in result.stderr  # the progress bar counts blocks: 2 slices x 2 x 2
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert out.chunks == (1, 64, 64)  # one slice of a block
    model = tiny(seed=3)
    np.testing.assert_allclose(out[...], predict(model, data, output_tile=36, tta=True)[:, 1], atol=1e-5)


# Resuming


class Failing(UNet):
    """Fails every forward pass after the first ``limit``."""

    calls, limit = 0, 0

    def forward(self, x):
        if Failing.calls >= Failing.limit:
            raise RuntimeError("injected failure")
        Failing.calls += 1
        return super().forward(x)


def counting(model: UNet) -> list:
    """The forward passes ``model`` runs from now on, as a growing list."""
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_resume_after_interruption(tmp_path, cluster):
    """Blocks finished before a failure are kept and skipped; the rest are computed on the second run."""
    data = random_volume((3, 60, 60))
    source = volume(tmp_path / "in.zarr", data, (1, 30, 30))
    options = {"output_tile": 28, "block": (1, 24, 24), "tta": True, "scheduler": cluster}  # one tile per block
    Failing.calls, Failing.limit = 0, 5 * 8  # 8 TTA passes per tile: 5 of the 27 blocks finish
    with pytest.raises(RuntimeError, match="injected failure"):
        predict_volume(tiny(model=Failing), source, tmp_path / "out.zarr", **options)
    assert len(os.listdir(tmp_path / "out.zarr" / DONE)) == 5
    assert not zarr.open_array(str(tmp_path / "out.zarr")).attrs[RECORD]["complete"]

    model = tiny()  # the same weights
    calls = counting(model)
    resumed = predict_volume(model, source, tmp_path / "out.zarr", **options)
    assert len(calls) == 22 * 8
    uninterrupted = predict_volume(tiny(), source, tmp_path / "once.zarr", **options)
    np.testing.assert_array_equal(resumed[...], uninterrupted[...])
    np.testing.assert_allclose(resumed[...], predict(tiny(), data, output_tile=28, tta=True)[:, 1], atol=1e-5)

    calls.clear()  # complete: nothing left to do
    predict_volume(model, source, tmp_path / "out.zarr", **options)
    assert not calls
    with pytest.raises(ValueError, match=r"other settings \(tta True there, False here\)"):
        predict_volume(model, source, tmp_path / "out.zarr", **{**options, "tta": False})
    with pytest.raises(ValueError, match="other settings \\(model "):
        predict_volume(tiny(seed=1), source, tmp_path / "out.zarr", **options)


# Bad inputs and a missing extra


def test_missing_extra_is_named(tmp_path, checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(ImportError, match=r"pip install 'ronneberger2015\[volume\]'"):
        predict_volume(checkpoint, tmp_path / "in.zarr", tmp_path / "out.zarr")
    assert main(["predict", str(tmp_path / "in.zarr"), "-o", str(tmp_path / "out.zarr"),
                 "--checkpoint", str(checkpoint)]) == 2
    assert "pip install 'ronneberger2015[volume]'" in capsys.readouterr().err


def test_package_imports_without_the_extra():
    code = ("import sys; sys.modules.update(zarr=None, dask=None, distributed=None); "
            "import ronneberger2015; print(ronneberger2015.predict_volume.__name__)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout == \
        "predict_volume\n"


def test_zarr_arguments_choose_the_volume_command(tmp_path):
    volume(tmp_path / "plain", np.zeros((4, 4), np.uint8), (4, 4))
    assert is_zarr("in.zarr/") and is_zarr("out.zarr") and is_zarr(tmp_path / "plain")
    assert not is_zarr(tmp_path) and not is_zarr("out.tif")
    assert names_zarr(["in.zarr", "-o", "x"]) and names_zarr(["a.tif", "-o", "out.zarr"])
    assert not names_zarr([str(tmp_path), "-o", "out.tif", "--checkpoint", "c.pt"])


def bad_case(tmp_path, case):
    """(model, source, target, options) for one bad input."""
    good = volume(tmp_path / "in.zarr", np.zeros((2, 60, 60), np.uint8), (1, 30, 30))
    if case == "tiff":
        tifffile.imwrite(tmp_path / "in.tif", np.zeros((8, 8), np.uint8))
        return tiny(), tmp_path / "in.tif", tmp_path / "out.zarr", {}
    if case == "missing":
        return tiny(), tmp_path / "nothing.zarr", tmp_path / "out.zarr", {}
    if case in ("1d", "4d"):
        shape = (30,) if case == "1d" else (1, 2, 20, 20)
        return tiny(), volume(tmp_path / "odd.zarr", np.zeros(shape, np.uint8), shape), tmp_path / "out.zarr", {}
    if case == "int32":
        return tiny(), volume(tmp_path / "i.zarr", np.zeros((8, 8), np.int32), (8, 8)), tmp_path / "out.zarr", {}
    if case == "group":
        zarr.create_group(str(tmp_path / "g.zarr"))
        return tiny(), tmp_path / "g.zarr", tmp_path / "out.zarr", {}
    if case == "same":
        return tiny(), good, good, {}
    if case == "inside":
        return tiny(), good, good / "prediction", {}
    if case == "foreign":
        return tiny(), good, volume(tmp_path / "other.zarr", np.zeros((2, 20, 20), np.uint8), (1, 20, 20)), {}
    if case == "channels":
        torch.manual_seed(0)
        return UNet(**{**NETWORK, "in_channels": 2}), good, tmp_path / "out.zarr", {}
    options = {"block": {"output_tile": 28, "block": 50}, "block3": {"block": (1, 2, 40, 40)},
               "dtype": {"dtype": "float16"},
               "class": {"class_index": 2}, "workers": {"workers": 2, "scheduler": "tcp://127.0.0.1:1"},
               "tile": {"output_tile": 30}}[case]
    return tiny(), good, tmp_path / "out.zarr", options


@pytest.mark.parametrize("case, error, message", [
    ("tiff", ValueError, r"in.tif is not a Zarr array \(no zarr.json or .zarray in it\)"),
    ("missing", FileNotFoundError, "no such Zarr array or OME-Zarr image"),
    ("1d", ValueError, r"expected a \(Y, X\) image or a \(Z, Y, X\) stack of slices, got shape \(30,\)"),
    ("4d", ValueError, r"got shape \(1, 2, 20, 20\)"),
    ("int32", ValueError, "dtype int32 is not supported"),
    ("group", ValueError, "a Zarr group without OME-Zarr multiscales metadata; give the path of the array"),
    ("same", ValueError, "is the input or lies inside it"),
    ("inside", ValueError, "is the input or lies inside it"),
    ("foreign", ValueError, "exists and holds no prediction of ronneberger2015"),
    ("channels", ValueError, "the model takes 2 input channels"),
    ("block", ValueError, "block side 50 is not a multiple of the tile step 24 .*; use 48 or 72"),
    ("block3", ValueError, r"block must be SIDE or \(HEIGHT, WIDTH\) or \(SLICES, HEIGHT, WIDTH\)"),
    ("dtype", ValueError, "dtype must be one of"),
    ("class", ValueError, r"class_index must be one of the model's classes 0..1"),
    ("workers", ValueError, "workers applies to the local cluster"),
    ("tile", ValueError, "valid output tiles near 30: 28 and 36"),
])
def test_bad_inputs(tmp_path, case, error, message):
    model, source, target, options = bad_case(tmp_path, case)
    existed = Path(target).exists()
    with pytest.raises(error, match=message):
        predict_volume(model, source, target, **options)
    assert Path(target).exists() == existed  # nothing written
