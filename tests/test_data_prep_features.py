import numpy as np
import pytest

from data_prep import features
from data_prep.features import FeatureCache, detect_sift, load_gray, match_descriptors


def test_match_descriptors_against_brute_force():
    rng = np.random.default_rng(0)
    desc1 = rng.random((60, 128), dtype=np.float32)
    desc2 = rng.random((45, 128), dtype=np.float32)
    # plant 20 true matches: rows of desc1 appear, slightly perturbed, in desc2
    desc2[:20] = desc1[10:30] + rng.normal(0, 0.01, (20, 128)).astype(np.float32)
    m = match_descriptors(desc1, desc2)
    dist = np.linalg.norm(desc1[:, None] - desc2[None], axis=-1)
    order = np.argsort(dist, axis=1)
    np.testing.assert_array_equal(m["idx1"], np.arange(60))
    np.testing.assert_array_equal(m["idx2"], order[:, 0])
    d_sorted = np.sort(dist, axis=1)
    np.testing.assert_allclose(m["ratio"], d_sorted[:, 0] / d_sorted[:, 1], rtol=1e-4)
    back = np.argmin(dist, axis=0)
    np.testing.assert_array_equal(m["mutual"], back[order[:, 0]] == np.arange(60))
    # the planted matches are found, mutual and distinctive
    assert (m["idx2"][10:30] == np.arange(20)).all() and m["mutual"][10:30].all()
    assert m["ratio"][10:30].max() < 0.2


def test_match_descriptors_edge_cases():
    rng = np.random.default_rng(1)
    d = rng.random((5, 128), dtype=np.float32)
    empty = match_descriptors(d, np.zeros((0, 128), np.float32))
    assert all(len(v) == 0 for v in empty.values())
    one = match_descriptors(d, d[:1])
    assert (one["idx2"] == 0).all() and (one["ratio"] == 1.0).all()
    assert one["mutual"].sum() == 1
    with pytest.raises(ValueError, match=r"desc2 must have shape \(N, 128\)"):
        match_descriptors(d, np.zeros((3, 64), np.float32))


def test_detect_sift_on_real_image(strecha_root):
    image = load_gray(strecha_root / "entry-P10" / "images" / "0000.jpg")
    assert image.shape == (683, 1024) and image.dtype == np.uint8
    kpts, desc = detect_sift(image, num_kp=300)
    assert kpts.shape == (300, 2) and desc.shape == (300, 128)
    assert kpts.dtype == np.float32 and desc.dtype == np.float32
    assert (kpts[:, 0] >= 0).all() and (kpts[:, 0] < 1024).all() and (kpts[:, 1] < 683).all()
    # a blank image has no keypoints: empty arrays, not an error
    k0, d0 = detect_sift(np.full((100, 120), 128, np.uint8))
    assert k0.shape == (0, 2) and d0.shape == (0, 128)
    with pytest.raises(ValueError, match="uint8"):
        detect_sift(image.astype(np.float32))


def test_load_gray_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_gray(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_gray(bad)


def test_feature_cache_writes_once_and_reloads(strecha_root, tmp_path, monkeypatch):
    image = strecha_root / "entry-P10" / "images" / "0001.jpg"
    cache = FeatureCache(tmp_path / "cache", num_kp=200)
    assert not cache.has(image)
    k, d, size = cache.compute(image)
    assert size == (1024, 683) and len(k) == 200
    assert cache.has(image)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left

    def fail(*a, **kw):
        raise AssertionError("SIFT recomputed despite the cache")

    monkeypatch.setattr(features, "detect_sift", fail)
    k2, d2, size2 = cache.compute(image)
    np.testing.assert_array_equal(k, k2)
    np.testing.assert_array_equal(d, d2)
    # another setting is another cache entry
    assert not FeatureCache(tmp_path / "cache", num_kp=100).has(image)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        cache.compute(tmp_path / "nope.jpg")


def test_corrupt_cache_entry_is_reported_deleted_and_rebuilt(strecha_root, tmp_path, caplog):
    image = strecha_root / "entry-P10" / "images" / "0001.jpg"
    cache = FeatureCache(tmp_path / "cache", num_kp=50)
    k, d, size = cache.compute(image)
    entry = cache.path_for(image)
    for damage in (entry.read_bytes()[:100], b"random bytes"):  # truncated, then not a zip at all
        entry.write_bytes(damage)
        caplog.clear()
        with caplog.at_level("WARNING", logger="data_prep.features"):
            k2, d2, size2 = cache.compute(image)
        assert str(entry) in caplog.text and "recomputing" in caplog.text
        np.testing.assert_array_equal(k, k2)
        np.testing.assert_array_equal(d, d2)
        assert size2 == size and cache.has(image)
        # the rebuilt entry is good: no warning the next time
        caplog.clear()
        cache.compute(image)
        assert "unreadable" not in caplog.text


def test_load_gray_keeps_the_stored_grid_of_exif_rotated_photos(tmp_path):
    """Phone photos tagged "rotate 90" (EXIF orientation 6): COLMAP and the calibrations use the
    stored pixel grid, so must the keypoints (OpenCV's default would rotate the image)."""
    from PIL import Image

    from data_prep.features import load_gray

    arr = np.zeros((30, 50), np.uint8)
    arr[:, :10] = 255  # bright stripe on the left of the stored grid
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "rot.jpg") as im:
        assert im.getexif().get(0x0112) == 6
    img = load_gray(tmp_path / "rot.jpg")
    assert img.shape == (30, 50)
    assert img[:, :10].mean() > 200 and img[:, 20:].mean() < 50
