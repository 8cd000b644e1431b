import os

import cv2
import numpy as np
import pytest
import torch

from n3images.io import image_bit_depth, list_images, read_image, write_image


def _rgb(h=6, w=7, seed=0):
    return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


def test_read_8bit_grey_and_colour_exact(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (5, 6), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    out = read_image(tmp_path / "g.png")
    assert out.dtype == np.float32 and out.shape == (5, 6)
    np.testing.assert_array_equal(out, grey.astype(np.float32) / 255)
    bgr = np.zeros((4, 3, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    bgr[0, 0] = (10, 20, 30)
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    rgb = read_image(tmp_path / "c.png")
    assert rgb.shape == (4, 3, 3)
    np.testing.assert_array_equal(rgb[1, 1], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(rgb[0, 0], np.array([30, 20, 10]) / 255, rtol=1e-6)
    assert image_bit_depth(tmp_path / "c.png") == 8


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".PNG"])
@pytest.mark.parametrize("colour", [False, True])
def test_16bit_round_trip_exact(tmp_path, suffix, colour):
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 65536, (9, 8, 3) if colour else (9, 8))
    img = levels / 65535.0
    path = write_image(tmp_path / f"x{suffix}", img, bit_depth=16)
    assert image_bit_depth(path) == 16
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    if colour:
        np.testing.assert_array_equal(raw, levels[..., ::-1])  # stored as BGR
    back = read_image(path)
    assert back.shape == img.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, img, atol=1e-7)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_8bit_round_trip_and_rounding(tmp_path, suffix):
    img = _rgb(seed=2)
    back = read_image(write_image(tmp_path / f"x{suffix}", img))
    # 8-bit quantization: round to the nearest level, error at most half a level
    assert np.abs(back - img).max() <= 0.5 / 255 + 1e-7
    np.testing.assert_array_equal(back * 255, np.rint(img.astype(np.float64) * 255))


def test_write_clips_and_accepts_torch_and_single_channel(tmp_path):
    img = np.array([[-0.5, 0.0], [1.0, 2.0]])
    back = read_image(write_image(tmp_path / "c.png", img))
    np.testing.assert_array_equal(back, [[0.0, 0.0], [1.0, 1.0]])
    t = torch.full((3, 4, 1), 0.5)
    back = read_image(write_image(tmp_path / "t.png", t))
    assert back.shape == (3, 4)
    np.testing.assert_array_equal(back, np.full((3, 4), 128 / 255, np.float32))


def test_alpha_is_dropped(tmp_path):
    bgra = np.zeros((3, 4, 4), np.uint8)
    bgra[..., 0] = 200  # blue
    bgra[..., 3] = 17  # alpha, must not leak into the result
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    rgb = read_image(tmp_path / "a.png")
    assert rgb.shape == (3, 4, 3)
    np.testing.assert_allclose(rgb[0, 0], [0.0, 0.0, 200 / 255], rtol=1e-6)


def test_modes(tmp_path):
    img = _rgb(seed=3)
    path = write_image(tmp_path / "c.png", img, bit_depth=16)
    exact = read_image(path)
    grey = read_image(path, mode="gray")
    assert grey.shape == img.shape[:2]
    np.testing.assert_allclose(grey, exact @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-6)
    gpath = write_image(tmp_path / "g.png", grey)
    assert read_image(gpath, mode="auto").shape == grey.shape
    rgb = read_image(gpath, mode="rgb")
    assert rgb.shape == grey.shape + (3,)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    with pytest.raises(ValueError, match="mode"):
        read_image(gpath, mode="grey")


def test_jpeg(tmp_path):
    img = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    back = read_image(write_image(tmp_path / "x.jpg", img))
    assert back.shape == (32, 32) and np.abs(back - img).max() < 0.03
    with pytest.raises(ValueError, match="bit_depth"):
        write_image(tmp_path / "y.jpeg", img, bit_depth=16)
    assert not (tmp_path / "y.jpeg").exists()


def test_read_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(missing)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        image_bit_depth(missing)
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match="junk.png"):
        read_image(junk)
    folder = tmp_path / "dir.png"
    folder.mkdir()
    with pytest.raises(ValueError, match="dir.png"):
        read_image(folder)


def test_write_atomic_protect_and_errors(tmp_path):
    img = _rgb(seed=4)
    src = write_image(tmp_path / "in.png", img)
    before = src.read_bytes()
    with pytest.raises(ValueError, match="in.png"):
        write_image(src, np.zeros((6, 7)), protect=src)
    # a different spelling of the same file is still protected
    other_spelling = tmp_path / "sub" / ".." / "in.png"
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="protected"):
        write_image(other_spelling, np.zeros((6, 7)), protect=[tmp_path / "x.png", str(src)])
    assert src.read_bytes() == before
    # unprotected overwrite works and replaces the content
    write_image(src, np.zeros((6, 7)), protect=tmp_path / "x.png")
    assert read_image(src).max() == 0
    # parent folders are created, and no temporary files are left behind
    deep = write_image(tmp_path / "a" / "b" / "out.tif", img, bit_depth=16)
    assert deep.is_file()
    assert sorted(p.name for p in deep.parent.iterdir()) == ["out.tif"]
    assert os.stat(deep).st_mode & 0o444 == 0o444  # readable like an ordinary file
    with pytest.raises(ValueError, match="suffix"):
        write_image(tmp_path / "x.gif", img)
    with pytest.raises(ValueError, match="NaN"):
        write_image(tmp_path / "nan.png", np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match=r"\(3, 4, 2\)"):
        write_image(tmp_path / "bad.png", np.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match="float"):
        write_image(tmp_path / "int.png", np.zeros((3, 4), np.uint8))
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))


def test_list_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.Tiff", "10.bmp", "2.jpeg", "notes.txt", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "0.png").write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["10.bmp", "2.jpeg", "a.jpg", "b.PNG", "c.Tiff"]  # sorted by file name
    with pytest.raises(ValueError, match="missing"):
        list_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="sub2"):
        (tmp_path / "sub2").mkdir()
        list_images(tmp_path / "sub2")


def test_real_set12(data_root):
    files = list_images(data_root / "images" / "set12")
    assert [p.name for p in files] == [f"{i:02d}.png" for i in range(1, 13)]
    img = read_image(files[0])
    assert img.shape == (256, 256) and img.dtype == np.float32
    assert 0 <= img.min() < img.max() <= 1
    assert image_bit_depth(files[0]) == 8
    # levels are exact multiples of 1/255
    np.testing.assert_allclose(img * 255, np.rint(img * 255), atol=1e-4)
