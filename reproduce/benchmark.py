"""``python -m reproduce.benchmark {weightmap,augment,predict,metrics,train}``

Each benchmark times our code against a plain baseline run in the same
process and prints the ratio; figures recorded in docs/performance.md come
from these commands. Speed is never asserted in the test suite.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable


def timeit(function: Callable[[], object], *, repeat: int = 5, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``function()`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _device(args: argparse.Namespace):
    """The device to time on (``--device``, else CUDA when available) and its synchronisation."""
    import torch

    from ronneberger2015.train import resolve_device

    device = resolve_device(args.device)
    return device, (torch.cuda.synchronize if device.type == "cuda" else (lambda: None))


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
        ours_ms.append(timeit(lambda: weight_map(labels[z]), repeat=3 if args.quick else 5))
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


def bench_augment(args: argparse.Namespace) -> None:
    """Sec. 3.1: ms per 572 tile, ours (draw + warp image, labels, weights) vs scipy map_coordinates."""
    import torch
    from scipy import ndimage

    from ronneberger2015.augment import Augmenter

    device, sync = _device(args)
    calls = 1 if device.type == "cpu" else (10 if args.quick else 100)  # queued calls per timing on a GPU
    if device.type == "cpu":
        torch.set_num_threads(1)  # as scipy: one core each
    repeat = 3 if args.quick else 10
    generator = torch.Generator(device).manual_seed(0)
    images = torch.rand(30, 512, 512, generator=generator, device=device)
    labels, weights = (images > 0.5).long(), 1 + images
    augmenter = Augmenter(572, 388)

    print(f"augmentation of 572x572 tiles (labels and weights 388x388), device {device}, torch threads {torch.get_num_threads()}")
    print(f"{'method':<48} {'batch':>5} {'ms/tile':>9}")
    ours = {}
    for batch in (1, 8):
        run = lambda: [augmenter(images, labels, weights, batch_size=batch, generator=generator) for _ in range(calls)]
        ours[batch] = timeit(run, repeat=repeat, sync=sync) / (calls * batch)
        print(f"{'ours: Augmenter (bilinear image)':<48} {batch:>5} {ours[batch]:>9.3f}")
    params = augmenter.draw(1, images.shape, generator=generator)
    positions = augmenter.coordinates(params)[0].cpu().numpy()
    source = images[params.slice_index].cpu().numpy()[0]
    for order in (3, 1):
        ms = timeit(lambda: ndimage.map_coordinates(source, positions, order=order, mode="mirror"), repeat=1 if args.quick else 5)
        print(f"{f'scipy map_coordinates, order {order}, image only':<48} {1:>5} {ms:>9.3f}"
              f"   ({ms / ours[1]:.1f}x ours at batch 1, {ms / ours[8]:.1f}x at batch 8)")


def bench_predict(args: argparse.Namespace) -> None:
    """Fig. 2: ms per 512x512 slice of ``predict`` on a stack, with and without TTA, against one plain
    forward pass per mirrored slice; then the largest network input and the memory as the image grows."""
    import numpy as np
    import torch

    from ronneberger2015.network import UNet
    from ronneberger2015.tiling import predict

    device, sync = _device(args)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    if not cuda:
        torch.set_num_threads(1)  # steadier figures on a shared machine; ratios are what count
    torch.manual_seed(0)
    network = {"base_channels": 2} if args.quick else {}  # the paper's network unless --quick
    model = UNet(**network).to(device).eval()
    # The paper's network takes seconds per slice on a CPU: there, time 2 slices once and report per slice.
    slices = 30 if cuda else 2
    repeat, warmup = (5, 1) if cuda else (1, 1) if args.quick else (1, 0)
    stack = np.random.default_rng(0).integers(0, 256, (slices, 512, 512), dtype=np.uint8)
    border = model.border
    extra = 700 - 512 - 2 * border  # 512 + 2 * 92 = 696 is no valid input side; 700 is

    def plain(precision: str) -> None:
        """What one would write without tiling: mirror each slice to 700x700, one forward pass each."""
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for image in stack:
                padded = np.pad(image / np.float32(255), (border, border + extra), mode="reflect")
                logits = model(torch.from_numpy(padded)[None, None].to(device))
                torch.softmax(logits.float(), dim=1)[0, :, :512, :512].cpu().numpy()

    def peak(function: Callable[[], object]) -> str:
        if not cuda:
            return "-"
        torch.cuda.reset_peak_memory_stats(device)
        function()
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"

    print(f"predict: UNet({', '.join(f'{k}={v}' for k, v in network.items())}) on {device} "
          f"(torch threads {torch.get_num_threads()}), stack of {slices} random 512x512 uint8 slices, "
          f"median of {repeat} after {warmup} warm-up")
    print(f"{'method':<36} {'precision':>9} {'ms/slice':>9} {'ratio':>6} {'peak GPU':>9}")
    for precision in ("fp32", "bf16") if cuda else ("fp32",):
        baseline = timeit(lambda: plain(precision), repeat=repeat, warmup=warmup, sync=sync) / slices
        print(f"{'plain: one pass per mirrored slice':<36} {precision:>9} {baseline:>9.2f} {1:>6.2f} "
              f"{peak(lambda: plain(precision)):>9}")
        for tta in (False, True):
            run = lambda: predict(model, stack, tta=tta, precision=precision)  # noqa: E731
            ms = timeit(run, repeat=repeat, warmup=warmup, sync=sync) / slices
            print(f"{f'predict(tta={tta})':<36} {precision:>9} {ms:>9.2f} {ms / baseline:>6.2f} {peak(run):>9}")

    # Memory against image size: the network only ever sees bounded batches of tiles.
    if cuda:
        sweep, options = model, {"precision": "bf16"}
    else:
        sweep, options = UNet(base_channels=2).eval(), {"memory_budget": (8 if args.quick else 32) * 2**20}
    shapes = []
    sweep.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
    print(f"\nimage size against memory: UNet(base_channels={sweep.base_channels}) on {device}, {options}")
    print(f"{'image':>12} {'seconds':>8} {'largest forward input':>22} {'result (host)':>14} {'peak GPU':>9}")
    for side in (600, 1200) if args.quick else (1024, 4096, 10000):
        shapes.clear()
        image = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
        run = lambda: predict(sweep, image, device=device, **options)  # noqa: E731
        seconds = timeit(run, repeat=1, warmup=0, sync=sync) / 1e3
        print(f"{f'{side}x{side}':>12} {seconds:>8.1f} {str(max(shapes)):>22} "
              f"{2 * side * side * 4 / 2**30:>10.2f} GiB {peak(run):>9}")


def bench_metrics(args: argparse.Namespace) -> None:
    """Sec. 4: seconds for each ISBI metric on the 10 held-out training slices (20-29) against a
    deterministic proposal (the labels blurred, plus smooth noise); baseline: skimage's adapted
    Rand error over the same threshold sweep of 4-connected label images."""
    import numpy as np
    from scipy import ndimage
    from skimage.measure import label
    from skimage.metrics import adapted_rand_error

    from ronneberger2015 import metrics
    from ronneberger2015.data import load

    truth = load("train-labels.tif", args.data_dir)[20:30]
    if args.quick:
        truth = truth[:2, :256, :256]
    inside = truth > 0
    noise = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(truth.shape), (0, 2, 2))
    proposal = np.clip(ndimage.gaussian_filter(inside.astype(float), (0, 2, 2)) + 0.75 * noise, 0.0, 1.0)
    repeat = 1 if args.quick else 3
    print(f"ISBI 2012 metrics of train-labels slices 20-{19 + len(truth)} ({truth.shape[1]}x{truth.shape[2]}), "
          f"proposal = labels blurred + smooth noise; median of {repeat} runs")
    print(f"{'metric':<18} {'value':>10} {'seconds':>8}")
    values, seconds = {}, {}
    for name, (label_text, _) in metrics.METRICS.items():
        function = getattr(metrics, name)
        seconds[name] = timeit(lambda: values.__setitem__(name, function(proposal, truth)), repeat=repeat, warmup=0) / 1e3
        print(f"{label_text:<18} {values[name]:>10.6f} {seconds[name]:>8.2f}")
    total = timeit(lambda: metrics.evaluate(proposal, truth), repeat=repeat, warmup=0) / 1e3
    print(f"{'all five: evaluate':<18} {'':>10} {total:>8.2f}   (V_rand and V_info share the thinning)")
    objects = [label(mask, connectivity=1) for mask in inside]
    baseline = timeit(
        lambda: [adapted_rand_error(objects[z], label(proposal[z] > th, connectivity=1)) for th in metrics.SWEEP for z in range(len(truth))],
        repeat=repeat,
        warmup=0,
    ) / 1e3
    print(f"Rand error, {len(metrics.SWEEP)} thresholds: ours {seconds['rand_error']:.2f} s, skimage adapted_rand_error "
          f"{baseline:.2f} s (ratio {baseline / seconds['rand_error']:.1f})")


def bench_train(args: argparse.Namespace) -> None:
    """Sec. 3: ms per training step (batch 1: forward, Eq. 1, backward, SGD with momentum 0.99).

    Baselines: the same eager step on one fixed tile (no augmentation), fp32
    and bf16 autocast. Ours: ``train.training_step`` as ``train`` runs it, the
    augmentation of Sec. 3.1 included. The floor is the step's convolution
    FLOPs (3x the forward pass: forward, input and weight gradients) over the
    measured peak of a large matrix product on the same device. The paper's
    network and 572 tile on a GPU; narrower on the CPU (``--quick``: narrower
    still and a 252 tile).
    """
    import torch
    from torch import nn

    from ronneberger2015.augment import Augmenter
    from ronneberger2015.network import UNet
    from ronneberger2015.train import training_step

    device, sync = _device(args)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    network, tile = ({}, 572) if cuda else ({"base_channels": 4}, 252) if args.quick else ({"base_channels": 16}, 572)
    repeat, warmup = (3, 1) if args.quick else (20, 5) if cuda else (5, 1)
    torch.manual_seed(0)
    generator = torch.Generator(device).manual_seed(0)
    out = UNet(**network).output_size(tile)
    x = torch.rand(1, 1, tile, tile, device=device, generator=generator)
    y = (torch.rand(1, out, out, device=device, generator=generator) > 0.5).long()
    w = 1 + torch.rand(1, out, out, device=device, generator=generator)
    stacks = (torch.rand(20, 512, 512, device=device, generator=generator), y.new_zeros(20, 512, 512), torch.ones(20, 512, 512, device=device))
    augmenter = Augmenter(tile, out)

    flops = []
    def count(module, inputs, output):
        spatial = (inputs[0] if isinstance(module, nn.ConvTranspose2d) else output).shape[-2:].numel()
        flops.append(2 * module.in_channels * module.out_channels * module.weight[0, 0].numel() * spatial)
    probe = UNet(**network).to(device)
    handles = [m.register_forward_hook(count) for m in probe.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        probe(x)
    [handle.remove() for handle in handles]
    step_flops = 3 * sum(flops)

    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(8192 if cuda else 2048, 8192 if cuda else 2048, device=device, dtype=dtype)
    peak = 2 * a.shape[0] ** 3 / (timeit(lambda: a @ a, repeat=5, sync=sync) / 1e3)

    def fresh():
        torch.manual_seed(0)
        model = UNet(**network).to(device).train()
        return model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.99)

    def stepper(source):
        """A step factory: the plain step reads one fixed tile, ours draws augmented ones."""
        def make(precision):
            model, optimizer = fresh()
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
            return lambda: training_step(model, optimizer, source, stacks, generator, autocast)
        return make

    plain = stepper(lambda *stacks, **draw: (x, y, w))
    ours = stepper(augmenter)

    print(f"training step: UNet({', '.join(f'{k}={v}' for k, v in network.items())}), {tile}x{tile} tile, batch 1, on "
          f"{device} (torch threads {torch.get_num_threads()}); {step_flops / 1e12:.3g} TFLOP per step; measured peak "
          f"{peak / 1e12:.3g} TFLOP/s ({str(dtype).removeprefix('torch.')} matrix product), floor {step_flops / peak * 1e3:.2f} ms; "
          f"median of {repeat} after {warmup} warm-up")
    print(f"{'method':<40} {'ms/step':>9} {'TFLOP/s':>8} {'vs fp32':>8} {'vs bf16':>8} {'x floor':>8} {'peak GPU':>9}")
    times = {}
    for name, make, precision in [("plain eager", plain, "fp32"), ("plain eager", plain, "bf16"),
                                  ("ours: training_step (+ augmentation)", ours, "fp32"),
                                  ("ours: training_step (+ augmentation)", ours, "bf16")]:
        step = make(precision)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        ms = timeit(step, repeat=repeat, warmup=warmup, sync=sync)
        times.setdefault(name, {})[precision] = ms
        baseline = times["plain eager"]
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else "-"
        versus = [f"{baseline[p] / ms:>7.2f}x" if p in baseline else f"{'-':>8}" for p in ("fp32", "bf16")]
        print(f"{f'{name}, {precision}':<40} {ms:>9.2f} {step_flops / ms / 1e9:>8.3g} {' '.join(versus)} "
              f"{ms / (step_flops / peak * 1e3):>8.1f} {memory:>9}")
    print("vs fp32 / vs bf16: how many times faster than the plain eager step (above 1 is faster)")


BENCHMARKS = {
    "weightmap": bench_weightmap,
    "augment": bench_augment,
    "predict": bench_predict,
    "metrics": bench_metrics,
    "train": bench_train,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=sorted(BENCHMARKS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--data-dir", default=None, help="ISBI 2012 folder (default: $ISBI2012_DIR, then data/isbi2012)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (seconds, for CI)")
    args = parser.parse_args(argv)
    BENCHMARKS[args.which](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
