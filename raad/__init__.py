"""RAAD: unsupervised industrial anomaly detection on top of ``raad_kernels``.

Trains on normal images only, scores anomalies per pixel and per image, and runs its attention
through ``raad_kernels`` according to a per-layer bit plan (see ``docs/design.md``).

Modules: :mod:`raad.dataset` (the MVTec layout, its validation, loading), :mod:`raad.synthetic`
(synthetic categories), :mod:`raad.realphoto` (the real-photo benchmark), :mod:`raad.visa` (VisA
conversion), :mod:`raad.data` (all of those under one name), :mod:`raad.model`,
:mod:`raad.train`, :mod:`raad.score`, :mod:`raad.predict`, :mod:`raad.baseline` (PatchCore),
:mod:`raad.metrics` (image/pixel AUROC, AU-PRO, F1-max), :mod:`raad.viz` (heatmap overlays and
report grids), :mod:`raad.io` (atomic file writes).
"""

__version__ = "0.1.0"
