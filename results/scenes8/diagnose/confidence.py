"""Analysis behind "What limits the pose without RANSAC" (results/scenes8/README.md): where the
outlier weight sits in logit, and whether the most confident matches alone give a better pose.

    python results/scenes8/diagnose/confidence.py data_out/scenes/Herz-Jesus-P25-val120.h5 n3net-scenes8

Prints (1) inliers / outliers per logit bin over the first 40 pairs; (2) mAP of the weighted
eight-point pose with weights relu(tanh(logit - c)) and with the top fraction of the predicted
inliers as 0/1 weights; (3) the ground-truth inliers among the matches with logit > 3, without
and with Hartley normalisation. A validation-scene analysis only; nothing here was adopted.
"""
import sys

import numpy as np
import torch

from data_prep.corr_dataset import CorrespondenceDataset
from n3sets.cli import load_weights_arg
from n3sets.essential import logits_to_weights
from n3sets.evaluation import eight_point_pose, model_logits
from n3sets.metrics import mean_average_precision
from n3sets.pose import FAILED_POSE_ERROR, pose_error

torch.set_num_threads(1)
data, name = sys.argv[1], sys.argv[2]
ds = CorrespondenceDataset(data)
model = load_weights_arg(name)[0].eval()


def err(x1, x2, w, inl, R, t, normalize=False):
    Rr, tr, ok = eight_point_pose(x1, x2, w, inl, normalize=normalize)
    return float(pose_error(Rr, tr, R, t)) if ok else FAILED_POSE_ERROR


bins = [-np.inf, -2, 0, 1, 2, 3, 4, np.inf]
counts = np.zeros((len(bins) - 1, 2))
offsets, fractions = (0, 1, 2, 3, 4), (0.5, 0.25, 0.1)
errors = {**{f"relu(tanh(logit - {c}))": [] for c in offsets}, **{f"top {f} of predicted inliers": [] for f in fractions},
          "labels & logit > 3": [], "labels & logit > 3, Hartley": []}
for i in range(len(ds)):
    p = ds[i]
    xs = torch.as_tensor(p["xs"]).double()
    x1, x2 = xs[:, :2], xs[:, 2:4]
    R, t = torch.as_tensor(p["R"]).double(), torch.as_tensor(p["t"]).double().reshape(3)
    label = torch.as_tensor(p["label"]) > 0.5
    lg = model_logits(model, p).double()
    if i < 40:
        b = np.digitize(lg.numpy(), bins) - 1
        for j in range(len(bins) - 1):
            counts[j] += [((b == j) & label.numpy()).sum(), ((b == j) & ~label.numpy()).sum()]
    for c in offsets:
        errors[f"relu(tanh(logit - {c}))"].append(err(x1, x2, logits_to_weights(lg - c), lg > c, R, t))
    for f in fractions:
        keep = torch.zeros_like(label)
        keep[lg.topk(min(max(8, int(f * int((lg > 0).sum()))), lg.numel())).indices] = True
        keep &= lg > 0
        errors[f"top {f} of predicted inliers"].append(err(x1, x2, keep.double(), keep, R, t))
    sure = label & (lg > 3)
    errors["labels & logit > 3"].append(err(x1, x2, sure.double(), sure, R, t))
    errors["labels & logit > 3, Hartley"].append(err(x1, x2, sure.double(), sure, R, t, normalize=True))

print(f"{name} on {data}: matches per logit bin (first 40 pairs)")
for j in range(len(bins) - 1):
    n_in, n_out = counts[j]
    print(f"  logit in [{bins[j]}, {bins[j + 1]}): {n_in:.0f} inliers, {n_out:.0f} outliers "
          f"({n_out / max(1, n_in + n_out):.0%} outliers)")
print(f"weighted eight-point pose, {len(ds)} pairs (mAP@20)")
for k, e in errors.items():
    print(f"  {k:34s} {float(mean_average_precision(torch.tensor(e), (20,))['mAP20']):.3f}")
