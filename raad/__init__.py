"""RAAD: unsupervised industrial anomaly detection on top of ``raad_kernels``.

Trains on normal images only, scores anomalies per pixel and per image, and runs its attention
through ``raad_kernels`` according to a per-layer bit plan (see ``DESIGN.md``).

Modules: :mod:`raad.data` (MVTec-layout loading and validation, VisA conversion, synthetic
categories), :mod:`raad.metrics` (image/pixel AUROC, AU-PRO, F1-max), :mod:`raad.viz` (heatmap
overlays and report grids), :mod:`raad.io` (atomic file writes).
"""

__version__ = "0.1.0"
