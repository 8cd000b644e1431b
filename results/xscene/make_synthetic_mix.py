"""Cross-scene experiment only: the pairs of one real h5 followed by synthetic pairs, in one h5.

Usage (from the repository root):
    .venv/bin/python results/xscene/make_synthetic_mix.py data_out/xscene/castle.h5 data_out/xscene/castle_syn400.h5 400

The synthetic pairs come from data_prep.synthetic.synthetic_pair (300-1000 matches, outlier share
drawn from [0.4, 0.95], pixel noise from [0.3, 1.5], up to 45 degrees between the views). Half of
the outliers are moved to another match's point in image 2 plus 15 px jitter, so that outliers
also lie where the scene is seen (like SIFT confusions), not only uniformly in the image. Labels
are recomputed with data_prep.labels.label_matches.
"""
import sys

import h5py, numpy as np

from data_prep.h5io import atomic_h5, pair_key, write_pair, write_settings, read_pair, pair_keys
from data_prep.synthetic import synthetic_pair
from data_prep.labels import label_matches

src, out, n_syn = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(123)
with h5py.File(src, "r") as f, atomic_h5(out) as h5:
    write_settings(h5, {"format": "mix", "source": src, "synthetic": n_syn})
    i = 0
    for k in pair_keys(f):
        write_pair(h5, pair_key(i), read_pair(f[k])); i += 1
    for j in range(n_syn):
        rec = synthetic_pair(rng, num_matches=(300, 1000), outlier_ratio=float(rng.uniform(0.4, 0.95)),
                             noise_px=float(rng.uniform(0.3, 1.5)), max_angle_deg=45.0, name=f"synthetic/{j:06d}")
        out_idx = np.flatnonzero(rec["is_outlier"]); in_idx = np.flatnonzero(~rec["is_outlier"])
        # half of the outliers: a wrong match to another visible point (+ jitter), like SIFT confusions
        if len(in_idx) and len(out_idx):
            sw = out_idx[rng.random(len(out_idx)) < 0.5]
            src_pts = rec["kpts2"][rng.choice(in_idx, len(sw))]
            rec["kpts2"][sw] = np.clip(src_pts + rng.normal(0, 15, src_pts.shape), 0, [1023.9, 682.9])
        lab = label_matches(rec["kpts1"].astype(np.float64), rec["kpts2"].astype(np.float64), rec["K1"], rec["K2"], rec["R"], rec["t"])
        rec["xs"], rec["epi_dist"], rec["label"] = lab["xs"], lab["epi_dist"], lab["label"]
        rec.pop("is_outlier")
        write_pair(h5, pair_key(i), rec); i += 1
print("pairs", i)
