"""Test-only stand-in for the `ultralytics` package, for ADetailer in the webui tier (no YOLO, no weights, no network).

ADetailer imports `ultralytics.YOLO` when it detects with a `.pt` model from models/adetailer/, and reads the boxes,
confidences, masks and preview picture of its first result. This YOLO "detects" the boxes (x0, y0, x1, y1 pixels of
the image) listed in the JSON file $FREEFUSE_TEST_DETECTIONS, in that order, whatever the image and the model file;
no file, nothing detected. Only the ADetailer test's webui has this folder on its PYTHONPATH.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

DETECTIONS_ENV = "FREEFUSE_TEST_DETECTIONS"


class _Boxes:
    def __init__(self, xyxy: list[list[float]]):
        self.xyxy = torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4)
        self.conf = torch.ones(len(xyxy))


class _Result:
    def __init__(self, image, xyxy: list[list[float]]):
        self.boxes = _Boxes(xyxy)
        self.masks = None  # boxes only: ADetailer makes a rectangle mask per box
        self._image = image

    def plot(self) -> np.ndarray:
        """The preview ADetailer shows: the image (BGR, as ultralytics draws it)."""
        return np.ascontiguousarray(np.asarray(self._image.convert("RGB"))[..., ::-1])


class YOLO:
    def __init__(self, model_path, *args, **kwargs):
        self.model_path = model_path

    def set_classes(self, classes) -> None:
        pass

    def __call__(self, image, *args, **kwargs) -> list[_Result]:
        path = os.environ.get(DETECTIONS_ENV)
        boxes = json.loads(Path(path).read_text()) if path and Path(path).is_file() else []
        return [_Result(image, boxes)]
