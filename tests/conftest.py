"""Shared test helpers: the repo root on sys.path and the optional ../shared data folder."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def shared_path(*parts):
    """Path inside ../shared (development data beside the checkout); skips the test when absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (development data beside the checkout)")
    return path
