"""`--plan --measure` on CUDA (make gpu-test): the measurement runs on the GPU, in bf16 autocast, channels_last,
and reads its memory from CUDA's allocator."""
import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.timeout(300)
def test_measure_on_cuda_with_bf16_and_channels_last():
    from test_plan import tiny
    from timm_optdnn.training.plan import measure
    m = measure(tiny("dist.precision=bf16", "data.channels_last=true"), steps=3)
    assert "cuda" in m.device and set(m.img_s) == {20, 28} and all(v > 0 for v in m.img_s.values())
    assert m.peak_bytes > sum(m.states) > 0  # the allocator's peak: the states and the activations, on the device
