"""Shared test set-up: the project importable, the backend quiet, one PNG writer, the slow marker.

``python -m pytest -q -m "not slow"`` leaves out the tests that train a model
for more than a few seconds or run a command in a subprocess.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model or runs a command in a subprocess (seconds to a minute)")


def write_png(path, frame):
    """Save a float RGB frame in [0, 1] as an 8-bit PNG, rounding to the nearest count (for tiny test folders)."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.rint(np.clip(frame, 0, 1) * 255).astype(np.uint8)).save(path)
