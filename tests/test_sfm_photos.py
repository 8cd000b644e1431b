"""--format photos: COLMAP SfM (pycolmap) on a folder of photos, then labels from the reconstruction.

The real scene: four views of Herz-Jesus-P25 (Strecha) downscaled to 512x342 with its calibration
as K.txt, so the reconstructed rotations can be compared with the ground truth.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest


def _program_main(name):
    """``main`` of ``pipelines/NAME.py`` (the programs are files, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"pipelines_{name}", Path(__file__).resolve().parents[1] / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main


build_main = _program_main("build_corr_dataset")


pytestmark = [pytest.mark.data, pytest.mark.slow]

SCALE = 0.5


def _downscale(src: Path, dst: Path, names, K=None):
    from PIL import Image

    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        with Image.open(src / name) as im:
            w, h = im.size
            im.resize((round(w * SCALE), round(h * SCALE)), Image.LANCZOS).save(dst / name, quality=95)
    if K is not None:  # OpenCV convention (pixel centres at integers): c' = (c + 0.5) s - 0.5
        K = np.array(K, np.float64)
        K[:2, :2] *= SCALE
        K[:2, 2] = (K[:2, 2] + 0.5) * SCALE - 0.5
        np.savetxt(dst / "K.txt", K)
    return dst


@pytest.fixture(scope="module")
def herz_jesus(data_root, tmp_path_factory):
    from data_prep.scenes import read_strecha_camera

    src = data_root / "strecha" / "Herz-Jesus-P25"
    names = [f"{i:04d}.jpg" for i in range(4)]
    cams = {n: read_strecha_camera(src / "cameras" / f"{n}.camera") for n in names}
    folder = _downscale(src / "images", tmp_path_factory.mktemp("photos") / "herz4", names, cams[names[0]]["K"])
    return folder, {n: c["R"] for n, c in cams.items()}


def test_photos_to_dataset(herz_jesus, tmp_path, capsys):
    import pycolmap

    from data_prep.colmap_export import rotation_errors
    from data_prep.h5io import open_pairs, pair_keys, read_pair, read_settings

    folder, R_gt = herz_jesus
    out = tmp_path / "herz.h5"
    argv = ["--format", "photos", "--scene", str(folder), "--out", str(out), "--num-kp", "800",
            "--vis-threshold", "20", "--max-features", "4000", "--no-progress", "--summary-json", str(tmp_path / "s.json")]
    assert build_main(argv) == 0
    printed = capsys.readouterr().out
    assert "herz4: SfM registered 4/4 images" in printed and "mean reprojection error" in printed

    sfm = tmp_path / "herz_sfm" / "herz4"
    stats = json.loads((sfm / "stats.json").read_text())
    assert stats["images_registered"] == 4 and stats["images_given"] == 4 and stats["intrinsics_source"] == "K.txt"
    assert stats["points3D"] > 200 and stats["mean_reprojection_error_px"] < 1.0 and stats["mean_track_length"] > 2
    assert not list(tmp_path.glob("**/*.tmp*"))
    # a model other tools can open; its rotations agree with the ground truth (gauge-free)
    rec = pycolmap.Reconstruction(sfm / "model")
    errors = rotation_errors(rec, R_gt)
    assert errors["num_registered"] == 4 and errors["relative_deg"]["max"] < 1.0, errors
    und = pycolmap.Reconstruction(sfm / "undistorted" / "sparse")
    assert {c.model_name for c in und.cameras.values()} == {"PINHOLE"}

    settings = read_settings(out)
    assert settings["format"] == "photos" and settings["sfm"]["herz4"]["images_registered"] == 4
    assert json.loads((tmp_path / "s.json").read_text())["sfm"]["herz4"]["points3D"] == stats["points3D"]
    with open_pairs(out) as h5:
        keys = pair_keys(h5)
        assert len(keys) >= 6  # at least the three neighbouring pairs, both directions
        ratios = [read_pair(h5[k])["label"].mean() for k in keys]
    assert np.median(ratios) > 0.1, ratios

    # the same run again: refused without --overwrite (one line, exit 2); with it, the same model (seeded, one thread)
    assert build_main(argv[:-2] + ["--out", str(tmp_path / "other.h5"), "--sfm-dir", str(tmp_path / "herz_sfm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"SfM folder {sfm} exists" in err[0], err
    assert not (tmp_path / "other.h5").exists()
    from data_prep.sfm import reconstruct_photos

    again = reconstruct_photos(folder, tmp_path / "again", max_num_features=4000)
    for key in ("images_registered", "points3D", "mean_reprojection_error_px", "mean_track_length", "cameras"):
        assert again[key] == stats[key], key


def test_refuses_scene_with_too_few_registered_images(data_root, tmp_path, capsys):
    """Two Herz-Jesus views and a castle picture, no K.txt: fewer than 3 images register, the scene is refused."""
    src = data_root / "strecha" / "Herz-Jesus-P25" / "images"
    folder = _downscale(src, tmp_path / "mixed", ["0000.jpg", "0001.jpg"])
    _downscale(data_root / "strecha" / "castle-P30" / "images", folder, ["0015.jpg"])
    (folder / "0015.jpg").rename(folder / "0002.jpg")
    out = tmp_path / "mixed.h5"
    assert build_main(["--format", "photos", "--scene", str(folder), "--out", str(out), "--no-progress",
                       "--max-features", "2000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"mixed: structure from motion registered [0-2] of 3 images; a dataset needs "
                                        r"at least 3 registered images \(too little overlap", err[0]), err
    assert not out.exists() and list(tmp_path.iterdir()) == [folder]  # no model, no temporary folder


def test_bad_k_file(herz_jesus, tmp_path):
    from data_prep.sfm import reconstruct_photos

    folder, _ = herz_jesus
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in folder.glob("*.jpg"):
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "K.txt").write_text("1 0 0\n0 1 0\n")
    with pytest.raises(ValueError, match=r"K\.txt must hold a 3x3"):
        reconstruct_photos(bad, tmp_path / "sfm")
    (bad / "K.txt").write_text("400 0 5000\n0 400 100\n0 0 1\n")
    with pytest.raises(ValueError, match="principal point .* outside"):
        reconstruct_photos(bad, tmp_path / "sfm")
    assert not (tmp_path / "sfm").exists()
