import shutil

import h5py
import numpy as np
import pytest

from data_prep.scenes import (
    Scene,
    read_colmap_scene,
    read_scene,
    read_strecha_camera,
    read_strecha_scene,
    read_yi_scene,
    write_yi_layout,
)


def _small_strecha(src, dst, n=3):
    """A Strecha-layout copy of the first n views (images symlinked, cameras copied)."""
    (dst / "images").mkdir(parents=True)
    (dst / "cameras").mkdir()
    for img in sorted((src / "images").iterdir())[:n]:
        (dst / "images" / img.name).symlink_to(img)
        shutil.copyfile(src / "cameras" / f"{img.name}.camera", dst / "cameras" / f"{img.name}.camera")
    return dst


def test_strecha_reader_follows_readme_convention(strecha_root):
    scene = read_strecha_scene(strecha_root / "entry-P10")
    assert len(scene) == 10 and scene.image_names[0] == "0000.jpg"
    raw = np.array((strecha_root / "entry-P10" / "cameras" / "0003.jpg.camera").read_text().split(), float)
    K, R_file, C = raw[:9].reshape(3, 3), raw[12:21].reshape(3, 3), raw[21:24]
    np.testing.assert_allclose(scene.K[3], K)
    # x_cam = R_file^T (X - C): the camera centre maps to the origin, R is the transpose
    np.testing.assert_allclose(scene.R[3], R_file.T)
    np.testing.assert_allclose(scene.R[3] @ C + scene.t[3], 0, atol=1e-12)
    # the stored rotations have 6-9 digits, so R^T R = I only to ~1e-6
    np.testing.assert_allclose(scene.centers[3], C, atol=1e-4)
    assert tuple(scene.sizes[3]) == (1024, 683)


def test_strecha_missing_and_bad_camera(strecha_root, tmp_path):
    scene_dir = _small_strecha(strecha_root / "entry-P10", tmp_path / "s")
    (scene_dir / "cameras" / "0001.jpg.camera").unlink()
    with pytest.raises(FileNotFoundError, match="0001.jpg.camera"):
        read_strecha_scene(scene_dir)
    (scene_dir / "cameras" / "0001.jpg.camera").write_text("1 2 3\n")
    with pytest.raises(ValueError, match=r"0001.jpg.camera.*26 numbers"):
        read_strecha_scene(scene_dir)
    with pytest.raises(FileNotFoundError, match="image folder"):
        read_strecha_scene(tmp_path / "nowhere")
    # a NaN or a zero focal length is an error naming the camera file, not a scene without pairs
    good = (strecha_root / "entry-P10" / "cameras" / "0001.jpg.camera").read_text().split()
    for index, value, message in ((0, "nan", "NaN"), (4, "0", "focal lengths must be > 0"),
                                  (24, "-5", "image size"), (22, "inf", "NaN or infinite")):
        numbers = list(good)
        numbers[index] = value
        (scene_dir / "cameras" / "0001.jpg.camera").write_text(" ".join(numbers) + "\n")
        with pytest.raises(ValueError, match=rf"0001.jpg.camera.*{message}"):
            read_strecha_scene(scene_dir)
    with pytest.raises(FileNotFoundError, match="nope.camera"):
        read_strecha_camera(tmp_path / "nope.camera")


def test_yi_layout_round_trip(strecha_root, tmp_path):
    scene = read_strecha_scene(strecha_root / "entry-P10")
    covis = np.arange(100, dtype=float).reshape(10, 10)
    split = write_yi_layout(scene, tmp_path / "entry" / "train", covisibility=covis)
    # the release stores the principal point relative to the image centre
    with h5py.File(split / "calibration" / "calibration_000002.h5", "r") as h5:
        assert set(h5.keys()) == {"K", "R", "T", "imsize"}
        np.testing.assert_allclose(h5["K"][0, 2], scene.K[2][0, 2] - (1024 - 1) / 2)
        np.testing.assert_allclose(h5["imsize"][()].ravel(), [1024, 683])
    back = read_yi_scene(split)
    assert back.name == "entry" and back.image_names == scene.image_names
    np.testing.assert_allclose(back.K, scene.K, atol=1e-9)
    np.testing.assert_allclose(back.R, scene.R)
    np.testing.assert_allclose(back.t, scene.t)
    np.testing.assert_array_equal(back.sizes, scene.sizes)
    np.testing.assert_array_equal(back.covisibility, covis)
    assert all(p.endswith(n) for p, n in zip(back.image_paths, scene.image_names))
    # dispatch by name gives the same scene
    np.testing.assert_allclose(read_scene("yi", split).R, scene.R)
    sub = back.subset([4, 1])
    assert sub.image_names == [scene.image_names[4], scene.image_names[1]]
    np.testing.assert_array_equal(sub.covisibility, covis[np.ix_([4, 1], [4, 1])])
    np.testing.assert_allclose(sub.t, scene.t[[4, 1]])
    assert len(back.subset(slice(2, 5))) == 3
    with pytest.raises(ValueError, match="indices"):
        back.subset([10])


