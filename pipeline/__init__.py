"""semisam: SAM pseudo-labels for semi-supervised medical image segmentation, distributed on Ray."""

__version__ = "0.1.0"
