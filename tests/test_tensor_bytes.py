"""lorareg.core.io.tensor_buffer, the byte view that replaced ``Tensor.numpy()`` (numpy is not a dependency)."""

import pytest
import torch

from lorareg.core.io import tensor_buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.float8_e4m3fn])
def test_tensor_buffer_without_numpy(dtype, monkeypatch):
    """lorareg.core.io.tensor_buffer: C-order bytes of any tensor (transposed, sliced, empty) without numpy."""
    monkeypatch.setattr(torch.Tensor, "numpy", lambda *a, **k: pytest.fail("numpy used"))
    x = (torch.randn(6, 5) * 4).to(dtype)
    for t in (x, x.t(), x[2:], x[:, 1:3], x[:0], x.reshape(-1)[3:4].reshape(())):
        view = tensor_buffer(t)
        assert view.format == "B" and view.nbytes == t.numel() * t.element_size()
        if t.numel():
            back = torch.frombuffer(bytearray(view), dtype=dtype).reshape(t.shape)
            assert back.reshape(-1).view(torch.uint8).equal(t.reshape(-1).view(torch.uint8))


def test_tensor_buffer_keeps_its_tensor_alive():
    view = tensor_buffer(torch.arange(4096, dtype=torch.float32) * 2)  # the only reference is the view's
    junk = [torch.full((4096,), -1.0) for _ in range(64)]  # reuse freed memory, if any was freed
    assert torch.frombuffer(bytearray(view), dtype=torch.float32).equal(torch.arange(4096, dtype=torch.float32) * 2)
    del junk
