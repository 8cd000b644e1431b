"""Ground-truth labels of matches (data_prep.labels) end to end, against a brute-force reference.

The two cameras have very different intrinsics (a long lens on a large image, a short lens with a
skew term on a small one), so each term of the symmetric epipolar distance lives in different
pixel units; dropping or mixing up a term changes the labels. Swapping the two views (x1 <-> x2,
the relative pose inverted, i.e. E -> E^T) must give the very same distances and labels.
"""
import numpy as np
import pytest
import torch

from data_prep.labels import DEFAULT_THRESHOLD, label_matches, pair_relative_pose
from n3sets.geometry import essential_from_pose

K_LONG = np.array([[2400.0, 0.0, 810.0], [0.0, 2380.0, 590.0], [0.0, 0.0, 1.0]])  # 1600 x 1200 image
K_SHORT = np.array([[480.0, 2.5, 330.0], [0.0, 500.0, 235.0], [0.0, 0.0, 1.0]])   # 640 x 480 image


def _rotation(rng, max_deg):
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = np.deg2rad(rng.uniform(-max_deg, max_deg))
    S = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * S + (1 - np.cos(a)) * S @ S


def _project(K, X):
    p = X @ K.T
    return p[:, :2] / p[:, 2:]


def _matches(seed=0, n=400):
    """Pixel matches of a random two-view scene with noise from 0.03 to 300 px, and the pose."""
    rng = np.random.default_rng(seed)
    R = _rotation(rng, 15)
    t = rng.normal(size=3)
    t /= np.linalg.norm(t)
    X = np.column_stack([rng.uniform(-1.5, 1.5, n), rng.uniform(-1.0, 1.0, n), rng.uniform(5, 9, n)])
    X2 = X @ R.T + t
    assert (X2[:, 2] > 0).all()
    k1, k2 = _project(K_LONG, X), _project(K_SHORT, X2)
    # log-uniform noise magnitudes: about half the matches end up on each side of the threshold
    scale = 10.0 ** rng.uniform(-1.5, 2.5, (n, 1))
    k1 = k1 + scale * rng.normal(size=(n, 2))
    k2 = k2 + scale * rng.normal(size=(n, 2)) / 4
    return k1, k2, R, t


