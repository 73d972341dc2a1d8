"""Devices: a device this machine lacks is a clear error before anything is built or moved."""

import pytest
import torch

from everyseg.config import ConfigError
from everyseg.engine.load import resolve_device


def test_auto_and_cpu_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["cuda:99", "gpu", "cuda:-1", ""])
def test_a_device_this_machine_lacks_is_a_config_error_naming_it(name):
    with pytest.raises(ConfigError, match="device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_says_how_many_there_are():
    with pytest.raises(ConfigError, match="0 CUDA device"):
        resolve_device("cuda")
