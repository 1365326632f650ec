"""The network of Fig. 1 (Sec. 2): sizes, layer and parameter counts, init, dropout."""
import math
import re

import pytest
import torch
from torch import nn

from ronneberger2015.network import UNet, input_size, output_size


def _convs(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


@pytest.fixture(scope="module")
def paper():
    torch.manual_seed(0)
    return UNet()


def test_paper_sizes(paper):
    """572 -> 388 (Fig. 1), 700 -> 516, and a rectangular 572 x 700 tile, through the full network."""
    paper.eval()
    with torch.no_grad():
        assert paper(torch.zeros(1, 1, 572, 700)).shape == (1, 2, 388, 516)
    assert output_size(572) == 388 and output_size(700) == 516
    assert output_size((572, 700)) == (388, 516)
    assert paper.border == 92


def test_valid_sizes_are_16k_plus_60():
    valid = [n for n in range(1, 800) if _is_valid(n, 4)]
    assert valid == [16 * k + 60 for k in range(8, 47)]
    assert all(output_size(n) == n - 184 for n in valid)


def _is_valid(n, depth):
    try:
        output_size(n, depth)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("size, neighbours", [(512, "508 (-> 324) and 524 (-> 340)"),
                                               (570, "556 (-> 372) and 572 (-> 388)")])
def test_invalid_sizes_name_neighbours(size, neighbours):
    with pytest.raises(ValueError, match=r"nearest valid sizes are " + re.escape(neighbours)):
        output_size(size)


def test_invalid_rectangle_checks_each_side():
    with pytest.raises(ValueError, match="input size 570"):
        output_size((572, 570))
    model = UNet(base_channels=2)
    with pytest.raises(ValueError, match="input size 570"):
        model(torch.zeros(1, 1, 570, 572))


def test_input_size_is_smallest_valid():
    assert input_size(388) == 572
    assert input_size(512) == 700
    assert input_size(389) == 588
    for depth in (1, 2, 3, 4):
        size = input_size(100, depth)
        assert output_size(size, depth) >= 100
        assert all(not _is_valid(n, depth) or output_size(n, depth) < 100 for n in range(1, size))


def test_parameter_counts():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(UNet()) == 31_030_658
    assert count(UNet(variant="release")) == 31_100_354


def test_layer_count(paper):
    convs = _convs(paper)
    assert len(convs) == 23
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in convs) == 4
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in convs) == 18
    assert all(m.padding == (0, 0) for m in convs)
    assert paper.head.kernel_size == (1, 1) and paper.head.in_channels == 64


def test_channels_per_level(paper):
    assert [block[2].out_channels for block in paper.down] == [64, 128, 256, 512, 1024]
    upconvs = [block.upconv for block in paper.up]
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in upconvs] == [
        (1024, 512, (2, 2), (2, 2)), (512, 256, (2, 2), (2, 2)), (256, 128, (2, 2), (2, 2)), (128, 64, (2, 2), (2, 2))
    ]
    assert all(u.bias is not None for u in upconvs)
    assert [block.convs[0].in_channels for block in paper.up] == [1024, 512, 256, 128]
    release = UNet(variant="release")
    assert release.up[-1].upconv.out_channels == 128 and release.up[-1].convs[0].in_channels == 192


def test_init_std(paper):
    """Weights ~ N(0, sqrt(2/N)), N = fan-in (Sec. 3); up-convolutions N = 4 * C_out; biases 0."""
    for module in _convs(paper):
        weight = module.weight
        if isinstance(module, nn.ConvTranspose2d):
            fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
        else:
            fan_in = weight[0].numel()
        expected = math.sqrt(2.0 / fan_in)
        assert abs(weight.std().item() / expected - 1) < 0.05, module
        assert abs(weight.mean().item()) < 5 * expected / math.sqrt(weight.numel())  # 5 standard errors
        assert torch.count_nonzero(module.bias) == 0
    assert paper.down[0][0].weight[0].numel() == 9 and paper.down[1][0].weight[0].numel() == 9 * 64


def test_center_crop_and_concat():
    """The skip is centre-cropped and concatenated after the up-sampled map, as in the release."""
    model = UNet(base_channels=2, depth=1, dropout=0.0).eval()
    skips = {}
    model.up[0].convs.register_forward_pre_hook(lambda m, args: skips.setdefault("cat", args[0]))
    model.down[0].register_forward_hook(lambda m, args, out: skips.setdefault("skip", out))
    x = torch.randn(1, 1, 60, 60)  # depth 1: 60 -> 56 -> 28 -> 24 -> 48 -> 44
    with torch.no_grad():
        assert model(x).shape == (1, 2, 44, 44)
    cat, skip = skips["cat"], skips["skip"]
    assert cat.shape == (1, 4, 48, 48)
    offset = (skip.shape[-1] - 48) // 2
    torch.testing.assert_close(cat[:, 2:], skip[:, :, offset : offset + 48, offset : offset + 48])


def test_release_relu_after_upconv():
    model = UNet(base_channels=2, depth=2, variant="release").eval()
    seen = []
    model.up[0].convs.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.randn(1, 1, 108, 108))
    assert seen[0][:, : model.up[0].upconv.out_channels].min() >= 0


def test_dropout_train_only():
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=2)
    x = torch.randn(1, 1, 108, 108)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
    assert not torch.equal(model(x).detach(), UNet(base_channels=2, depth=2, dropout=0.0)(x).detach())


def test_dropout_reaches_512_skip():
    """Dropout acts in place on the two deepest levels, so the second-deepest skip is dropped too."""
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=2).train()
    captured = []
    model.up[-1].convs.register_forward_pre_hook(lambda m, args: captured.append(("shallow", args[0])))
    model.up[0].convs.register_forward_pre_hook(lambda m, args: captured.append(("deep", args[0])))
    with torch.no_grad():
        model(torch.rand(1, 1, 108, 108) + 1)
    deep_skip = dict(captured)["deep"][:, model.up[0].upconv.out_channels :]
    shallow_skip = dict(captured)["shallow"][:, model.up[1].upconv.out_channels :]
    assert (deep_skip == 0).float().mean() > 0.3  # about half the units are zeroed
    assert (shallow_skip == 0).float().mean() < (deep_skip == 0).float().mean()


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        UNet(variant="2019")
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.0)
    with pytest.raises(ValueError, match=r"\(batch, 1, H, W\)"):
        UNet(base_channels=2)(torch.zeros(1, 3, 572, 572))


def test_checkpoints_of_version_0_1_load():
    """Version 0.1 named the expansive path's layers upconv.i and up.i.k; such state dicts still load."""
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=2)
    earlier = {}
    for key, value in model.state_dict().items():
        if ".upconv." in key:
            key = key.replace(".upconv.", ".").replace("up.", "upconv.", 1)
        else:
            key = key.replace(".convs.", ".")
        earlier[key] = value
    assert "upconv.0.weight" in earlier and "up.1.2.bias" in earlier
    loaded = UNet(base_channels=2, depth=2)
    loaded.load_state_dict(earlier)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_seed_gives_the_network_of_version_0_1():
    """Weights are drawn in version 0.1's order (contracting path, up-convolutions, expansive path, head), so
    seeded runs recorded in the docs stay reproducible; the figures were read off version 0.1."""
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=2)
    assert model.up[0].upconv.weight.flatten()[:3].tolist() == pytest.approx([0.05260, 0.11364, -0.44457], abs=1e-5)
    assert model.up[1].convs[0].weight.flatten()[:2].tolist() == pytest.approx([0.12073, -0.29333], abs=1e-5)
