"""The models on CUDA (`make gpu-test`; skipped without a CUDA device): every registered model's training step
against the CPU in fp32 and under bf16 autocast, the warm start (b = 0 is gd) on the GPU, torch.compile against
eager. ~1 min on one GPU."""
import copy

import pytest
import timm
import torch

import timm_optdnn  # noqa: F401  registers the models

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]
CUDA = torch.device("cuda")
NEUTRAL_SCHEME = {"vit": "hb", "convnext": "nag"}  # the scheme-neutral names run the schemes no name says
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 here: cuDNN's convolutions may otherwise round through TF32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    torch.cuda.empty_cache()


def build(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    if "vit" in name:
        kwargs.setdefault("img_size", 64)
    if not any(f"_{s}_" in name for s in ("apg2", "gd")):
        kwargs.setdefault("scheme", NEUTRAL_SCHEME["vit" if "vit" in name else "convnext"])
    return timm.create_model(name, num_classes=10, **kwargs).train()


def train_step(model: torch.nn.Module, x: torch.Tensor, bf16: bool = False):
    """(output, every parameter's gradient flattened into one vector) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    out.float().square().mean().backward()
    return out.detach().float().cpu(), torch.cat([p.grad.flatten().float().cpu() for p in model.parameters()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", timm.list_models("optdnn_*"))
def test_training_step_on_cuda_matches_the_cpu(name):
    """fp32 to float rounding; bf16 autocast within bf16's error (measured on CPU autocast: 1-4 % of the norm). The
    scheme coefficients stay fp32 parameters with fp32 gradients under autocast."""
    cpu = build(name)
    ref_out, ref_grad = train_step(cpu, X)
    gpu = copy.deepcopy(cpu).to(CUDA)
    out, grad = train_step(gpu, X.to(CUDA))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4 * ref_out.abs().max().item())
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-4 * ref_grad.abs().max().item())
    out, grad = train_step(gpu, X.to(CUDA), bf16=True)
    assert relative(out, ref_out) < 0.08 and relative(grad, ref_grad) < 0.12
    if gpu.blocks.scheme != "gd":
        assert gpu.blocks.coef.dtype == gpu.blocks.coef.grad.dtype == torch.float32
        assert relative(gpu.blocks.coef.grad.cpu(), cpu.blocks.coef.grad) < 0.15


@pytest.mark.parametrize("family", ["optdnn_{}_vit_s", "optdnn_{}_convnext_iso_s"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_zero_momenta_are_gd_on_cuda(family, bf16):
    """The warm start on the GPU: apg2 with b = 0 computes gd's outputs bit for bit (eval and a training forward with
    drop-path, same random state), and gd's gradients."""
    gd = build(family.format("gd"), drop_path_rate=0.2).to(CUDA)
    apg2 = build(family.format("apg2"), drop_path_rate=0.2).to(CUDA)
    apg2.load_state_dict(gd.state_dict(), strict=False)
    with torch.no_grad():
        apg2.blocks.coef.zero_()  # the baseline's warm start
    x = X.to(CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        assert torch.equal(apg2.eval()(x), gd.eval()(x))
    steps = []
    for model in (gd.train(), apg2.train()):
        torch.manual_seed(1)
        steps.append(train_step(model, x, bf16))
    (gd_out, gd_grad), (apg2_out, apg2_grad) = steps
    assert torch.equal(apg2_out, gd_out)
    apg2_grad = torch.cat([p.grad.flatten().float().cpu() for n, p in apg2.named_parameters() if n != "blocks.coef"])
    torch.testing.assert_close(apg2_grad, gd_grad, rtol=1e-5, atol=1e-6 * gd_grad.abs().max().item())


@pytest.mark.parametrize("name", ["optdnn_apg2_vit_ti", "optdnn_apg2_convnext_iso_fm"])
def test_compiled_training_step_on_cuda_matches_eager(name):
    """inductor's kernels (the fused update among them) against eager `Step`: outputs and gradients, fp32, and the
    trainer's bf16 autocast within bf16's error."""
    model = build(name, depth=4).to(CUDA)
    x = X[:, :, :28, :28].to(CUDA) if "fm" in name else X.to(CUDA)
    compiled = torch.compile(model)
    for bf16 in (False, True):
        eager_out, eager_grad = train_step(model, x, bf16)
        out, grad = train_step(compiled, x, bf16)
        if bf16:
            assert relative(out, eager_out) < 0.03 and relative(grad, eager_grad) < 0.05
        else:
            torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-4 * eager_out.abs().max().item())
            torch.testing.assert_close(grad, eager_grad, rtol=1e-3, atol=1e-4 * eager_grad.abs().max().item())
