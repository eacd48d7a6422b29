"""Suite-wide settings: one torch thread in the test process.

CI and developer machines run the agent, DataLoader workers and subprocesses next to the tests on two
cores; torch's default of one thread per core then oversubscribes them and runs several times slower.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
