"""From raw images and cameras to labelled correspondence datasets (h5)."""