def test_yi_layout_errors(strecha_root, tmp_path):
    scene = read_strecha_scene(strecha_root / "entry-P10")
    split = write_yi_layout(scene, tmp_path / "x" / "test", covisibility=np.ones((10, 10)))
    (split / "calibration" / "calibration_000004.h5").unlink()
    with pytest.raises(FileNotFoundError, match="calibration_000004.h5"):
        read_yi_scene(split)
    split2 = write_yi_layout(scene, tmp_path / "y" / "test", covisibility=np.ones((10, 10)))
    np.savetxt(split2 / "visibility" / "vis_000001.txt", np.ones(3))
    with pytest.raises(ValueError, match="vis_000001.txt"):
        read_yi_scene(split2)
    (tmp_path / "z").mkdir()
    with pytest.raises(FileNotFoundError, match="images.txt"):
        read_yi_scene(tmp_path / "z")


def _colmap_model(scene: Scene, out_dir, n=3, binary=False, distortion=None):
    import pycolmap

    rec = pycolmap.Reconstruction()
    for i in range(n):
        K = scene.K[i]
        w, h = (int(v) for v in scene.sizes[i])
        if distortion is None:
            cam = pycolmap.Camera(model="PINHOLE", width=w, height=h, params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]], camera_id=i + 1)
        else:
            cam = pycolmap.Camera(model="SIMPLE_RADIAL", width=w, height=h, params=[K[0, 0], K[0, 2], K[1, 2], distortion], camera_id=i + 1)
        rec.add_camera_with_trivial_rig(cam)
        img = pycolmap.Image(name=scene.image_names[i], keypoints=np.zeros((4, 2)), camera_id=i + 1, image_id=i + 1)
        rec.add_image_with_trivial_frame(img, pycolmap.Rigid3d(pycolmap.Rotation3d(scene.R[i]), scene.t[i]))
    for k in range(3):  # three 3D points seen by images 1 and 2, one of them also by 3
        track = pycolmap.Track()
        track.add_element(1, k)
        track.add_element(2, k)
        if k == 0:
            track.add_element(3, k)
        rec.add_point3D(np.zeros(3), track)
    out_dir.mkdir(parents=True)
    (rec.write_binary if binary else rec.write_text)(str(out_dir))
    return out_dir


@pytest.mark.parametrize("binary", [False, True])
def test_colmap_round_trip(strecha_root, tmp_path, binary):
    scene = read_strecha_scene(strecha_root / "entry-P10")
    model = _colmap_model(scene, tmp_path / "sparse" / "0", binary=binary)
    back = read_colmap_scene(model, strecha_root / "entry-P10" / "images")
    assert back.image_names == scene.image_names[:3]
    np.testing.assert_allclose(back.K, scene.K[:3])
    # COLMAP stores a quaternion: the slightly non-orthonormal file rotations come back orthonormal
    np.testing.assert_allclose(back.R, scene.R[:3], atol=1e-5)
    np.testing.assert_allclose(back.t, scene.t[:3], atol=1e-9)
    np.testing.assert_array_equal(back.sizes, scene.sizes[:3])
    np.testing.assert_array_equal(back.covisibility, [[0, 3, 1], [3, 0, 1], [1, 1, 0]])


def test_colmap_errors(strecha_root, tmp_path):
    scene = read_strecha_scene(strecha_root / "entry-P10")
    with pytest.raises(FileNotFoundError, match="cameras.bin or cameras.txt"):
        (tmp_path / "empty").mkdir()
        read_colmap_scene(tmp_path / "empty", strecha_root / "entry-P10" / "images")
    model = _colmap_model(scene, tmp_path / "m1")
    with pytest.raises(FileNotFoundError, match="0000.jpg"):
        read_colmap_scene(model, tmp_path)
    distorted = _colmap_model(scene, tmp_path / "m2", distortion=0.05)
    with pytest.raises(ValueError, match="distortion"):
        read_colmap_scene(distorted, strecha_root / "entry-P10" / "images")
    with pytest.raises(ValueError, match="unknown scene format"):
        read_scene("bundler", tmp_path)
