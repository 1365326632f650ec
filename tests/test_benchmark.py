"""The benchmarks run on the CPU in seconds (``--quick``), and what they print beside the timings holds."""
import re

import pytest

from reproduce.benchmark import main

pytestmark = pytest.mark.slow  # each runs a whole benchmark


@pytest.fixture(autouse=True)
def keep_threads():
    """The benchmarks set torch's thread count for steadier timings; give the rest of the suite its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_benchmark_prints_every_row_and_the_agreement_table(capsys):
    """Every engine and precision is timed, and the agreement with the float64 step is printed for each
    (what the agreement must be is tested in test_training.py)."""
    assert main(["train", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for row in ("plain eager, fp32", "plain eager, bf16", "ours: training_step + augmentation, fp32",
                "ours: training_step + augmentation, bf16"):
        assert re.search(rf"^{re.escape(row)} +\d+\.\d+ ", out, re.M), row
    agreement = re.findall(r"^(plain|fast), (fp32|bf16) +(\S+) +(\S+)$", out, re.M)
    assert sorted((e, p) for e, p, *_ in agreement) == [("fast", "bf16"), ("fast", "fp32"), ("plain", "bf16"),
                                                      ("plain", "fp32")]
    assert all(0 <= float(value) < 1 for *_, logits, gradients in agreement for value in (logits, gradients))


def test_predict_benchmark_memory_does_not_grow(capsys):
    """The network's largest input is the same for a 600 and a 1200 px image (bounded tiles, Fig. 2)."""
    assert main(["predict", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^predict\(tta=(True|False)\) +(fp32|bf16) ", out, re.M)) == 4
    inputs = re.findall(r"^ +\d+x\d+ +\S+ +(\(.*?\))", out, re.M)
    assert len(inputs) == 2 and inputs[0] == inputs[1]


def test_volume_benchmark_equals_predict(capsys):
    """The Zarr volume predicted on a LocalCluster equals predict in memory; each worker's peak RSS is printed."""
    assert main(["volume", "--quick"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ +4x1000x1000 +\S+ +2x768x768 +1 +default +\S+ +\S+ +\S+ +\d+ MiB$", out, re.M)
    assert float(re.search(r"max \|predict_volume - predict\| on those 2 slices: (\S+)$", out, re.M)[1]) < 1e-5
