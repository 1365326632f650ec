"""The learning-curve picture of several runs: it reads each run's log.csv and names what is missing."""
import matplotlib.image
import pytest

from reproduce import learning_curves


def _log(folder, rows):
    folder.mkdir()
    lines = ["iteration,loss,learning_rate,vrand,rand_error"]
    lines += [f"{i},{loss},0.001,{vrand},{rand}" for i, loss, vrand, rand in rows]
    (folder / "log.csv").write_text("\n".join(lines) + "\n")


def test_draws_every_run_and_refuses_empty_logs(tmp_path, capsys):
    _log(tmp_path / "a", [(i, 1 / i, "0.8" if i % 2 == 0 else "", "0.3" if i % 2 == 0 else "") for i in range(1, 9)])
    _log(tmp_path / "b", [(i, 2 / i, "", "") for i in range(1, 9)])
    figure = learning_curves.figure({"a": learning_curves.read_log(tmp_path / "a" / "log.csv"),
                                     "b": learning_curves.read_log(tmp_path / "b" / "log.csv")}, window=2)
    loss, vrand, rand = figure.axes
    assert [len(line.get_xdata()) for line in loss.lines] == [7, 7]  # running means of 2 over 8 iterations
    assert list(vrand.lines[0].get_xdata()) == [2, 4, 6, 8] and list(rand.lines[0].get_ydata()) == [0.3] * 4
    assert len(vrand.lines[1].get_xdata()) == 0  # run b logged no validation

    out = tmp_path / "curves.png"
    assert learning_curves.main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 0
    assert matplotlib.image.imread(out).shape[2] == 4
    (tmp_path / "c").mkdir()
    with pytest.raises(SystemExit):
        learning_curves.main([str(tmp_path / "a"), str(tmp_path / "c"), "-o", str(out)])
    assert "no log.csv rows in" in capsys.readouterr().err
