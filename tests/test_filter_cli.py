"""pipelines/filter_matches.py: both output files, their contents, intrinsics handling, errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from n3sets.models import CNNet
from n3sets.pretrained import save_model

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "pipelines" / "filter_matches.py"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("w") / "tiny.pt", CNNet(channels=16, num_blocks=2))


def _run(*args):
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cli_main():
    """The CLI's main() in this process (no interpreter start-up) for the cheaper checks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("filter_matches_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_writes_json_and_png(strecha_root, weights, tmp_path):
    import cv2

    from data_prep.scenes import read_strecha_camera

    images = strecha_root / "entry-P10" / "images"
    K = read_strecha_camera(strecha_root / "entry-P10" / "cameras" / "0003.jpg.camera")["K"]
    kfile = tmp_path / "K.txt"
    np.savetxt(kfile, K)
    out = tmp_path / "out"
    # threshold 0: the untrained network keeps everything and RANSAC decides, so a pose exists
    proc = _run(images / "0003.jpg", images / "0004.jpg", "--K1", f"{K[0, 0]},{K[1, 1]},{K[0, 2]},{K[1, 2]}",
                "--K2", kfile, "--weights", weights, "--num-kp", 300, "--threshold", 0.0, "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "matches.json").read_text())
    c = data["counts"]
    assert c["putative"] == c["keypoints1"] and 250 <= c["keypoints1"] <= 310
    assert c["kept_by_network"] == c["putative"]  # threshold 0
    assert 0 < c["inliers"] <= c["putative"] and len(data["matches"]["idx1"]) == c["inliers"]
    assert len(data["matches"]["prob"]) == len(data["matches"]["kpts2"]) == c["inliers"]
    assert data["intrinsics_source"] == ["given", "given"] and np.allclose(data["K2"], K)
    assert data["pose"]["ok"] and np.allclose(np.array(data["pose"]["R"]) @ np.array(data["pose"]["R"]).T, np.eye(3), atol=1e-6)
    assert data["settings"]["num_kp"] == 300 and data["settings"]["refine"] == "ransac"
    img = cv2.imread(str(out / "matches.png"))
    assert img is not None and img.shape[1] >= 2 * 1024 and img.shape[0] > 683  # both images + caption
    # green (kept) and red (rejected) pixels are both drawn
    b, g, r = (img[..., k].astype(int) for k in range(3))
    assert ((g > 200) & (r < 80) & (b < 80)).sum() > 100
    assert ((r > 200) & (g < 80) & (b < 80)).sum() > 100


def test_cli_guesses_intrinsics_with_warning(strecha_root, weights, tmp_path, cli_main, caplog):
    images = strecha_root / "entry-P10" / "images"
    rc = cli_main([str(images / "0000.jpg"), str(images / "0001.jpg"), "--weights", str(weights), "--num-kp", "200",
                   "--no-refine", "--out", str(tmp_path)])
    assert rc == 0
    assert "no intrinsics given" in caplog.text and "1.2 * max(width, height)" in caplog.text
    data = json.loads((tmp_path / "matches.json").read_text())
    assert data["intrinsics_source"] == ["guess-size", "guess-size"]
    assert np.isclose(data["K1"][0][0], 1.2 * 1024) and data["settings"]["refine"] is None
    assert (tmp_path / "matches.png").is_file()


def test_cli_unreadable_image(tmp_path, weights, cli_main, capsys):
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello")
    rc = cli_main([str(bad), str(tmp_path / "missing.jpg"), "--weights", str(weights), "--focal", "800",
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read image" in err and str(bad) in err
    rc = cli_main([str(tmp_path / "missing.jpg"), str(bad), "--weights", str(weights), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.jpg" in err
    rc = cli_main([str(bad), str(bad), "--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "nope.pt" in capsys.readouterr().err
    assert not (tmp_path / "o" / "matches.json").exists()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("filter_matches.py: error: "), err
    return err[0]


def test_cli_bad_arguments_are_refused_up_front(strecha_root, weights, tmp_path, cli_main, capsys):
    images = strecha_root / "entry-P10" / "images"
    pair = [str(images / "0003.jpg"), str(images / "0004.jpg"), "--weights", str(weights)]
    for extra, words in ((["--focal", "0"], ("--focal 0", "> 0")),  # 0 is not "no focal given"
                         (["--focal", "-800"], ("--focal -800", "> 0")),
                         (["--focal", "nan"], ("--focal nan",)),
                         (["--num-kp", "0"], ("--num-kp 0",)),
                         (["--threshold", "1.5"], ("--threshold 1.5",)),
                         (["--K1", "1,2,3"], ("--K1", "fx,fy,cx,cy")),
                         (["--K1", "800,800,500,300", "--K2", "0,800,500,300"], ("--K2", "positive"))):
        capsys.readouterr()
        assert cli_main(pair + extra + ["--out", str(tmp_path / "o")]) == 2
        line = _one_error_line(capsys)
        assert all(w in line for w in words), line
    # an existing FILE as --out: refused before any work, not FileExistsError at the end
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert cli_main(pair + ["--focal", "800", "--out", str(afile)]) == 2
    assert "--out" in _one_error_line(capsys) and afile.read_text() == "keep me"
    # an h5 file given as --weights: said plainly, without torch's weights_only advice
    h5 = tmp_path / "data.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    assert cli_main(pair[:2] + ["--weights", str(h5), "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert "data.h5" in line and "weights_only" not in line
    assert not (tmp_path / "o").exists()


def test_caption_fits_narrow_pictures():
    """The caption is shrunk and wrapped so that it fits the picture's width (it was cut off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import importlib.util

    spec = importlib.util.spec_from_file_location("filter_matches_mod", CLI)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = ("n3net-strecha+ransac: 2000 putative, 311 kept (16%) | rotation 12.3 deg (x -1.2, y 11.9, z 0.4) "
            "| t (+0.91, -0.02, +0.41) | focal guessed   [rejected: 1689 (400 drawn), kept: 311]")
    for width in (120, 330, 800, 2058):
        size, lines = mod.caption_layout(text, width)
        assert " ".join(lines).split() == text.split() or "".join(lines).replace(" ", "") == text.replace(" ", "")
        fig = plt.figure(figsize=(width / 100, 1), dpi=100)
        renderer = fig.canvas.get_renderer()
        for line in lines:
            t = fig.text(0, 0, line, fontsize=size, family="monospace")
            assert t.get_window_extent(renderer).width <= width - 6, (width, size, line)
        plt.close(fig)
        if width >= 2000:
            assert size == 11 and len(lines) == 1  # a wide picture keeps the one-line caption
