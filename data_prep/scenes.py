"""Scene readers: images with calibrated cameras, one interface for every layout.

A :class:`Scene` holds, per view, the image path and name, the pixel intrinsics ``K``, the
world-to-camera pose ``(R, t)`` (``x_cam = R X + t``) and the image size ``(width, height)``,
plus an optional covisibility matrix when the layout ships one.

Layouts
-------
``strecha``
    ``<scene>/images/NNNN.jpg`` and ``<scene>/cameras/NNNN.jpg.camera`` (26 numbers: K, three
    distortion coefficients, R, C, w h). The stored ``R`` is camera-to-world:
    ``x_cam = R^T (X - C)`` (verified in ``../shared/data/README.md``), so ``R_wc = R^T``,
    ``t_wc = -R^T C``.
``yi``
    The raw split folders of the St. Peter's / Reichstag / Brown releases used by Yi et al.
    (CVPR 2018) and OANet: ``images.txt``, ``calibration.txt`` and ``visibility.txt`` list, one
    line per image and relative to the split folder, the image, an h5 file with datasets ``K``,
    ``R``, ``T``, ``imsize`` and a text file with one covisibility value per image of the split.
    Facts taken from the public readers (vcg-uvic/learned-correspondence-release ``data.py``,
    ``dump_data.py``, ``config.py``; zjhthu/OANet ``dump_match/datasets.py``):

    * ``R``, ``T`` are world-to-camera: the readers form ``dR = R_j R_i^T``,
      ``dt = T_j - dR T_i`` (``flip_R`` defaults to False).
    * ``K[0, 2]``, ``K[1, 2]`` are offsets of the principal point from the image centre: the
      readers use ``cx = (w - 1) / 2 + K[0, 2]``, ``cy = (h - 1) / 2 + K[1, 2]``; ``imsize`` is
      ``(w, h)`` (OANet ``unpack_K``).
    * ``visibility`` file ``i`` holds row ``i`` of the covisibility matrix (``np.loadtxt``
      flattened); pairs ``(i, j)``, ``i != j``, are used when ``vis[i][j] > vis_th``, with
      ``vis_th = 100`` (shared 3D points) for St. Peter's and Reichstag and ``0.5`` for the
      Brown/SUN3D-style indoor sets (``brown_bm_3_05``); both directions are kept, then shuffled
      with seed 1234 and cut to 10000 train / 1000 val / 1000 test pairs.
``colmap``
    A COLMAP sparse model (text or binary) read with pycolmap, plus the image folder. Cameras
    with lens distortion are refused (undistort the images first with COLMAP's
    ``image_undistorter``) because labels assume a pinhole model. Covisibility is the number of
    3D points two images share.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "Scene",
    "read_strecha_scene",
    "read_yi_scene",
    "read_colmap_scene",
    "read_scene",
    "write_yi_layout",
    "YI_VIS_THRESHOLDS",
]

#: covisibility thresholds Yi et al. use (config.py ``setup_dataset``); pairs need ``vis > th``
YI_VIS_THRESHOLDS = {"st_peters": 100.0, "reichstag": 100.0, "brown_bm_3_05": 0.5}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".ppm", ".bmp", ".tif", ".tiff")


@dataclass
class Scene:
    """Views of one scene: ``K`` ``(V, 3, 3)``, world-to-camera ``R`` ``(V, 3, 3)``, ``t`` ``(V, 3)``,
    ``sizes`` ``(V, 2)`` as ``(width, height)``, image paths and names, optional ``covisibility``
    ``(V, V)`` (larger = more overlap; ``None`` when the layout has none)."""

    name: str
    root: Path
    image_paths: list
    image_names: list
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    sizes: np.ndarray
    covisibility: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        v = len(self.image_paths)
        if len(self.image_names) != v:
            raise ValueError(f"scene {self.name}: {v} image paths but {len(self.image_names)} names")
        for attr, shape in (("K", (v, 3, 3)), ("R", (v, 3, 3)), ("t", (v, 3)), ("sizes", (v, 2))):
            value = np.asarray(getattr(self, attr))
            if value.shape != shape:
                raise ValueError(f"scene {self.name}: {attr} must have shape {shape}, got {value.shape}")
        for attr in ("K", "R", "t", "sizes") if v else ():
            bad = ~np.isfinite(np.asarray(getattr(self, attr), dtype=np.float64)).reshape(v, -1).all(axis=1)
            if bad.any():
                view = self.image_names[int(np.flatnonzero(bad)[0])]
                raise ValueError(f"scene {self.name}: {attr} of view {view} holds NaN or infinite values")
        if self.covisibility is not None and np.asarray(self.covisibility).shape != (v, v):
            raise ValueError(f"scene {self.name}: covisibility must have shape {(v, v)}, got {np.shape(self.covisibility)}")

    def __len__(self) -> int:
        return len(self.image_paths)

    def subset(self, indices) -> "Scene":
        """The scene restricted to the views ``indices`` (a slice or a sequence of ints), in that order."""
        idx = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= len(self))):
            raise ValueError(f"indices must select views 0..{len(self) - 1}, got {indices!r}")
        covis = None if self.covisibility is None else np.asarray(self.covisibility)[np.ix_(idx, idx)]
        return Scene(
            name=self.name,
            root=self.root,
            image_paths=[self.image_paths[i] for i in idx],
            image_names=[self.image_names[i] for i in idx],
            K=self.K[idx],
            R=self.R[idx],
            t=self.t[idx],
            sizes=self.sizes[idx],
            covisibility=covis,
            meta=dict(self.meta),
        )

    @property
    def centers(self) -> np.ndarray:
        """Camera centres in world coordinates ``(V, 3)``: ``C = -R^T t``."""
        return -np.einsum("vji,vj->vi", self.R, self.t)

    @property
    def viewing_directions(self) -> np.ndarray:
        """Unit optical axes in world coordinates ``(V, 3)`` (third row of ``R``)."""
        return self.R[:, 2, :] / np.linalg.norm(self.R[:, 2, :], axis=-1, keepdims=True)


def _check_camera(source, K, size, **values) -> None:
    """``ValueError`` naming ``source`` (the camera file) unless the camera is usable.

    Every number finite (a NaN focal length would silently make every pair "not covisible"),
    positive focal lengths, ``K``'s last row ``[0, 0, 1]``, a positive integer image size.
    """
    K = np.asarray(K, dtype=np.float64)
    for name, value in {"K": K, "size": size, **values}.items():
        value = np.asarray(value, dtype=np.float64)
        if not np.isfinite(value).all():
            raise ValueError(f"{source}: {name} holds NaN or infinite values {value.reshape(-1).tolist()}")
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise ValueError(f"{source}: focal lengths must be > 0, got fx={K[0, 0]:g}, fy={K[1, 1]:g}")
    if not np.allclose(K[2], (0.0, 0.0, 1.0)):
        raise ValueError(f"{source}: the last row of K must be [0, 0, 1], got {K[2].tolist()}")
    w, h = np.asarray(size, dtype=np.float64).reshape(-1)[:2]
    if not (w >= 1 and h >= 1 and w == int(w) and h == int(h)):
        raise ValueError(f"{source}: image size must be positive whole pixels, got {w:g} x {h:g}")


def _check_rotation(R: np.ndarray, source) -> None:
    # Loose tolerance: camera files store rotations with 6-9 digits.
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise ValueError(f"{source}: R is not a rotation matrix")


# --------------------------------------------------------------------------------------- strecha
def read_strecha_camera(path) -> dict:
    """One Strecha ``.camera`` file -> dict(K, R (world-to-camera), t, size (w, h), center)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"camera file not found: {path}")
    try:
        values = np.array(path.read_text().split(), dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: not a Strecha camera file ({err})") from err
    if values.size != 26:
        raise ValueError(f"{path}: a Strecha camera file has 26 numbers, found {values.size}")
    K = values[:9].reshape(3, 3)
    dist = values[9:12]
    R_cw = values[12:21].reshape(3, 3)  # camera-to-world (README: x_cam = R^T (X - C))
    C = values[21:24]
    w, h = values[24:26]
    _check_camera(path, K, (w, h), distortion=dist, R=R_cw, C=C)
    if np.any(dist != 0):
        raise ValueError(f"{path}: non-zero radial distortion {dist.tolist()} is not supported (undistort first)")
    _check_rotation(R_cw, path)
    R = R_cw.T
    return {"K": K, "R": R, "t": -R @ C, "size": np.array([w, h]), "center": C}


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"no images in {folder}")
    return images


