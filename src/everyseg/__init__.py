"""everyseg: partially supervised instance segmentation."""
