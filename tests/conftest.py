"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; several threads spin against each other when the
    machine is busy (a 1 s test took 20 s on 2 loaded cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_collection_modifyitems(config, items):
    """The slowest modules first (those that start cluster services, then the end-to-end
    workflow runs), whole and in their own order: with several workers (make test's
    ``pytest -n``) the long ones start at once instead of ending the run alone."""
    def weight(item) -> int:
        return 2 if item.get_closest_marker("cluster") else 1 if item.get_closest_marker("e2e") else 0

    heaviest = {}
    for item in items:
        heaviest[item.path] = max(heaviest.get(item.path, 0), weight(item))
    items.sort(key=lambda item: -heaviest[item.path])  # stable: each module keeps its order
