"""COLMAP database export: pair lists, intrinsics parsing, database contents, atomic writing, mapping."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.colmap_export import (
    export_database,
    guess_intrinsics,
    image_pairs,
    list_images,
    parse_intrinsics,
    rotation_errors,
    run_mapper,
)
from n3sets.match_filter import MatchFilter

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["0003.jpg", "0004.jpg", "0005.jpg"]
NUM_KP = 300


class ConstantLogits(torch.nn.Module):
    """Stand-in classifier keeping every match: the export is tested independently of training."""

    conf = {"side_info": False}

    def forward(self, x, mask=None):
        return torch.full(x.shape[::2], 5.0)


def test_image_pairs():
    assert image_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert image_pairs(4, "sequential:1") == [(0, 1), (1, 2), (2, 3)]
    assert image_pairs(5, "sequential:2") == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4)]
    for bad in ("sequential:0", "sequential:x", "vocabtree"):
        with pytest.raises(ValueError, match="sequential:N"):
            image_pairs(4, bad)


def test_parse_and_guess_intrinsics(tmp_path):
    K = parse_intrinsics("900,910,500.5,330")
    assert np.allclose(K, [[900, 0, 500.5], [0, 910, 330], [0, 0, 1]])
    np.savetxt(tmp_path / "K.txt", K)
    assert np.allclose(parse_intrinsics(str(tmp_path / "K.txt")), K)
    np.savetxt(tmp_path / "bad.txt", np.eye(2))
    with pytest.raises(ValueError, match="3x3"):
        parse_intrinsics(str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="fx,fy,cx,cy"):
        parse_intrinsics("900,900,500")
    with pytest.raises(ValueError, match="positive"):
        parse_intrinsics("-900,900,500,300")
    K, source = guess_intrinsics(None, 1024, 683)
    assert source == "size" and np.isclose(K[0, 0], 1.2 * 1024) and np.allclose(K[:2, 2], [511.5, 341])


def test_exif_focal_length(tmp_path):
    from PIL import Image

    img = Image.new("L", (400, 300))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 28  # FocalLengthIn35mmFilm
    img.save(tmp_path / "a.jpg", exif=exif)
    K, source = guess_intrinsics(tmp_path / "a.jpg", 400, 300)
    assert source == "exif" and np.isclose(K[0, 0], 28 / 36 * 400)


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path)


@pytest.fixture(scope="module")
def entry(strecha_root):
    from data_prep.scenes import read_strecha_scene

    return read_strecha_scene(strecha_root / "entry-P10")


@pytest.fixture(scope="module")
def exported(entry, tmp_path_factory):
    """Filtered (constant network + RANSAC) and unfiltered databases of three entry-P10 images."""
    out = tmp_path_factory.mktemp("colmap")
    image_dir = Path(entry.image_paths[0]).parent
    common = dict(num_kp=NUM_KP, K=entry.K[0], image_names=NAMES, camera_model="PINHOLE")
    filtered = export_database(image_dir, out / "filtered.db", match_filter=MatchFilter(ConstantLogits()), **common)
    unfiltered = export_database(image_dir, out / "unfiltered.db", use_filter=False, **common)
    return out, image_dir, filtered, unfiltered


def test_database_contents(exported):
    import pycolmap

    from data_prep.features import detect_sift, load_gray

    out, image_dir, summary, _ = exported
    num_kp = [len(detect_sift(load_gray(image_dir / n), num_kp=NUM_KP)[0]) for n in NAMES]
    with pycolmap.Database.open(out / "filtered.db") as db:
        assert db.num_images() == 3 and db.num_cameras() == 1 and db.num_frames() == 3 and db.num_rigs() == 1
        assert db.num_keypoints() == sum(num_kp)
        names = {im.image_id: im.name for im in db.read_all_images()}
        assert sorted(names.values()) == NAMES
        # every keypoint of the first image of a pair has a putative match (its nearest neighbour)
        assert db.num_matches() == num_kp[0] + num_kp[0] + num_kp[1]
        # only pairs that pass MatchFilter's two-view verification get a geometry; the others
        # carry the failed test as their reason (with a constant network every match is kept, and
        # 0003-0005 has many epipolar-consistent matches behind the cameras)
        assert db.num_verified_image_pairs() == summary["verified_pairs"] >= 2
        for rec in summary["pairs"]:
            assert rec["reason"] == "" or rec["reason"].startswith("verification failed"), rec
        assert 0 < db.num_inlier_matches() < db.num_matches()
        cam = db.read_all_cameras()[0]
        # COLMAP puts pixel centres at +0.5: principal point and keypoints are shifted
        assert cam.model_name == "PINHOLE" and np.isclose(cam.params[2], 506.563333 + 0.5)
        first = next(i for i, n in names.items() if n == NAMES[0])
        kp = db.read_keypoints(first)
        ref = detect_sift(load_gray(image_dir / NAMES[0]), num_kp=NUM_KP)[0]
        assert np.allclose(kp[:, :2], ref + 0.5, atol=1e-4)
        pair_ids, geoms = db.read_two_view_geometries()
        for g in geoms:
            m = g.inlier_matches
            assert len(m) >= 15 and len(np.unique(m[:, 1])) == len(m)  # one match per keypoint
            assert np.allclose(g.cam2_from_cam1.rotation.matrix() @ g.cam2_from_cam1.rotation.matrix().T, np.eye(3))
    for rec in summary["pairs"]:
        assert rec["inliers"] <= rec["kept"] <= rec["putative"]


def test_mapper_registers_with_ground_truth_rotations(exported, entry):
    out, image_dir, _, unfiltered = exported
    R_gt = {n: entry.R[entry.image_names.index(n)] for n in NAMES}
    assert unfiltered["verified_pairs"] == 3
    for name in ("filtered", "unfiltered"):
        rec = run_mapper(out / f"{name}.db", image_dir, out / f"sparse_{name}", fixed_intrinsics=True)
        err = rotation_errors(rec, R_gt)
        assert err["num_registered"] == 3, name
        assert err["relative_deg"]["max"] < 2.0 and err["absolute_deg"]["max"] < 2.0, (name, err)


def test_rotation_errors_measure():
    # a known error of 3 degrees on one camera of an otherwise exact, globally rotated set
    from scipy.spatial.transform import Rotation

    class Img:
        def __init__(self, name, R):
            self.name, self.has_pose, self._R = name, True, R

        def cam_from_world(self):
            return type("P", (), {"rotation": type("Q", (), {"matrix": lambda s: self._R})()})()

    gt = {f"{i}": Rotation.random(random_state=i).as_matrix() for i in range(4)}
    world = Rotation.random(random_state=9).as_matrix()
    est = {n: R @ world for n, R in gt.items()}
    est["2"] = Rotation.from_euler("x", 3, degrees=True).as_matrix() @ est["2"]
    rec = type("Rec", (), {"images": {i: Img(n, R) for i, (n, R) in enumerate(est.items())}})()
    err = rotation_errors(rec, gt)
    assert err["num_registered"] == 4
    assert np.isclose(err["relative_deg"]["max"], 3.0, atol=1e-6)
    assert 1.5 < err["absolute_deg"]["max"] < 3.0 + 1e-6  # the alignment spreads the error a little
    assert rotation_errors(None, gt) == {"num_images": 4, "num_registered": 0, "registered": []}


def test_atomic_and_no_overwrite(exported, entry):
    out, image_dir, _, _ = exported
    before = (out / "unfiltered.db").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite"):
        export_database(image_dir, out / "unfiltered.db", use_filter=False, image_names=NAMES[:2])
    assert (out / "unfiltered.db").stat().st_mtime_ns == before
    assert not list(out.glob(".*.tmp"))  # no temporary database left behind
    with pytest.raises(ValueError, match="need at least 2 images"):
        export_database(image_dir, out / "one.db", use_filter=False, image_names=NAMES[:1])
    assert not (out / "one.db").exists()


def test_cli_no_filter(exported, entry):
    out, image_dir, _, _ = exported
    tiny = out / "tiny"
    tiny.mkdir()
    for n in NAMES[:2]:
        (tiny / n).symlink_to(image_dir / n)
    K = entry.K[0]
    cmd = [sys.executable, str(ROOT / "pipelines" / "colmap_export.py"), "--images", str(tiny), "--database",
           str(out / "cli.db"), "--no-filter", "--num-kp", "200", "--K", f"{K[0, 0]},{K[1, 1]},{K[0, 2]},{K[1, 2]}",
           "--pairs", "sequential:1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 images, 1 pairs" in proc.stdout
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "exists" in proc.stderr


def _downscaled_scene(scene, names, out_dir, scale=0.5):
    """Copies of ``names`` resized by ``scale`` (area interpolation) and their intrinsics.

    Keypoints and K use OpenCV's convention (pixel centres at integers), so a pixel position
    maps as ``(u + 0.5) * scale - 0.5``.
    """
    import cv2

    out_dir.mkdir()
    for name in names:
        img = cv2.imread(str(Path(scene.image_paths[0]).parent / name), cv2.IMREAD_COLOR)
        size = (round(img.shape[1] * scale), round(img.shape[0] * scale))
        cv2.imwrite(str(out_dir / name), cv2.resize(img, size, interpolation=cv2.INTER_AREA),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
    K = np.array(scene.K[scene.image_names.index(names[0])], dtype=np.float64)
    S = np.array([[scale, 0, 0.5 * scale - 0.5], [0, scale, 0.5 * scale - 0.5], [0, 0, 1]])
    return S @ K


@pytest.mark.data
@pytest.mark.slow
def test_shipped_network_and_real_mapper_on_real_images(entry, tmp_path):
    # End to end without stand-ins: SIFT on four real (downscaled) entry-P10 images, the smallest
    # shipped classifier loaded by name inside export_database, and pycolmap's incremental mapper;
    # the reconstruction must register every image with the ground-truth rotations.
    names = ["0003.jpg", "0004.jpg", "0005.jpg", "0006.jpg"]
    weights = "cnnet-strecha"
    assert all(np.allclose(entry.K[entry.image_names.index(n)], entry.K[entry.image_names.index(names[0])])
               for n in names)
    image_dir = tmp_path / "images"
    K = _downscaled_scene(entry, names, image_dir)
    summary = export_database(image_dir, tmp_path / "net.db", weights=weights, num_kp=800, K=K,
                              camera_model="PINHOLE", image_names=names)
    assert summary["verified_pairs"] >= 5 and len(summary["pairs"]) == 6
    for rec in summary["pairs"]:
        # the network decides: it drops a large share of the nearest-neighbour matches
        assert rec["inliers"] <= rec["kept"] < 0.6 * rec["putative"]  # 22-38 % kept
    rec = run_mapper(tmp_path / "net.db", image_dir, tmp_path / "sparse", fixed_intrinsics=True)
    err = rotation_errors(rec, {n: entry.R[entry.image_names.index(n)] for n in names})
    assert err["num_registered"] == 4, err
    assert err["relative_deg"]["max"] < 1.0 and err["absolute_deg"]["max"] < 1.0, err  # 0.26 / 0.18 measured
    assert rec.num_points3D() > 50  # about 200 measured