def read_strecha_scene(root) -> Scene:
    """Read ``root/images/*`` and ``root/cameras/<image name>.camera`` (see module docstring)."""
    root = Path(root)
    images = _list_images(root / "images")
    cams = [read_strecha_camera(root / "cameras" / f"{p.name}.camera") for p in images]
    return Scene(
        name=root.name,
        root=root,
        image_paths=[str(p) for p in images],
        image_names=[p.name for p in images],
        K=np.stack([c["K"] for c in cams]),
        R=np.stack([c["R"] for c in cams]),
        t=np.stack([c["t"] for c in cams]),
        sizes=np.stack([c["size"] for c in cams]).astype(np.int64),
        meta={"format": "strecha"},
    )


# -------------------------------------------------------------------------------------------- yi
def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_yi_calibration(path: Path) -> dict:
    import h5py

    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    try:
        with h5py.File(path, "r") as h5:
            missing = [k for k in ("K", "R", "T", "imsize") if k not in h5]
            if missing:
                raise ValueError(f"{path}: calibration file misses {missing}")
            try:
                K = np.asarray(h5["K"][()], dtype=np.float64).reshape(3, 3)
                R = np.asarray(h5["R"][()], dtype=np.float64).reshape(3, 3)
                T = np.asarray(h5["T"][()], dtype=np.float64).reshape(3)
                imsize = np.asarray(h5["imsize"][()], dtype=np.float64).reshape(-1)
            except (TypeError, ValueError) as err:  # wrong sizes or non-numeric data
                raise ValueError(f"{path}: K and R must hold 3x3, T 3 and imsize 2 numbers ({err})") from None
            if imsize.size != 2:
                raise ValueError(f"{path}: imsize must hold 2 numbers (width, height), got {imsize.size}")
    except OSError as err:
        raise ValueError(f"cannot read calibration file {path}: {err}") from err
    _check_camera(path, K, imsize, R=R, T=T)
    _check_rotation(R, path)
    w, h = imsize
    # The releases store the principal point as an offset from the image centre.
    K = K.copy()
    K[0, 2] += (w - 1.0) * 0.5
    K[1, 2] += (h - 1.0) * 0.5
    return {"K": K, "R": R, "t": T, "size": np.array([w, h])}


