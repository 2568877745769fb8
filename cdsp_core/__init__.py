"""cdsp_core: scribble-supervised semantic segmentation with CDSP (class-driven scribble promotion)."""

__version__ = "0.1.0"
