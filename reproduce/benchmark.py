"""``python -m reproduce.benchmark {weightmap,augment,predict,metrics,train,threads,volume}``

Each benchmark times our code against a plain baseline run in the same
process and prints the ratio; figures recorded in docs/performance.md come
from these commands. Speed is never asserted in the test suite.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


def timeit(function: Callable[[], object], *, repeat: int = 5, warmup: int = 1, device=None) -> float:
    """Median time of ``function()`` in milliseconds, after ``warmup`` calls.

    On a CUDA ``device`` each call is timed with CUDA events, from an idle
    device to the end of its work (host work inside the call counts too);
    elsewhere with the host clock.
    """
    import torch

    cuda = device is not None and device.type == "cuda"
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            function()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def _repeat(calls: int, function: Callable, *args, **kwargs) -> list:
    return [function(*args, **kwargs) for _ in range(calls)]


def _store(values: dict, name: str, function: Callable, *args) -> None:
    values[name] = function(*args)


def _device(args: argparse.Namespace):
    """The device to time on: ``--device``, else CUDA when available."""
    from ronneberger2015.runtime import resolve_device

    return resolve_device(args.device)


def _forward_flops(network: dict, side: int) -> int:
    """FLOPs (2 per multiply-add) of the convolutions in one forward pass of ``UNet(**network)`` on a
    side x side input, counted on the meta device (shapes only, no arithmetic)."""
    import torch
    from torch import nn

    from ronneberger2015.network import UNet

    flops = []

    def count(module, inputs, output):
        spatial = (inputs[0] if isinstance(module, nn.ConvTranspose2d) else output).shape[-2:].numel()
        flops.append(2 * module.in_channels * module.out_channels * module.weight[0, 0].numel() * spatial)

    model = UNet(**network).to("meta")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.empty(1, model.in_channels, side, side, device="meta"))
    return sum(flops)


def _gib(value: float | None) -> str:
    """A memory figure in GiB as the tables print it; '-' where none was measured (the CPU)."""
    return "-" if value is None else f"{value:.2f} GiB"


def _ratios(versus: dict) -> str:
    """The "vs fp32" and "vs bf16" columns: how many times faster than each plain baseline; '-' before it."""
    return " ".join(f"{v:>7.2f}x" if v is not None else f"{'-':>8}" for v in versus.values())


def _matmul_peak(device) -> tuple[float, str]:
    """FLOP/s of a large matrix product on ``device``, the floor's rate, and its dtype's name: bfloat16 on a
    GPU, float32 on the CPU."""
    import torch

    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (timeit(lambda: a @ a, repeat=5, device=device) / 1e3), str(dtype).removeprefix("torch.")


# BENCHMARKS: one function per subcommand, each taking the parsed arguments.


def bench_weightmap(args: argparse.Namespace) -> None:
    """Eq. 2 on the ISBI 2012 training labels, one CPU core: ``weight_map`` against the
    plain recipe (one full-image distance transform per cell), which it must equal."""
    import os

    import numpy as np
    from scipy import ndimage

    from ronneberger2015.data import load
    from ronneberger2015.weightmap import weight_map

    def brute_force(labels: np.ndarray) -> np.ndarray:
        cells, n = ndimage.label(labels != 0)
        background = cells == 0
        w_c = np.where(background, cells.size / (2 * background.sum()), cells.size / (2 * (~background).sum()))
        d1 = d2 = np.full(cells.shape, np.inf)
        for i in range(1, n + 1):
            d = ndimage.distance_transform_edt(cells != i)
            d1, d2 = np.minimum(d1, d), np.minimum(d2, np.maximum(d1, d))
        return (w_c + background * 10.0 * np.exp(-((d1 + d2) ** 2) / (2 * 5.0**2))).astype(np.float32)

    if hasattr(os, "sched_setaffinity"):  # numpy and scipy.ndimage run on one thread; pin it to one core
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    labels = load("train-labels.tif", args.data_dir)
    slices, brute_slices = (range(3), range(1)) if args.quick else (range(len(labels)), range(len(labels)))
    size = "x".join(map(str, labels.shape[1:]))
    print(f"weight map (Eq. 2, w0 = 10, sigma = 5) of ISBI 2012 train-labels, {size}, one CPU core")
    print(f"{'slice':>5} {'cells':>5} {'ours ms':>8} {'brute ms':>9} {'ratio':>6} {'max |diff|':>10}")
    ours_ms, brute_ms = [], []
    for z in slices:
        ours_ms.append(timeit(functools.partial(weight_map, labels[z]), repeat=3 if args.quick else 5))
        row = f"{z:>5} {ndimage.label(labels[z])[1]:>5} {ours_ms[-1]:>8.1f}"
        if z in brute_slices:  # seconds per slice: timed once
            start = time.perf_counter()
            reference = brute_force(labels[z])
            brute_ms.append((time.perf_counter() - start) * 1e3)
            diff = np.abs(weight_map(labels[z]) - reference).max()
            row += f" {brute_ms[-1]:>9.0f} {brute_ms[-1] / ours_ms[-1]:>6.1f} {diff:>10.2g}"
        print(row)
    ours, brute = statistics.mean(ours_ms), statistics.mean(brute_ms)
    print(f"mean over {len(ours_ms)} slices: ours {ours:.1f} ms per slice; brute force {brute:.0f} ms per slice "
          f"({len(brute_ms)} slices); ratio {brute / statistics.mean(ours_ms[: len(brute_ms)]):.0f}x")


def bench_augment(args: argparse.Namespace) -> dict:
    """Sec. 3.1: ms per 572 tile, ours (draw + warp image, labels, weights) vs scipy map_coordinates."""
    import torch
    from scipy import ndimage

    from ronneberger2015.augment import Augmenter

    device = _device(args)
    calls = 1 if device.type == "cpu" else (10 if args.quick else 100)  # queued calls per timing on a GPU
    if device.type == "cpu":
        torch.set_num_threads(1)  # as scipy: one core each
    repeat = 3 if args.quick else 10
    generator = torch.Generator(device).manual_seed(0)
    images = torch.rand(30, 512, 512, generator=generator, device=device)
    labels, weights = (images > 0.5).long(), 1 + images
    augmenter = Augmenter(572, 388)

    print(f"augmentation of 572x572 tiles (labels and weights 388x388), device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'method':<48} {'batch':>5} {'ms/tile':>9}")
    ours, rows = {}, []
    for batch in (1, 8):
        run = functools.partial(_repeat, calls, augmenter, images, labels, weights, batch_size=batch,
                                generator=generator)
        ours[batch] = timeit(run, repeat=repeat, device=device) / (calls * batch)
        rows.append({"method": "ours: Augmenter (bilinear image)", "batch": batch, "ms_per_tile": ours[batch]})
        print(f"{rows[-1]['method']:<48} {batch:>5} {ours[batch]:>9.3f}")
    params = augmenter.draw(1, images.shape, generator=generator)
    positions = augmenter.coordinates(params)[0].cpu().numpy()
    source = images[params.slice_index].cpu().numpy()[0]
    for order in (3, 1):
        warp = functools.partial(ndimage.map_coordinates, source, positions, order=order, mode="mirror")
        ms = timeit(warp, repeat=1 if args.quick else 5)
        rows.append({"method": f"scipy map_coordinates, order {order}, image only", "batch": 1, "ms_per_tile": ms})
        print(f"{rows[-1]['method']:<48} {1:>5} {ms:>9.3f}"
              f"   ({ms / ours[1]:.1f}x ours at batch 1, {ms / ours[8]:.1f}x at batch 8)")
    return {"device": str(device), "torch_threads": torch.get_num_threads(), "calls_per_timing": calls,
            "rows": rows}


def bench_predict(args: argparse.Namespace) -> dict:
    """Fig. 2: ms per 512x512 slice of ``predict`` on a stack, with and without TTA, against one plain
    forward pass per mirrored slice (torch's default NCHW layout; ``predict`` runs channels_last), in fp32
    (TF32 off) and bf16 autocast; then the largest network input and the memory as the image grows."""
    import numpy as np
    import torch

    from ronneberger2015.network import UNet
    from ronneberger2015.tiling import predict

    device = _device(args)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if not cuda:
        torch.set_num_threads(1)  # steadier figures on a shared machine; ratios are what count
    torch.manual_seed(0)
    network = {"base_channels": 2} if args.quick else {}  # the paper's network unless --quick
    model = UNet(**network).to(device).eval()
    # The paper's network takes seconds per slice on a CPU: there, time 2 slices once and report per slice.
    slices = 10 if cuda else 2
    repeat, warmup = (5, 1) if cuda else (1, 1) if args.quick else (1, 0)
    stack = np.random.default_rng(0).integers(0, 256, (slices, 512, 512), dtype=np.uint8)
    border = model.border
    extra = 700 - 512 - 2 * border  # 512 + 2 * 92 = 696 is no valid input side; 700 is

    def plain(precision: str, images=stack) -> None:
        """What one would write without tiling: mirror each slice to 700x700, one forward pass each."""
        model.to(memory_format=torch.contiguous_format)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for image in images:
                padded = np.pad(image / np.float32(255), (border, border + extra), mode="reflect")
                logits = model(torch.from_numpy(padded)[None, None].to(device))
                torch.softmax(logits.float(), dim=1)[0, :, :512, :512].cpu().numpy()

    def peak(function: Callable[[], object]) -> float | None:
        if not cuda:
            return None
        torch.cuda.reset_peak_memory_stats(device)
        function()
        return torch.cuda.max_memory_allocated(device) / 2**30

    slice_flops = _forward_flops(network, 700)  # one pass over a mirrored slice
    rate, rate_dtype = _matmul_peak(device)
    floor = slice_flops / rate * 1e3
    print(f"predict: UNet({', '.join(f'{k}={v}' for k, v in network.items())}) on {device} "
          f"(torch threads {torch.get_num_threads()}), stack of {slices} random 512x512 uint8 slices, "
          f"median of {repeat} after {warmup} warm-up; {slice_flops / 1e12:.3g} TFLOP per pass over a slice; "
          f"measured peak {rate / 1e12:.3g} TFLOP/s ({rate_dtype} matrix product), "
          f"floor {floor:.3g} ms per pass")
    print(f"{'method':<36} {'precision':>9} {'ms/slice':>9} {'TFLOP/s':>8} {'vs fp32':>8} {'vs bf16':>8} "
          f"{'x floor':>8} {'peak GPU':>9}")
    baselines, rows = {}, []

    def row(name: str, precision: str, ms: float, memory: float | None, passes: int = 1) -> None:
        versus = {p: baselines[p] / ms if p in baselines else None for p in ("fp32", "bf16")}
        rows.append({"method": name, "precision": precision, "ms_per_slice": ms, "passes": passes,
                     "tflops": passes * slice_flops / ms / 1e9, "vs_plain_fp32": versus["fp32"],
                     "vs_plain_bf16": versus["bf16"], "x_floor": ms / (passes * floor), "peak_gpu_gib": memory})
        print(f"{name:<36} {precision:>9} {ms:>9.2f} {rows[-1]['tflops']:>8.3g} {_ratios(versus)} "
              f"{ms / (passes * floor):>8.1f} {_gib(memory):>9}")

    for precision in ("fp32", "bf16"):
        if warmup == 0:  # the CPU's one-time set-up of each layout and precision, outside the single timing
            plain(precision, stack[:1])
            predict(model, stack[:1], precision=precision)
        baselines[precision] = timeit(functools.partial(plain, precision), repeat=repeat, warmup=warmup,
                                      device=device) / slices
        row("plain: one pass per mirrored slice", precision, baselines[precision],
            peak(functools.partial(plain, precision)))
        for tta in (False, True):
            run = functools.partial(predict, model, stack, tta=tta, precision=precision)
            ms = timeit(run, repeat=repeat, warmup=warmup, device=device) / slices
            row(f"predict(tta={tta})", precision, ms, peak(run), passes=8 if tta else 1)
    print("vs fp32 / vs bf16: how many times faster than the plain pass (above 1 is faster; TTA does 8 passes)")

    # Memory against image size: the network only ever sees bounded batches of tiles.
    if cuda:
        sweep, options = model, {"precision": "bf16"}
    else:
        sweep, options = UNet(base_channels=2).eval(), {"memory_budget": (8 if args.quick else 32) * 2**20}
    shapes = []
    sweep.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
    print(f"\nimage size against memory: UNet(base_channels={sweep.base_channels}) on {device}, {options}")
    print(f"{'image':>12} {'seconds':>8} {'largest forward input':>22} {'result (host)':>14} {'peak GPU':>9}")
    sizes = []
    for side in (600, 1200) if args.quick else (1024, 4096, 10000):
        shapes.clear()
        image = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
        run = functools.partial(predict, sweep, image, device=device, **options)
        seconds = timeit(run, repeat=1, warmup=0, device=device) / 1e3
        sizes.append({"side": side, "seconds": seconds, "largest_input": list(max(shapes)),
                      "result_gib": 2 * side * side * 4 / 2**30, "peak_gpu_gib": peak(run)})
        print(f"{f'{side}x{side}':>12} {seconds:>8.1f} {str(max(shapes)):>22} "
              f"{sizes[-1]['result_gib']:>10.2f} GiB {_gib(sizes[-1]['peak_gpu_gib']):>9}")
    return {"network": network, "device": str(device), "torch_threads": torch.get_num_threads(), "slices": slices,
            "repeat": repeat, "warmup": warmup, "pass_tflop": slice_flops / 1e12, "peak_tflops": rate / 1e12,
            "peak_dtype": rate_dtype, "floor_ms": floor, "rows": rows, "sizes": sizes}


def bench_metrics(args: argparse.Namespace) -> None:
    """Sec. 4: seconds for each ISBI metric on the 10 held-out training slices (20-29) against a
    deterministic proposal (the labels blurred, plus smooth noise); baseline: skimage's adapted
    Rand error over the same threshold sweep of 4-connected label images; then the warping error
    of the whole 30-slice stack, and the thinning against skimage's watershed with lines."""
    import numpy as np
    from scipy import ndimage
    from skimage.measure import label
    from skimage.metrics import adapted_rand_error
    from skimage.segmentation import watershed

    from ronneberger2015 import metrics
    from ronneberger2015.data import load

    stack = load("train-labels.tif", args.data_dir)
    stack = np.concatenate([stack[20:], stack[:20]])  # the held-out slices 20-29 first
    if args.quick:
        stack = stack[:3, :256, :256]
    noise = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(stack.shape), (0, 2, 2))
    stack_proposal = np.clip(ndimage.gaussian_filter((stack > 0).astype(float), (0, 2, 2)) + 0.75 * noise, 0.0, 1.0)
    held_out = 2 if args.quick else 10
    truth, proposal = stack[:held_out], stack_proposal[:held_out]
    inside = truth > 0
    repeat = 1 if args.quick else 3
    print(f"ISBI 2012 metrics of train-labels slices 20-{19 + len(truth)} ({truth.shape[1]}x{truth.shape[2]}), "
          f"proposal = labels blurred + smooth noise; median of {repeat} runs")
    print(f"{'metric':<18} {'value':>10} {'seconds':>8}")
    values, seconds = {}, {}
    for name, (label_text, _) in metrics.METRICS.items():
        function = getattr(metrics, name)
        seconds[name] = timeit(functools.partial(_store, values, name, function, proposal, truth), repeat=repeat,
                               warmup=0) / 1e3
        print(f"{label_text:<18} {values[name]:>10.6f} {seconds[name]:>8.2f}")
    total = timeit(lambda: metrics.evaluate(proposal, truth), repeat=repeat, warmup=0) / 1e3
    print(f"{'all five: evaluate':<18} {'':>10} {total:>8.2f}   (V_rand and V_info share the thinning)")
    objects = [label(mask, connectivity=1) for mask in inside]
    baseline = timeit(
        lambda: [adapted_rand_error(objects[z], label(proposal[z] > th, connectivity=1))
                 for th in metrics.SWEEP for z in range(len(truth))],
        repeat=repeat,
        warmup=0,
    ) / 1e3
    print(f"Rand error, {len(metrics.SWEEP)} thresholds: ours {seconds['rand_error']:.2f} s, "
          "skimage adapted_rand_error "
          f"{baseline:.2f} s (ratio {baseline / seconds['rand_error']:.1f})")
    whole = timeit(functools.partial(_store, values, "stack", metrics.warping_error, stack_proposal, stack),
                   repeat=repeat, warmup=0) / 1e3
    print(f"warping error of all {len(stack)} slices: {values['stack']:.6f} in {whole:.2f} s")
    masks = [(proposal[z] > th, inside[z]) for th in metrics.SWEEP for z in range(len(truth))]
    thinned = {}
    ours = timeit(lambda: thinned.__setitem__("ours", [metrics.thin(mask) for mask, _ in masks]), repeat=repeat,
                  warmup=0) / 1e3
    theirs = timeit(lambda: thinned.__setitem__("skimage", [
        watershed(~mask, label(mask, connectivity=1), connectivity=1, watershed_line=True) for mask, _ in masks
    ]), repeat=repeat, warmup=0) / 1e3
    dams = {name: [segments == 0 for segments in thinned[name]] for name in thinned}
    in_cells = {name: sum(np.count_nonzero(dam & cells) for dam, (_, cells) in zip(dams[name], masks)) for name in dams}
    moved = sum(np.count_nonzero((a != b) & cells) for a, b, (_, cells) in zip(dams["ours"], dams["skimage"], masks))
    interior = sum(np.count_nonzero(cells) for _, cells in masks)
    print(f"thinning of {len(masks)} masks: ours (the challenge's flooding) {ours:.2f} s, skimage "
          f"watershed(watershed_line=True) {theirs:.2f} s; dam pixels in the truth's cell interior: ours "
          f"{in_cells['ours']}, skimage {in_cells['skimage']}, {moved} of {interior} differ")