def read_yi_scene(split_dir, name: str | None = None) -> Scene:
    """Read a split folder of the Yi et al. / OANet raw layout (see module docstring).

    ``visibility.txt`` is optional; without it ``covisibility`` is ``None``.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"scene folder not found: {split_dir}")
    images = _read_list(split_dir / "images.txt")
    calibs = _read_list(split_dir / "calibration.txt")
    if len(images) != len(calibs):
        raise ValueError(f"{split_dir}: images.txt lists {len(images)} images, calibration.txt {len(calibs)} files")
    cams = [_read_yi_calibration(split_dir / c) for c in calibs]
    covis = None
    if (split_dir / "visibility.txt").is_file():
        vis_files = _read_list(split_dir / "visibility.txt")
        if len(vis_files) != len(images):
            raise ValueError(f"{split_dir}: visibility.txt lists {len(vis_files)} files for {len(images)} images")
        rows = []
        for v in vis_files:
            vp = split_dir / v
            if not vp.is_file():
                raise FileNotFoundError(f"visibility file not found: {vp}")
            row = np.loadtxt(vp, dtype=np.float64).reshape(-1)
            if row.size != len(images):
                raise ValueError(f"{vp}: {row.size} covisibility values for {len(images)} images")
            rows.append(row)
        covis = np.stack(rows)
    return Scene(
        name=name or (split_dir.parent.name if split_dir.name in ("train", "val", "test") else split_dir.name),
        root=split_dir,
        image_paths=[str(split_dir / p) for p in images],
        image_names=[Path(p).name for p in images],
        K=np.stack([c["K"] for c in cams]),
        R=np.stack([c["R"] for c in cams]),
        t=np.stack([c["t"] for c in cams]),
        sizes=np.stack([c["size"] for c in cams]).astype(np.int64),
        covisibility=covis,
        meta={"format": "yi", "split": split_dir.name},
    )


def write_yi_layout(scene: Scene, out_dir, covisibility: np.ndarray | None = None, link_images: bool = True) -> Path:
    """Write ``scene`` as a split folder of the Yi et al. raw layout (for tests and conversions).

    Images are symlinked (or copied with ``link_images=False``) into ``out_dir/images``;
    calibration h5 files store ``K`` with the principal point relative to the image centre.
    """
    import shutil

    import h5py

    out_dir = Path(out_dir)
    for sub in ("images", "calibration", "visibility"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    covisibility = scene.covisibility if covisibility is None else covisibility
    img_lines, cal_lines, vis_lines = [], [], []
    for i, (src, name) in enumerate(zip(scene.image_paths, scene.image_names)):
        dst = out_dir / "images" / name
        if not dst.exists():
            if link_images:
                dst.symlink_to(Path(src).resolve())
            else:
                shutil.copyfile(src, dst)
        img_lines.append(f"images/{name}")
        w, h = scene.sizes[i]
        K = np.array(scene.K[i], dtype=np.float64)
        K[0, 2] -= (w - 1.0) * 0.5
        K[1, 2] -= (h - 1.0) * 0.5
        cal = f"calibration/calibration_{i:06d}.h5"
        with h5py.File(out_dir / cal, "w") as h5:
            h5["K"] = K
            h5["R"] = np.asarray(scene.R[i], dtype=np.float64)
            h5["T"] = np.asarray(scene.t[i], dtype=np.float64).reshape(3, 1)
            h5["imsize"] = np.array([[w, h]], dtype=np.float64)
        cal_lines.append(cal)
        if covisibility is not None:
            vis = f"visibility/vis_{i:06d}.txt"
            np.savetxt(out_dir / vis, np.asarray(covisibility[i], dtype=np.float64).reshape(-1))
            vis_lines.append(vis)
    (out_dir / "images.txt").write_text("\n".join(img_lines) + "\n")
    (out_dir / "calibration.txt").write_text("\n".join(cal_lines) + "\n")
    if covisibility is not None:
        (out_dir / "visibility.txt").write_text("\n".join(vis_lines) + "\n")
    return out_dir


# ---------------------------------------------------------------------------------------- colmap
def read_colmap_scene(model_dir, image_dir, name: str | None = None) -> Scene:
    """Read a COLMAP sparse model (text or binary, via pycolmap) and the folder of its images.

    Only registered images are returned, sorted by name. Raises ``FileNotFoundError`` for a
    missing model or image and ``ValueError`` for cameras with lens distortion.
    """
    import pycolmap

    model_dir, image_dir = Path(model_dir), Path(image_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"COLMAP model folder not found: {model_dir}")
    if not any((model_dir / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
        raise FileNotFoundError(f"COLMAP model not found: no cameras.bin or cameras.txt in {model_dir}")
    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as err:  # pycolmap raises plain RuntimeError/ValueError
        raise ValueError(f"cannot read COLMAP model {model_dir}: {err}") from err
    images = sorted((img for img in rec.images.values() if img.has_pose), key=lambda im: im.name)
    if not images:
        raise ValueError(f"COLMAP model {model_dir} has no registered images")
    Ks, Rs, ts, sizes, paths = [], [], [], [], []
    for img in images:
        cam = rec.cameras[img.camera_id]
        extra = np.asarray(cam.params)[list(cam.extra_params_idxs())] if cam.extra_params_idxs() else np.zeros(0)
        if extra.size and np.any(extra != 0):
            raise ValueError(
                f"COLMAP camera {img.camera_id} ({cam.model_name}) of image {img.name} has lens distortion "
                f"{extra.tolist()}; undistort the images first (colmap image_undistorter)"
            )
        K = np.asarray(cam.calibration_matrix(), dtype=np.float64)
        pose = img.cam_from_world()
        _check_camera(f"COLMAP model {model_dir}, camera {img.camera_id} of image {img.name}", K,
                      (cam.width, cam.height), R=np.asarray(pose.rotation.matrix()), t=np.asarray(pose.translation))
        Ks.append(K)
        Rs.append(np.asarray(pose.rotation.matrix(), dtype=np.float64))
        ts.append(np.asarray(pose.translation, dtype=np.float64))
        sizes.append([cam.width, cam.height])
        path = image_dir / img.name
        if not path.is_file():
            raise FileNotFoundError(f"image of the COLMAP model not found: {path}")
        paths.append(str(path))
    index = {img.image_id: k for k, img in enumerate(images)}
    covis = np.zeros((len(images), len(images)))
    for point in rec.points3D.values():
        ids = sorted({index[el.image_id] for el in point.track.elements if el.image_id in index})
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                covis[ids[a], ids[b]] += 1
                covis[ids[b], ids[a]] += 1
    return Scene(
        name=name or _colmap_scene_name(model_dir),
        root=model_dir,
        image_paths=paths,
        image_names=[img.name for img in images],
        K=np.stack(Ks),
        R=np.stack(Rs),
        t=np.stack(ts),
        sizes=np.array(sizes, dtype=np.int64),
        covisibility=covis,
        meta={"format": "colmap"},
    )


def _colmap_scene_name(model_dir: Path) -> str:
    """``project/sparse/0`` -> ``project``; ``project/sparse`` -> ``project``; else the folder name."""
    parts = model_dir.resolve().parts
    if model_dir.name.isdigit() and len(parts) >= 3 and parts[-2] == "sparse":
        return parts[-3]
    if model_dir.name == "sparse" and len(parts) >= 2:
        return parts[-2]
    return model_dir.parent.name if model_dir.name.isdigit() else model_dir.name


def read_scene(fmt: str, path, image_dir=None) -> Scene:
    """Dispatch on the layout name: ``strecha``, ``yi`` or ``colmap``.

    For ``colmap``, ``path`` is the model folder and ``image_dir`` the image folder (default: the
    ``images`` folder next to the model's ``sparse`` folder, i.e. ``path/../../images`` for
    ``project/sparse/0``, else ``path/../images``).
    """
    if fmt == "strecha":
        return read_strecha_scene(path)
    if fmt == "yi":
        return read_yi_scene(path)
    if fmt == "colmap":
        path = Path(path)
        if image_dir is None:
            candidates = [path.parent.parent / "images", path.parent / "images", path / "images"]
            image_dir = next((c for c in candidates if c.is_dir()), candidates[0])
        return read_colmap_scene(path, image_dir)
    raise ValueError(f"unknown scene format {fmt!r}; expected 'strecha', 'yi' or 'colmap'")
