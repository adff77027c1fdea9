"""Shared test set-up: quiet TensorFlow, make the project importable."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_png(path, frame):
    """Save a float RGB frame in [0, 1] as an 8-bit PNG (for tiny test folders)."""
    import numpy as np
    from PIL import Image

    Image.fromarray((np.clip(frame, 0, 1) * 255).astype(np.uint8)).save(path)