def _step(config, source, stacks, generator, device):
    """One training step (Sec. 3) of a fresh ``config.network`` on ``device``, as a function: the plain
    baseline's ``source`` returns one fixed tile, ours draws augmented ones (Sec. 3.1)."""
    import torch

    from ronneberger2015.network import UNet
    from ronneberger2015.training import forward_and_optimizer, training_step

    torch.manual_seed(0)
    forward, optimizer = forward_and_optimizer(UNet(**config.network).to(device).train(), config)
    return lambda: training_step(forward, optimizer, source, stacks, generator)


def bench_threads(args: argparse.Namespace) -> None:
    """CPU threads: ms per training step of the ``cpu`` preset (``--quick``: ``smoke``), augmentation included,
    at torch's default thread count (the baseline) and at every count from 1 to the number of cores.

    On a machine shared with other work, fewer threads than cores can be faster: the load average before
    and after is printed beside the times.
    """
    import dataclasses
    import os

    import torch

    from ronneberger2015.augment import Augmenter
    from ronneberger2015.network import output_size
    from ronneberger2015.training import PRESETS

    config = PRESETS["smoke" if args.quick else "cpu"]
    config = dataclasses.replace(config, network={**config.network, **({"base_channels": args.base_channels}
                                                                       if args.base_channels else {})})
    device, repeat = torch.device("cpu"), 3 if args.quick else 10
    generator = torch.Generator().manual_seed(0)
    stacks = (torch.rand(20, 512, 512, generator=generator), torch.zeros(20, 512, 512, dtype=torch.long),
              torch.ones(20, 512, 512))
    augmenter = Augmenter(config.input_tile, output_size(config.input_tile, config.network["depth"]))
    default, cores = torch.get_num_threads(), os.cpu_count()
    print(f"training step of the {'smoke' if args.quick else 'cpu'} preset: {config.network['base_channels']} base "
          f"channels, {config.input_tile} tile, {config.precision}, {config.engine} engine, augmentation included; "
          f"{cores} cores, torch's default {default} threads; load average before {os.getloadavg()[0]:.2f}")
    print(f"{'threads':>8} {'ms/step':>9} {'vs default':>11}")
    baseline = None
    for threads in [default, *(t for t in range(1, cores + 1) if t != default)]:
        torch.set_num_threads(threads)
        ms = timeit(_step(config, augmenter, stacks, generator, device), repeat=repeat, warmup=2)
        baseline = baseline or ms
        print(f"{threads:>8} {ms:>9.1f} {baseline / ms:>10.2f}x" + ("  (default)" if threads == default else ""))
    torch.set_num_threads(default)
    print(f"load average after {os.getloadavg()[0]:.2f}; vs default: above 1 is faster than torch's default")


