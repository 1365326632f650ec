"""The replay command: the held-out run writes every artefact and a table beside Table 1."""
import json

import pytest

from reproduce import isbi


def test_table_shows_paper_numbers():
    ours = {"warping_error": 0.001, "rand_error": 0.1, "pixel_error": 0.2, "vrand": 0.5, "vinfo": 0.6}
    text = isbi.table({"ours": ours,
                       **isbi.PAPER})
    assert "0.000353" in text and "0.0382" in text and "0.0611" in text
    assert text.splitlines()[-1].rstrip().endswith("-")  # human V_rand / V_info unknown


@pytest.mark.slow
def test_held_out_run_writes_everything(isbi_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(isbi, "TRAIN_HELD_OUT", slice(0, 2))  # the same code path on fewer slices
    monkeypatch.setattr(isbi, "HELD_OUT", slice(20, 22))
    out = tmp_path / "run"
    assert isbi.main(["--preset", "smoke", "--iterations", "2", "--held-out-only", "--device", "cpu",
                      "--out", str(out), "--data-dir", str(isbi_dir)]) == 0
    printed = capsys.readouterr().out
    assert "NOT the paper's settings" in printed and "u-net (paper, test set)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["held_out"]) == {"warping_error", "rand_error", "pixel_error", "vrand", "vinfo"}
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["iterations"] == 2 and config["train"]["momentum"] == 0.99
    assert {"checkpoint.pt", "log.csv", "loss.png", "overlay-slice20.png", "probabilities-20-21.tif"} <= {
        p.name for p in (out / "held-out").iterdir()}


def test_missing_data_is_explained(tmp_path, capsys):
    assert isbi.main(["--data-dir", str(tmp_path), "--device", "cpu"]) == 2
    assert "python -m ronneberger2015.data fetch" in capsys.readouterr().err
