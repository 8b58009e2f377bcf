"""distributed.py: device choice (the process-group helpers run in test_ddp.py)."""
import pytest
import torch

import distributed


def test_bad_device_is_a_clear_error(monkeypatch):
    """An unknown or unavailable --device ends in one sentence, not a torch traceback."""
    with pytest.raises(SystemExit, match="unknown --device 'gpu'"):
        distributed.select_device("gpu", 0, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        distributed.select_device("cuda:1", 0, True)
    assert distributed.select_device("auto", 0, True) == torch.device("cpu")
