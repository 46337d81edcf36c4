"""The data layer in one namespace: ``from raad import data as D``.

Each job lives in its own module; this one re-exports their public names so callers need one
import:

- :mod:`raad.dataset`: the MVTec AD layout, its validation (:class:`DataError`), image and mask
  loading, torch datasets;
- :mod:`raad.synthetic`: the generator of synthetic categories (``raad make-data``, the demo);
- :mod:`raad.visa`: the VisA converter.
"""

from __future__ import annotations

from .dataset import (
    GOOD, IMAGE_EXTS, IMAGENET_MEAN, IMAGENET_STD, MASK_THRESHOLD, MAX_LISTED, Category, DataError,
    ImageDataset, TestDataset, TestItem, category_dirs, color_jitter, image_size, is_category_dir,
    list_categories, load_category, load_data_dir, load_image, load_mask, load_test_mask,
    open_rgb, to_tensor, validate, validate_data_dir,
)
from .synthetic import (
    DEFECT_DESCRIPTIONS, SYNTHETIC_CATEGORIES, SYNTHETIC_VERSION, make_synthetic, synth_sample,
)
from .visa import VISA_CSV, convert_visa

# Internals that other code reaches through this namespace: the helpers that write a category
# folder atomically (for writers of other data sets), and the generator's internals that tests
# check directly (sample seeds, renderer parameters, the visibility rules). New code should
# import them from raad.dataset and raad.synthetic.
from .dataset import _check_targets, _install, _json  # noqa: F401
from .synthetic import (  # noqa: F401
    _PARAM_DEFECTS, _PCB_PARTS, _STAIN_VISIBLE, _VISIBLE, _blob_visibility, _d_missing,
    _pcb_params, _sample_rngs, _screw_params, _visibility,
)

__all__ = [
    "DataError", "TestItem", "Category", "IMAGE_EXTS", "MASK_THRESHOLD", "GOOD",
    "IMAGENET_MEAN", "IMAGENET_STD",
    "is_category_dir", "category_dirs", "list_categories", "load_category", "load_data_dir",
    "validate", "validate_data_dir",
    "open_rgb", "to_tensor", "load_image", "load_mask", "load_test_mask", "image_size",
    "ImageDataset", "TestDataset", "color_jitter",
    "convert_visa",
    "SYNTHETIC_CATEGORIES", "make_synthetic", "synth_sample",
]