def bench_train(args: argparse.Namespace) -> dict:
    """Sec. 3: ms per training step (batch 1: forward, Eq. 1, backward, SGD with momentum 0.99).

    Baselines: the plain engine's eager step on one fixed tile (no
    augmentation), fp32 and bf16 autocast. Ours: ``train.training_step`` with
    the fast engine, as ``train`` runs it, the augmentation of Sec. 3.1
    included; then compiled, in each ``--compile`` mode. fp32 means fp32:
    TF32 is switched off. The floor is the step's convolution FLOPs (3x the
    forward pass: forward, input and weight gradients) over the measured peak
    of a large matrix product on the same device. Last, how far one step of
    each engine and precision lies from the float64 step on the same tile
    (logits, all gradients). The paper's network and 572 tile on a GPU;
    narrower on the CPU (``--quick``: narrower still and a 252 tile), unless
    ``--base-channels`` sets the width.
    """
    import copy
    import dataclasses

    import torch

    from ronneberger2015.augment import Augmenter
    from ronneberger2015.loss import weighted_cross_entropy
    from ronneberger2015.network import UNet
    from ronneberger2015.training import TrainConfig, forward_and_optimizer

    device = _device(args)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    network, tile = ({}, 572) if cuda else ({"base_channels": 4}, 252) if args.quick else ({"base_channels": 16}, 572)
    if args.base_channels:
        network = {"base_channels": args.base_channels}
    repeat, warmup = (3, 1) if args.quick else (50, 10) if cuda else (5, 1)
    torch.manual_seed(0)
    generator = torch.Generator(device).manual_seed(0)
    out = UNet(**network).output_size(tile)
    x = torch.rand(1, 1, tile, tile, device=device, generator=generator)
    y = (torch.rand(1, out, out, device=device, generator=generator) > 0.5).long()
    w = 1 + torch.rand(1, out, out, device=device, generator=generator)
    stacks = (torch.rand(20, 512, 512, device=device, generator=generator), y.new_zeros(20, 512, 512),
              torch.ones(20, 512, 512, device=device))
    augmenter = Augmenter(tile, out)
    base = TrainConfig(input_tile=tile, learning_rate=1e-4, network={**TrainConfig().network, **network})

    step_flops = 3 * _forward_flops(network, tile)  # forward, input gradients, weight gradients
    peak, peak_dtype = _matmul_peak(device)

    fixed = lambda *stacks, **draw: (x, y, w)  # noqa: E731
    rows = [("plain eager", "plain", "fp32", None, fixed), ("plain eager", "plain", "bf16", None, fixed),
            ("ours: training_step + augmentation", "fast", "fp32", None, augmenter),
            ("ours: training_step + augmentation", "fast", "bf16", None, augmenter)]
    rows += [(f"ours, compile={mode!r}", "fast", "bf16", mode, augmenter) for mode in args.compile]

    print(f"training step: UNet({', '.join(f'{k}={v}' for k, v in network.items())}), {tile}x{tile} tile, batch 1, on "
          f"{device} (torch {torch.__version__}, threads {torch.get_num_threads()}); "
          f"{step_flops / 1e12:.3g} TFLOP per step; "
          f"measured peak {peak / 1e12:.3g} TFLOP/s ({peak_dtype} matrix product), "
          f"floor {step_flops / peak * 1e3:.2f} ms; median of {repeat} after {warmup} warm-up")
    print(f"{'method':<44} {'ms/step':>9} {'TFLOP/s':>8} {'vs fp32':>8} {'vs bf16':>8} {'x floor':>8} {'peak GPU':>9}")
    times, table = {}, []
    for name, engine_name, precision, mode, source in rows:
        run = _step(dataclasses.replace(base, engine=engine_name, precision=precision, compile=mode), source, stacks,
                    generator, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        ms = timeit(run, repeat=repeat, warmup=warmup + 2 * bool(mode), device=device)
        times[name, precision] = ms
        versus = {p: times["plain eager", p] / ms if ("plain eager", p) in times else None for p in ("fp32", "bf16")}
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        table.append({"method": name, "engine": engine_name, "precision": precision, "compile": mode,
                      "ms_per_step": ms, "tflops": step_flops / ms / 1e9, "vs_plain_fp32": versus["fp32"],
                      "vs_plain_bf16": versus["bf16"], "x_floor": ms / (step_flops / peak * 1e3),
                      "peak_gpu_gib": memory})
        print(f"{f'{name}, {precision}':<44} {ms:>9.2f} {step_flops / ms / 1e9:>8.3g} {_ratios(versus)} "
              f"{ms / (step_flops / peak * 1e3):>8.1f} {_gib(memory):>9}")
    print("vs fp32 / vs bf16: how many times faster than the plain eager step (above 1 is faster)")

    # Agreement: one step on the fixed tile, dropout off (its masks depend on the layout), against float64.
    torch.manual_seed(0)
    reference = UNet(**{**network, "dropout": 0.0})
    def outputs(config, dtype=None):
        model = copy.deepcopy(reference).to(device, dtype)
        forward, _ = forward_and_optimizer(model, config)
        logits = forward(x.to(dtype or x.dtype))
        weighted_cross_entropy(logits, y, w.to(dtype or w.dtype)).backward()
        return logits.detach().double(), torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    exact = outputs(dataclasses.replace(base, engine="plain"), torch.float64)
    relative = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print("\none step on the fixed tile (dropout off) against the float64 step: ||a - b|| / ||b||")
    print(f"{'engine, precision':<24} {'logits':>9} {'gradients':>10}")
    agreement = []
    for engine_name in ("plain", "fast"):
        for precision in ("fp32", "bf16"):
            logits, gradients = outputs(dataclasses.replace(base, engine=engine_name, precision=precision))
            agreement.append({"engine": engine_name, "precision": precision, "logits": relative(logits, exact[0]),
                              "gradients": relative(gradients, exact[1])})
            print(f"{f'{engine_name}, {precision}':<24} {agreement[-1]['logits']:>9.2e} "
                  f"{agreement[-1]['gradients']:>10.2e}")
    return {"network": network, "tile": tile, "device": str(device), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "repeat": repeat, "warmup": warmup,
            "step_tflop": step_flops / 1e12, "peak_tflops": peak / 1e12, "peak_dtype": peak_dtype,
            "floor_ms": step_flops / peak * 1e3, "rows": table, "agreement": agreement}


def _peak_rss() -> int:
    """Bytes: the largest resident set of this process's memory image (Linux's ``VmHWM``; unlike
    ``ru_maxrss`` it does not carry over the parent's from before ``exec``)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def bench_volume(args: argparse.Namespace) -> None:
    """Fig. 2 on volumes larger than memory: ``predict_volume`` of synthetic uint8 Zarr volumes on disk
    to float32 Zarr, on ``volume.local_cluster``s as ``predict_volume`` starts them, their workers limited
    to ``worker_memory`` and one torch thread; the peak resident memory of each worker, and the throughput
    per worker against ``predict`` in memory on two slices, one torch thread, whose result the volume's
    first two slices must equal. One more run on a plain ``LocalCluster``, whose nannies set
    ``MALLOC_TRIM_THRESHOLD_`` as Dask does by default, measures what ``local_cluster`` avoids."""
    import importlib
    import tempfile

    import numpy as np
    import torch
    import zarr
    from distributed import LocalCluster

    from ronneberger2015.network import UNet
    from ronneberger2015.tiling import predict
    from ronneberger2015.volume import local_cluster, predict_volume

    worker_memory = 2**30
    side, tile, chunks = (1000, 260, (2, 128, 128)) if args.quick else (4096, 516, (4, 512, 512))
    # (slices, workers, with Dask's default MALLOC_TRIM_THRESHOLD_)
    runs = [(4, 1, False)] if args.quick else [(16, 1, False), (16, 1, True), (64, 2, False)]
    torch.manual_seed(0)
    model = UNet(base_channels=2).eval()
    print(f"predict_volume: UNet(base_channels=2), tile {tile}, synthetic uint8 volumes of {side}x{side} slices "
          f"in chunks {chunks}, float32 output; local clusters, workers of one thread and one torch thread, "
          f"memory limit {worker_memory / 2**30:.0f} GiB each, warmed up (package imported) before timing")
    print(f"{'volume':>14} {'in+out GiB':>10} {'blocks':>14} {'workers':>7} {'malloc trim':>11} {'seconds':>8} "
          f"{'Mpx/s':>7} {'per worker':>10} {'peak RSS per worker':>20}")
    with tempfile.TemporaryDirectory(prefix="volume-benchmark-") as scratch:
        for slices in sorted({slices for slices, *_ in runs}):
            source = zarr.create_array(f"{scratch}/in{slices}.zarr", shape=(slices, side, side), chunks=chunks,
                                       dtype=np.uint8)
            rng = np.random.default_rng(0)  # every volume begins with the same slices
            for z in range(0, slices, chunks[0]):  # a row of chunks at a time: never all in memory
                source[z : z + chunks[0]] = rng.integers(0, 256, (chunks[0], side, side), dtype=np.uint8)
        stack = zarr.open_array(f"{scratch}/in{runs[0][0]}.zarr", mode="r")[:2]

        def baseline() -> tuple[float, np.ndarray]:
            """Mpx/s of predict in memory on the first two slices, one torch thread, and its result (timed
            before and after the volumes: the machine's load moves it)."""
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            start = time.perf_counter()
            result = predict(model, stack, output_tile=tile)[:, 1]
            seconds = time.perf_counter() - start
            torch.set_num_threads(threads)
            return stack.size / seconds / 1e6, result

        (before, expected), rates = baseline(), []
        for index, (slices, workers, trim) in enumerate(runs):
            options = {"memory_limit": worker_memory, "env": {"OMP_NUM_THREADS": "1"}}
            with (LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None, **options) if trim
                  else local_cluster(workers, device="cpu", **options)) as cluster, cluster.get_client() as client:
                client.run(importlib.import_module, "ronneberger2015.volume")
                start = time.perf_counter()
                out = predict_volume(model, f"{scratch}/in{slices}.zarr", f"{scratch}/out{index}.zarr",
                                     output_tile=tile, scheduler=cluster.scheduler_address)
                seconds = time.perf_counter() - start
                peaks = sorted(client.run(_peak_rss).values())
            rates.append(slices * side * side / seconds / 1e6 / workers)
            block = "x".join(map(str, out.attrs["ronneberger2015"]["block"]))
            print(f"{f'{slices}x{side}x{side}':>14} {slices * side * side * (1 + 4) / 2**30:>10.2f} {block:>14} "
                  f"{workers:>7} {'65536' if trim else 'default':>11} {seconds:>8.1f} {rates[-1] * workers:>7.2f} "
                  f"{rates[-1]:>10.2f} "
                  f"{', '.join(f'{p / 2**20:.0f} MiB' for p in peaks):>20}")
        after, _ = baseline()
        print(f"baseline: predict in memory on 2 slices, one torch thread: {before:.2f} Mpx/s before the volumes, "
              f"{after:.2f} after; predict_volume per worker: "
              f"{', '.join(f'{r / ((before + after) / 2):.2f}x' for r in rates)} of their mean")
        first = zarr.open_array(f"{scratch}/out0.zarr", mode="r")[:2]
        print(f"max |predict_volume - predict| on those 2 slices: {np.abs(first - expected).max():.2g}")


BENCHMARKS = {
    "weightmap": bench_weightmap,
    "augment": bench_augment,
    "predict": bench_predict,
    "metrics": bench_metrics,
    "train": bench_train,
    "threads": bench_threads,
    "volume": bench_volume,
}
RECORDED = ("augment", "predict", "train")
"""The benchmarks whose figures ``--json`` writes (the ones ``python -m reproduce.gpu`` runs)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=sorted(BENCHMARKS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--data-dir", default=None,
                        help="ISBI 2012 folder (default: $ISBI2012_DIR, then data/isbi2012)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (seconds, for CI)")
    parser.add_argument("--base-channels", type=int, metavar="N",
                        help="train, threads: the network's width (default: 64 on a GPU, 16 on the CPU, "
                             "4 with --quick)")
    parser.add_argument("--compile", nargs="*", default=[], metavar="MODE",
                        help="train: also time the fast bf16 step with torch.compile in these modes "
                             "(default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help=f"{', '.join(RECORDED)}: also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.json and args.which not in RECORDED:
        parser.error(f"--json records the figures of {', '.join(RECORDED)}, not {args.which}")
    figures = BENCHMARKS[args.which](args)
    if args.json:
        from ronneberger2015.io import write_json

        command = " ".join(["python -m reproduce.benchmark", *(sys.argv[1:] if argv is None else argv)])
        write_json(args.json, {"benchmark": args.which, "command": command, **figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
