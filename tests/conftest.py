"""Shared fixtures. Broker fixtures live in tests/broker.py (imported below)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("OMP_NUM_THREADS", "1")

# CI runs the same examples every time (derandomized, no example database on disk), so a
# property test fails for a reason in the code, not by the luck of the draw. Run
# ``HYPOTHESIS_PROFILE=explore pytest`` to search new examples locally.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Real logs: $TANDEM_DATA when set (where `tandem data fetch` put them), else beside the
#: checkout (absent in a user's fresh clone). The loaders look in the same place.
SHARED_DATA = Path(os.environ["TANDEM_DATA"]).expanduser() if os.environ.get("TANDEM_DATA") else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real logs not found at {SHARED_DATA} (only present beside the project's CI checkout)")
    return SHARED_DATA

# Broker fixtures (tansu on loopback); tests/ is on sys.path because it has no __init__.py.
from broker import broker_process, kafka_bootstrap  # noqa: E402,F401