def _brute_force(kpts1, kpts2, K1, K2, R, t, threshold=DEFAULT_THRESHOLD, terms=(1, 2)):
    """Squared symmetric epipolar distance from its definition, one match at a time.

    E = [t]_x R; with homogeneous normalized points x1 = K1^-1 [u1 v1 1], x2 = K2^-1 [u2 v2 1]
    the epipolar line of x1 in image 2 is l2 = E x1, that of x2 in image 1 is l1 = E^T x2, and
    the distance of a point (x, y, 1) to a line (a, b, c) is |a x + b y + c| / sqrt(a^2 + b^2).
    """
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    E = tx @ R
    K1inv, K2inv = np.linalg.inv(K1), np.linalg.inv(K2)
    d = []
    for (u1, v1), (u2, v2) in zip(kpts1, kpts2):
        x1 = K1inv @ np.array([u1, v1, 1.0])
        x2 = K2inv @ np.array([u2, v2, 1.0])
        x1, x2 = x1 / x1[2], x2 / x2[2]
        l2, l1 = E @ x1, E.T @ x2
        dist2 = abs(l2 @ x2) / np.hypot(l2[0], l2[1])  # x2 to the epipolar line of x1
        dist1 = abs(l1 @ x1) / np.hypot(l1[0], l1[1])  # x1 to the epipolar line of x2
        d.append((dist1 ** 2 if 1 in terms else 0.0) + (dist2 ** 2 if 2 in terms else 0.0))
    d = np.array(d)
    return d, (d < threshold).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_match_brute_force_with_different_intrinsics(seed):
    k1, k2, R, t = _matches(seed)
    out = label_matches(k1, k2, K_LONG, K_SHORT, R, t)
    d_ref, label_ref = _brute_force(k1, k2, K_LONG, K_SHORT, R, t)
    np.testing.assert_allclose(out["epi_dist"], d_ref, rtol=1e-8, atol=1e-18)
    np.testing.assert_array_equal(out["label"], label_ref)
    # the scene exercises both labels and the distances near the threshold
    assert 0.25 < label_ref.mean() < 0.75
    near = (d_ref > DEFAULT_THRESHOLD / 10) & (d_ref < DEFAULT_THRESHOLD * 10)
    assert near.sum() > 50
    # either term alone gives other labels for some matches (so a lost term shows in the labels)
    for terms in ((1,), (2,)):
        assert (_brute_force(k1, k2, K_LONG, K_SHORT, R, t, terms=terms)[1] != label_ref).sum() >= 5
    # normalized coordinates: K^-1 applied, x1 then x2
    h1 = np.column_stack([k1, np.ones(len(k1))]) @ np.linalg.inv(K_LONG).T
    np.testing.assert_allclose(out["xs"][:, :2], h1[:, :2] / h1[:, 2:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_are_invariant_to_swapping_the_views(seed):
    k1, k2, R, t = _matches(seed)
    fwd = label_matches(k1, k2, K_LONG, K_SHORT, R, t)
    # view 2 -> view 1: x1 = R^T x2 - R^T t
    R_inv, t_inv = R.T, -R.T @ t
    # that pose's essential matrix is E^T
    E = essential_from_pose(torch.as_tensor(R), torch.as_tensor(t)).numpy()
    E_swap = essential_from_pose(torch.as_tensor(R_inv), torch.as_tensor(t_inv)).numpy()
    np.testing.assert_allclose(E_swap, E.T, atol=1e-12)
    bwd = label_matches(k2, k1, K_SHORT, K_LONG, R_inv, t_inv)
    np.testing.assert_allclose(bwd["epi_dist"], fwd["epi_dist"], rtol=1e-8, atol=1e-18)
    np.testing.assert_array_equal(bwd["label"], fwd["label"])
    np.testing.assert_array_equal(bwd["xs"], fwd["xs"][:, [2, 3, 0, 1]])
    d_ref, label_ref = _brute_force(k2, k1, K_SHORT, K_LONG, R_inv, t_inv)
    np.testing.assert_allclose(bwd["epi_dist"], d_ref, rtol=1e-8, atol=1e-18)
    np.testing.assert_array_equal(bwd["label"], label_ref)


def test_labels_from_camera_poses_are_invariant_to_swapping_the_cameras():
    # the path the dataset builder takes: world-to-camera poses -> relative pose -> labels
    rng = np.random.default_rng(3)
    R1, R2 = _rotation(rng, 30), _rotation(rng, 30)
    C1, C2 = np.array([0.0, 0.0, -8.0]), np.array([2.0, 0.5, -7.0])  # camera centres
    t1, t2 = -R1 @ C1, -R2 @ C2
    n = 300
    X = rng.normal(size=(n, 3))
    k1 = _project(K_LONG, X @ R1.T + t1)
    k2 = _project(K_SHORT, X @ R2.T + t2)
    scale = 10.0 ** rng.uniform(-1.5, 2.5, (n, 1))
    k1, k2 = k1 + scale * rng.normal(size=(n, 2)), k2 + scale * rng.normal(size=(n, 2)) / 4
    R12, t12 = pair_relative_pose(R1, t1, R2, t2)
    R21, t21 = pair_relative_pose(R2, t2, R1, t1)
    np.testing.assert_allclose(R21, R12.T, atol=1e-12)
    np.testing.assert_allclose(t21, -R12.T @ t12, atol=1e-12)  # both unit norm
    fwd = label_matches(k1, k2, K_LONG, K_SHORT, R12, t12)
    bwd = label_matches(k2, k1, K_SHORT, K_LONG, R21, t21)
    np.testing.assert_array_equal(fwd["label"], bwd["label"])
    np.testing.assert_allclose(fwd["epi_dist"], bwd["epi_dist"], rtol=1e-8, atol=1e-18)
    d_ref, label_ref = _brute_force(k1, k2, K_LONG, K_SHORT, R12, t12)
    np.testing.assert_array_equal(fwd["label"], label_ref)
    assert 0.2 < label_ref.mean() < 0.8
