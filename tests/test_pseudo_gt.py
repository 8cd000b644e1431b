"""data_prep.pseudo_gt / pipelines/check_pseudo_gt.py: SfM pseudo ground truth against true cameras.

A COLMAP model written from the true cameras of three entry-P10 views must give zero pose error
and the same labels; one camera turned by a known angle must give exactly that rotation error
and change labels; an unregistered view counts as missing.
"""
import json

import numpy as np
import pytest

pytestmark = [pytest.mark.data]

VIEWS = 3


def _rot(axis, deg):
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    a = np.radians(deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


def _model(scene, out_dir, views, turn=None):
    """COLMAP model of ``views`` with the true cameras (pixel centres at +0.5, COLMAP's convention);
    ``turn = (view, R)`` pre-multiplies that view's world-to-camera rotation."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    for n, i in enumerate(views, start=1):
        K = scene.K[i]
        w, h = (int(v) for v in scene.sizes[i])
        cam = pycolmap.Camera(model="PINHOLE", width=w, height=h,
                              params=[K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5], camera_id=n)
        rec.add_camera_with_trivial_rig(cam)
        R, t = scene.R[i], scene.t[i]
        if turn is not None and turn[0] == i:
            R, t = turn[1] @ R, turn[1] @ t
        U, _, Vt = np.linalg.svd(R)  # the Strecha files' rotations are orthonormal to ~1e-6 only
        img = pycolmap.Image(name=scene.image_names[i], keypoints=np.zeros((1, 2)), camera_id=n, image_id=n)
        rec.add_image_with_trivial_frame(img, pycolmap.Rigid3d(pycolmap.Rotation3d(U @ Vt), t))
    out_dir.mkdir(parents=True)
    rec.write_binary(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def entry3(strecha_root, tmp_path_factory, load_program):
    """Scene folder with the first three entry-P10 views and the dataset built from its true cameras."""
    from data_prep.scenes import read_strecha_scene

    src = strecha_root / "entry-P10"
    root = tmp_path_factory.mktemp("pgt") / "entry3"
    (root / "images").mkdir(parents=True)
    (root / "cameras").mkdir()
    for i in range(VIEWS):
        name = f"{i:04d}.jpg"
        (root / "images" / name).symlink_to(src / "images" / name)
        (root / "cameras" / f"{name}.camera").symlink_to(src / "cameras" / f"{name}.camera")
    h5 = root.parent / "entry3.h5"
    build = load_program("build_corr_dataset").main
    assert build(["--format", "strecha", "--scene", str(root), "--out", str(h5), "--num-kp", "400",
                  "--min-verified", "5", "--no-progress", "--cache-dir", str(root.parent / "cache")]) == 0
    return root, h5, read_strecha_scene(root)


def test_true_cameras_give_zero_error_and_the_same_labels(entry3, tmp_path):
    from data_prep.pseudo_gt import check_pseudo_gt

    root, h5, scene = entry3
    res = check_pseudo_gt(scene, _model(scene, tmp_path / "m", range(VIEWS)), h5)
    s = res["summary"]
    assert res["registered"] == VIEWS and s["pose_pairs"] == 3 and s["pose_pairs_missing"] == 0
    assert s["rotation_deg"]["max"] < 1e-3 and s["translation_deg"]["max"] < 1e-3, s
    assert s["label_pairs"] >= 4 and s["label_pairs_missing"] == 0
    assert s["true_inliers"] > 100
    assert s["agreement_all"] > 0.999 and s["precision_all"] > 0.99 and s["recall_all"] > 0.99, s


def test_turned_camera_and_unregistered_view(entry3, tmp_path):
    from data_prep.pseudo_gt import check_pseudo_gt

    root, h5, scene = entry3
    model = _model(scene, tmp_path / "m", [0, 1], turn=(1, _rot([0.3, 1.0, 0.2], 2.0)))
    res = check_pseudo_gt(scene, model, h5)
    s = res["summary"]
    assert s["pose_pairs"] == 1 and s["pose_pairs_missing"] == 2  # view 2 not registered
    assert res["poses"]["missing"] == [["0000.jpg", "0002.jpg"], ["0001.jpg", "0002.jpg"]]
    assert s["rotation_deg"]["max"] == pytest.approx(2.0, abs=1e-3)
    assert all("0002" not in p["name"] for p in res["labels"]["pairs"])
    assert s["label_pairs_missing"] == s["label_pairs"] * 2  # 2 of the 3 view pairs, both directions
    # a 2 degree rotation error moves epipolar lines by far more than the ~9 px threshold
    assert s["agreement_all"] < 0.95 and s["recall_all"] < 0.5, s


def test_program_writes_json_and_refuses_bad_input(entry3, tmp_path, capsys, load_program):
    root, h5, scene = entry3
    main = load_program("check_pseudo_gt").main
    sfm = tmp_path / "sfm"
    _model(scene, sfm / "model", range(VIEWS))
    out = tmp_path / "r.json"
    assert main(["--scene", str(root), "--sfm-dir", str(sfm), "--labels", str(h5), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SfM registered 3/3 views" in printed and "agreement" in printed
    res = json.loads(out.read_text())
    assert res["summary"]["pose_pairs"] == 3 and res["threshold"] == 1e-4 and res["sfm"] is None
    # refuses to overwrite, a folder without a model, a missing dataset, a non-Strecha scene: one line, exit 2
    for argv, needle in [
        (["--scene", str(root), "--sfm-dir", str(sfm), "--json", str(out)], "exists"),
        (["--scene", str(root), "--sfm-dir", str(tmp_path / "none"), "--json", str(tmp_path / "a.json")], "--run-sfm"),
        (["--scene", str(root), "--sfm-dir", str(sfm), "--labels", str(tmp_path / "x.h5"), "--json", str(tmp_path / "b.json")], "x.h5"),
        (["--scene", str(root / "images"), "--sfm-dir", str(sfm), "--json", str(tmp_path / "c.json")], "Strecha"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("check_pseudo_gt.py: error:") and needle in err[0], err
    assert not (tmp_path / "a.json").exists()
