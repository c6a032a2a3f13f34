"""The OptDNN models: scheme equations, baseline exactness, warm start and the timm interface."""
import collections
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import timm_optdnn
from timm_optdnn.models import schemes
from timm_optdnn.models.checkpoint import momenta_from_t
from timm_optdnn.models.schemes import SCHEMES, SchemeBlocks, init_coefficients
from reference_convnext_iso import ConvNeXtIsotropic

ALL = timm.list_models("optdnn_*")
TINY = {  # every family at toy size, full code path; the scheme-neutral names take scheme=...
    "vit": ("optdnn_vit_ti", dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)),
    "convnext": ("optdnn_convnext_iso_s", dict(dim=32, depth=3, patch_size=8, num_classes=5)),
}


def saved_bytes(model: nn.Module, forward) -> int:
    """Bytes autograd saves for backward while `forward()` runs (parameters excluded; views of a storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


def tiny(family: str, **kw) -> nn.Module:
    name, args = TINY[family]
    return timm.create_model(name, **{**args, **kw})


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-default values everywhere (biases, norms), so a mis-mapped tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_registry_lists_all_twelve_names():
    expected = {f"optdnn_{s}_{m}" for s in ("apg2", "gd")
                for m in ("vit_ti", "vit_s", "vit_b", "convnext_iso_s", "convnext_iso_b", "convnext_iso_l")}
    assert expected <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_every_name_builds_and_trains_at_small_size(name):
    small = dict(depth=2, num_classes=3)
    small.update(dict(img_size=32) if "vit" in name else dict())
    model = timm.create_model(name, **small)
    assert model.pretrained_cfg["architecture"] == name
    assert model.blocks.scheme == ("gd" if "_gd_" in name else "apg2")  # a scheme-neutral name builds apg2
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class Lin(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def hand_loop(scheme, branches, b, x):
    """docs/method.md's equations, transcribed literally: hb/nag with m_{k+1} = b_k (m_0 multiplies
    x_0 - x_{-1} = 0), apg2 in its division-free state (y, e)."""
    m = [0.0] + list(b)
    x_prev, y, e = x, x, torch.zeros_like(x)
    for k, f in enumerate(branches):
        if scheme == "gd":
            x = x + f(x)
        elif scheme == "hb":
            x, x_prev = x + f(x) + m[k] * (x - x_prev), x
        elif scheme == "nag":
            y = x + m[k] * (x - x_prev)
            x, x_prev = y + f(y), x
        else:
            fy = f(y)
            x = y + fy
            if k < len(b):
                e = b[k] * (e + fy)
                y = x + e
    return x


def t_form_apg2(branches, t, x):
    """apg2 as the earlier releases computed it: y = (1-t) x + t z, z' = z + F(y)/t, x' = (1-t) x + t z'."""
    z = x
    for k, f in enumerate(branches):
        y = (1 - t[k]) * x + t[k] * z
        z = z + f(y) / t[k]
        x = (1 - t[k]) * x + t[k] * z
    return x


B5 = [0.0, 0.7, 0.45, 1.3]  # away from the init schedule, one above 1, so every coefficient matters


def blocks_of(scheme, depth=5, **kw):
    blocks = SchemeBlocks([Lin(k) for k in range(depth)], scheme=scheme, **kw).double()
    if scheme != "gd":
        with torch.no_grad():
            blocks.coef.copy_(torch.tensor(B5[:depth - 1]))
    return blocks


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_matches_hand_written_loop(scheme, fused):
    """Outputs, and gradients of every parameter (the coefficients' included): `Step`'s backward against autograd."""
    blocks = blocks_of(scheme, fused=fused)
    branches = [copy.deepcopy(f) for f in blocks]
    b = blocks.coef.detach().clone().requires_grad_(True)
    x = torch.randn(3, 4, dtype=torch.float64)
    out = blocks(x)
    expected = hand_loop(scheme, branches, b, x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.sin().sum().backward()
    expected.sin().sum().backward()
    if scheme != "gd":
        torch.testing.assert_close(blocks.coef.grad, b.grad, rtol=1e-10, atol=1e-12)
    mine = [p for n, p in blocks.named_parameters() if n != "coef"]
    for p, ref in zip(mine, [p for f in branches for p in f.parameters()], strict=True):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the inference path: the plain ops
        torch.testing.assert_close(blocks(x), expected, rtol=1e-12, atol=1e-12)


def test_step_takes_gradients_of_any_layout_and_none():
    """`Step`'s backward against autograd through the plain ops, for a channels-last state, a gradient in another
    layout (NCHW, as a pooled head gives) and one step whose x' reaches nothing but y'."""
    g = torch.Generator().manual_seed(0)
    y, fy, x = [torch.randn(2, 6, 5, 4, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    g_y1 = torch.randn(2, 6, 5, 4, generator=g)
    b = torch.tensor(0.6)
    for g_x1 in (None, torch.randn(2, 6, 5, 4, generator=g)):
        grads = []
        for step in (schemes.Step.apply, lambda y, fy, x, b: (y + fy, schemes.extrapolate(x, y + fy, b))):
            inputs = [t.clone().requires_grad_(True) for t in (y, fy, x, b)]
            x1, y1 = step(*inputs)
            torch.autograd.backward((y1,) if g_x1 is None else (y1, x1), (g_y1,) if g_x1 is None else (g_y1, g_x1))
            grads.append([t.grad for t in inputs])
        for mine, ref in zip(*grads, strict=True):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_t_form_apg2_converts_to_the_same_network():
    """The earlier t_k, converted with b_k = t_{k+1} (1 - t_k) / t_k, give the division-free driver the earlier
    network's outputs (float64: to rounding), also for t_k > 1 as training once produced."""
    t = torch.tensor([1.0034, 0.7, 0.45, 0.3, 0.6], dtype=torch.float64)
    blocks = blocks_of("apg2")
    with torch.no_grad():
        blocks.coef.copy_(momenta_from_t(t))
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(blocks(x), t_form_apg2([copy.deepcopy(f) for f in blocks], t, x), rtol=1e-9, atol=1e-12)
    schedule = 2.0 / (torch.arange(6) + 2.0)  # apg2's initial t_k
    assert momenta_from_t(schedule).tolist() == pytest.approx(init_coefficients("apg2", 6).tolist())
    with pytest.raises(ValueError, match="must be positive"):
        momenta_from_t(torch.tensor([1.0, 0.0, 0.5]))


@pytest.mark.parametrize("scheme", ["hb", "nag", "apg2"])
def test_earlier_checkpoints_convert_on_load(scheme, tmp_path):
    """A state dict with one coefficient per block (the earlier form) loads through the pretrained filter: apg2's t_k
    give the t-form network's logits, hb's and nag's m_k lose m_0 (it multiplied zero)."""
    model = tiny("convnext", scheme=scheme).eval()
    state = perturb_(copy.deepcopy(model)).state_dict()
    old = torch.tensor([1.0, 0.8, 0.5]) if scheme == "apg2" else torch.tensor([0.3, 0.2, 0.4])
    state["blocks.coef"] = old
    torch.save(state, tmp_path / "old.pth")
    loaded = tiny("convnext", scheme=scheme, pretrained=True,
                  pretrained_cfg_overlay=dict(file=str(tmp_path / "old.pth"), num_classes=5)).eval()
    expected = momenta_from_t(old) if scheme == "apg2" else old[1:]
    assert loaded.scheme_coefficients() == pytest.approx(expected.tolist())
    if scheme == "apg2":
        x = torch.randn(2, 3, 32, 32)
        ref = copy.deepcopy(loaded)
        with torch.no_grad():
            stem = ref.embed(x)
            feats = t_form_apg2(list(ref.blocks), old, stem)
            torch.testing.assert_close(loaded(x), ref.forward_head(feats), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_apg2_with_zero_momenta_is_gd_bit_for_bit(family):
    """b = 0 (the warm start) computes the gd network exactly: outputs, and every gradient, in a training step with
    drop-path (same random state)."""
    torch.manual_seed(0)
    apg2 = perturb_(tiny(family, drop_path_rate=0.2))
    gd = tiny(family, scheme="gd", drop_path_rate=0.2)
    gd.load_state_dict({k: v for k, v in apg2.state_dict().items() if k != "blocks.coef"})
    with torch.no_grad():
        apg2.blocks.coef.zero_()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(apg2(x), gd.eval()(x))
    outs = []
    for model in (apg2.train(), gd.train()):
        torch.manual_seed(1)
        outs.append(model(x))
        outs[-1].square().sum().backward()
    assert torch.equal(*outs)
    branches = [(n, p) for n, p in apg2.named_parameters() if n != "blocks.coef"]
    for (n, p), q in zip(branches, gd.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n


@pytest.mark.parametrize("family", ["vit", "convnext"])
@pytest.mark.parametrize("b", [-0.5, 2.0])
def test_extreme_momenta_give_finite_outputs_and_gradients(family, b):
    model = tiny(family, depth=8).train()
    with torch.no_grad():
        model.blocks.coef.fill_(b)
    out = model(torch.randn(2, 3, 32, 32))
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class FullSizeOps(TorchDispatchMode):
    """Counts the kernels dispatched on tensors of `numel` elements (views and allocations are none): elementwise
    (a full-size output) and reductions (a full-size input only)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and not name.startswith("empty"):
            ins, outs = [[t for t in tree_leaves(a) if isinstance(t, torch.Tensor)] for a in ((args, kwargs), out)]
            if any(t.numel() == self.numel for t in outs):
                self.ops["elementwise", name] += 1
            elif any(t.numel() == self.numel for t in ins):
                self.ops["reduction", name] += 1
        return out


@pytest.mark.parametrize("family", ["vit", "convnext"])
@pytest.mark.parametrize("scheme", ["hb", "nag", "apg2"])
def test_eager_training_step_costs_four_elementwise_kernels_and_a_dot_per_block_over_gd(family, scheme):
    """The eager path (`Step`, what CUDA runs): one more block adds at most 4 full-size elementwise kernels and one
    full-size reduction to a training step (forward and backward) beyond what it adds to the gd twin's."""
    def ops(scheme, depth):
        model = tiny(family, scheme=scheme, depth=depth).train()
        x = torch.randn(2, 3, 32, 32)
        with FullSizeOps(model.embed(x).numel()) as mode:
            model(x).sum().backward()
        return mode.ops

    per_block = ops(scheme, 5) - ops(scheme, 4)
    per_block.subtract(ops("gd", 5) - ops("gd", 4))
    extra = {kind: sum(n for (k, _), n in per_block.items() if k == kind) for kind in ("elementwise", "reduction")}
    assert extra["elementwise"] <= 4 and extra["reduction"] <= 1, per_block


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_apg2_saves_one_state_per_block_more_than_gd(family):
    """`Step` keeps x_k and x_{k+1} (the next step's x_k): x_1..x_{L-1} beyond gd; everything else is gd's."""
    x = torch.randn(4, 3, 32, 32)
    gd, apg2 = tiny(family, scheme="gd", depth=5).train(), tiny(family, depth=5).train()
    state = apg2.blocks[0](apg2.embed(x))
    extra = saved_bytes(apg2, lambda: apg2(x)) - saved_bytes(gd, lambda: gd(x))
    assert extra == 4 * state.numel() * state.element_size()


def test_initial_coefficients_follow_the_algorithms():
    torch.testing.assert_close(init_coefficients("apg2", 5), torch.tensor([0.0, 0.25, 0.4, 0.5]))
    assert init_coefficients("nag", 5).tolist() == init_coefficients("hb", 5).tolist() == \
        init_coefficients("apg2", 5).tolist()
    model = tiny("vit")
    assert model.scheme_coefficients() == pytest.approx([0.0, 0.25])
    assert "b=[0.000, 0.250] (0 above 1)" in repr(model.blocks)
    with torch.no_grad():
        model.blocks.coef.fill_(1.5)
    assert "(2 above 1)" in repr(model)


@pytest.mark.parametrize("family", ["vit", "convnext"])
@pytest.mark.parametrize("scheme", ["apg2", "hb"])
def test_grad_checkpointing_gives_identical_gradients(family, scheme):
    model = tiny(family, scheme=scheme, drop_path_rate=0.3).train()
    x = torch.randn(4, 3, 32, 32)

    def grads():
        model.zero_grad()
        torch.manual_seed(1)  # same drop-path masks in both runs
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), n
    assert plain["blocks.coef"].abs().sum() > 0


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_coefficients_are_never_weight_decayed_nor_the_heads(family):
    """The scheme coefficients are exactly SchemeBlocks' own parameters: no weight decay, and under layer decay the
    last block's learning-rate scale (as the final norm has), not the head's."""
    model = tiny(family, prox="norm")
    coefs = dict(model.blocks.named_parameters(recurse=False))
    assert set(coefs) == {"coef", "prox_gate"} and {f"blocks.{n}" for n in coefs} <= model.no_weight_decay()
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    assert all(g["weight_decay"] == 0.0
               for g in opt.param_groups for p in g["params"] if any(p is c for c in coefs.values()))
    scale = {id(p): g["lr_scale"] for g in timm.optim.create_optimizer_v2(
        model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7).param_groups for p in g["params"]}
    last_block = next(model.blocks[-1].parameters())
    assert scale[id(model.blocks.coef)] == scale[id(model.blocks.prox_gate)] == scale[id(model.norm.weight)] == \
        scale[id(last_block)] < scale[id(model.head.weight)] == 1.0


# --- baseline exactness and warm start -------------------------------------------------------------

VIT_TWINS = [("vit_tiny_patch16_224", "vit_ti"), ("vit_small_patch16_224", "vit_s"), ("vit_base_patch16_224", "vit_b")]


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("timm_name,ours", VIT_TWINS)
def test_timm_vit_checkpoint_loads_into_gd_and_apg2_with_same_logits(tmp_path, image, timm_name, ours):
    ref = perturb_(timm.create_model(timm_name))
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    with torch.no_grad():
        expected = ref(image)
    for scheme in ("gd", "apg2"):
        model = timm.create_model(f"optdnn_{scheme}_{ours}", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
        with torch.no_grad():
            out = model(image)
        assert (out - expected).abs().max() <= 1e-5, scheme
    assert model.scheme_coefficients() == [0.0] * 11  # warm start: apg2 begins as the baseline
    assert model.blocks.coef.requires_grad


def test_gd_vit_trains_as_timms_vit_with_drop_path():
    """Same weights, same random state, drop_path_rate > 0: the gd twin's training forward is timm's (two
    independent masks per block, inside the branch), and so are its gradients."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5, drop_path_rate=0.5)
    ref = perturb_(timm.create_model("vit_tiny_patch16_224", **args)).train()
    model = timm.create_model("optdnn_gd_vit_ti", **args).train()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(8, 3, 32, 32)
    outs = []
    for m in (ref, model):
        torch.manual_seed(3)
        outs.append(m(x))
        outs[-1].square().sum().backward()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():
        assert (outs[1] - model.eval()(x)).abs().max() > 0.1  # the masks did drop paths


def test_deit_wrapped_checkpoint_loads(tmp_path, image):
    ref = perturb_(timm.create_model("deit_tiny_patch16_224"))
    torch.save({"model": ref.state_dict(), "epoch": 299}, tmp_path / "deit.pth")
    model = timm.create_model("optdnn_gd_vit_ti", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "deit.pth"))).eval()
    with torch.no_grad():
        assert (model(image) - ref(image)).abs().max() <= 1e-5


@pytest.mark.parametrize("dim,depth,name", [(384, 18, "s")])
def test_official_convnext_iso_checkpoint_loads_into_gd_and_apg2(tmp_path, image, dim, depth, name):
    torch.manual_seed(0)
    ref = ConvNeXtIsotropic(depth=depth, dim=dim).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "convnext_iso.pth")
    with torch.no_grad():
        expected = ref(image)
    for scheme in ("gd", "apg2"):
        model = timm.create_model(f"optdnn_{scheme}_convnext_iso_{name}", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "convnext_iso.pth"))).eval()
        with torch.no_grad():
            assert (model(image) - expected).abs().max() <= 1e-5, scheme


def test_layer_scale_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    ref = ConvNeXtIsotropic(depth=2, dim=32, num_classes=7, layer_scale_init_value=1e-6).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "ls.pth")
    model = timm.create_model("optdnn_apg2_convnext_iso_s", depth=2, dim=32, num_classes=7, layer_scale_init_value=1e-6,
                              pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "ls.pth"), num_classes=7))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model.eval()(x) - ref(x)).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def vit_s_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "vit_s.pth"
    torch.save(timm.create_model("vit_small_patch16_224").state_dict(), path)
    return str(path)


@pytest.mark.parametrize("target,kwargs,message", [
    ("optdnn_apg2_vit_ti", {}, r"do not fit.*blocks\.0\.norm1\.weight: checkpoint \(384,\) vs model \(192,\)"),
    ("optdnn_apg2_vit_s", dict(depth=10), r"checkpoint has 12 blocks, the model has 10"),
    ("optdnn_apg2_convnext_iso_s", {}, r"checkpoint has 12 blocks, the model has 18"),
])
def test_mismatched_checkpoints_name_the_problem(vit_s_ckpt, target, kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model(target, pretrained=True, pretrained_cfg_overlay=dict(file=vit_s_ckpt), **kwargs)


def test_wrong_num_classes_errors_but_num_classes_kwarg_reinitialises_head(tmp_path, vit_s_ckpt):
    small_head = timm.create_model("vit_small_patch16_224", num_classes=10)
    torch.save(small_head.state_dict(), tmp_path / "ten.pth")
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(10, 384\) vs model \(1000, 384\).*num_classes"):
        timm.create_model("optdnn_apg2_vit_s", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "ten.pth")))
    # timm's documented behaviour: a different num_classes drops the pretrained classifier and re-initialises it
    model = timm.create_model("optdnn_apg2_vit_s", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=vit_s_ckpt))
    assert model.head.weight.shape == (7, 384)


def test_other_in_chans_adapts_the_pretrained_stem(vit_s_ckpt):
    model = timm.create_model("optdnn_apg2_vit_s", pretrained=True, in_chans=1,
                              pretrained_cfg_overlay=dict(file=vit_s_ckpt))
    assert model.patch_embed.proj.weight.shape == (384, 1, 16, 16)


def test_apg2_checkpoint_into_gd_is_refused(tmp_path):
    torch.save(tiny("vit").state_dict(), tmp_path / "apg2.pth")
    with pytest.raises(ValueError, match="scheme coefficients"):
        tiny("vit", scheme="gd", pretrained=True,
             pretrained_cfg_overlay=dict(file=str(tmp_path / "apg2.pth"), num_classes=5))


def test_pretrained_without_weights_is_timms_clear_error():
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):
        timm.create_model("optdnn_vit_ti", pretrained=True)  # the scheme-neutral names have none


def test_a_name_never_disagrees_with_its_scheme():
    with pytest.raises(ValueError, match=r"optdnn_apg2_vit_s is the apg2 model.*use optdnn_vit_s\(scheme='nag'\)"):
        timm.create_model("optdnn_apg2_vit_s", scheme="nag")
    with pytest.raises(ValueError, match="optdnn_gd_convnext_iso_fm is the gd model"):
        timm.create_model("optdnn_gd_convnext_iso_fm", scheme="apg2")
    assert timm.create_model("optdnn_gd_convnext_iso_fm", scheme="gd").blocks.scheme == "gd"
    for scheme in SCHEMES:  # the scheme-neutral names take any
        assert timm.create_model("optdnn_convnext_iso_fm", scheme=scheme).blocks.scheme == scheme


def test_unknown_scheme_and_bad_pool_are_refused():
    with pytest.raises(ValueError, match="unknown scheme 'adam'"):
        tiny("vit", scheme="adam")
    with pytest.raises(ValueError, match="class_token"):
        tiny("vit", class_token=False)
    with pytest.raises(ValueError, match="global_pool"):
        tiny("convnext", global_pool="token")


def test_img_size_override_resamples_pos_embed(tmp_path, vit_s_ckpt):
    model = timm.create_model("optdnn_apg2_vit_s", pretrained=True, img_size=128, patch_size=8,
                              pretrained_cfg_overlay=dict(file=vit_s_ckpt))
    assert model.pos_embed.shape == (1, 16 * 16 + 1, 384)
    assert model.patch_embed.proj.weight.shape == (384, 3, 8, 8)
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 1000)


# --- the timm interface --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_head_interface(family):
    model = tiny(family).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(9, "avg")
    assert model(x).shape == (2, 9)
    assert timm.create_model(TINY[family][0], **{**TINY[family][1], "num_classes": 0})(x).shape == (2, 32)
    assert tiny(family, in_chans=1)(torch.randn(2, 1, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", ""])
def test_vit_global_pool_choices(pool):
    model = tiny("vit", global_pool=pool, class_token=pool != "")
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == ((2, 5) if pool else (2, 16, 5))


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_forward_intermediates_and_prune(family):
    model = tiny(family).eval()
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x, indices=[0, 2])
    assert [t.shape for t in inter] == [(2, 32, 4, 4)] * 2
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), final)
        only = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
    assert len(only) == 2
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
    kept = model.prune_intermediate_layers([1])
    assert kept == [1] and len(model.blocks) == 2
    if model.blocks.scheme == "apg2":
        assert model.blocks.coef.shape == (1,)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, indices=[1], intermediates_only=True)[0], before)


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_features_only_through_timm(family):
    name, args = TINY[family]
    args = {k: v for k, v in args.items() if k != "num_classes"}
    feats = timm.create_model(name, features_only=True, out_indices=(0, 2), **args)
    out = feats(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in out] == [(2, 32, 4, 4)] * 2
    assert feats.feature_info.channels() == [32, 32] and feats.feature_info.reduction() == [8, 8]


@pytest.mark.parametrize("family", ["vit", "convnext"])
@pytest.mark.parametrize("scheme", ["gd", "apg2", "nag", "apg2+norm"])
def test_torchscript(family, scheme):
    scheme, _, prox = scheme.partition("+")
    model = tiny(family, scheme=scheme, prox=prox or None).eval()
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("grad", [True, False], ids=["traced_with_grad", "traced_without_grad"])
@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_fx_feature_extraction(family, grad):
    from torchvision.models.feature_extraction import create_feature_extractor
    model = tiny(family).eval()
    with torch.set_grad_enabled(grad):  # timm's suite traces under no_grad: the apg2 step's inference path
        extractor = create_feature_extractor(model, return_nodes={"norm": "norm", "head": "logits"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["logits"], model(x))
        expected = model.forward_features(x) if family == "vit" else model.forward_head(model.forward_features(x), True)
        torch.testing.assert_close(out["norm"], expected)


@pytest.mark.parametrize("family", ["vit", "convnext"])
@pytest.mark.parametrize("scheme", [*SCHEMES, "apg2+norm"])
def test_dynamo_traces_one_graph_with_no_break(family, scheme):
    scheme, _, prox = scheme.partition("+")
    model = tiny(family, scheme=scheme, prox=prox or None, drop_path_rate=0.1)
    for mode in (True, False):  # training (drop-path, autograd) and eval
        explained = torch._dynamo.explain(model.train(mode))(torch.randn(2, 3, 32, 32))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scheme", ["hb", "apg2"])
def test_torch_compile_matches_eager(scheme):
    """inductor's fused update against eager's `Step`: outputs and every gradient; and inference."""
    model = perturb_(tiny("convnext", scheme=scheme)).train()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for run in (model, torch.compile(model)):
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        grads.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager, eager_grads), (compiled, compiled_grads) = grads
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for n, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads[n], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=n)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model.eval())(x), model(x), rtol=1e-4, atol=1e-4)


def test_convnext_channels_last():
    model = tiny("convnext").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref)


# --- the prox (apg2, experimental) -----------------------------------------------------------------

def test_prox_starts_as_the_plain_scheme_and_learns_its_gates():
    """prox="norm" with its gates at 0 is plain apg2 bit for bit (a baseline loads with gates 0); with gates set it
    is x' = v + g (N(v) - v), N a layer norm over channels without affine parameters, and the gates get gradients."""
    torch.manual_seed(0)
    plain = perturb_(tiny("convnext"))
    prox = tiny("convnext", prox="norm").eval()
    missing, unexpected = prox.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["blocks.prox_gate"] and not unexpected
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(prox(x), plain(x))
    assert "prox=norm, g=[0.000, 0.000, 0.000]" in repr(prox.blocks)

    blocks = blocks_of("apg2", prox="norm")
    with torch.no_grad():
        blocks.prox_gate.copy_(torch.tensor([0.3, -0.2, 0.5, 1.0, 0.1]))
    g, b = blocks.prox_gate.detach(), blocks.coef.detach()
    x = torch.randn(3, 4, dtype=torch.float64)
    x_k = y = x
    for k, f in enumerate(blocks):
        v = y + f(y)
        n = (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-6)
        x_next = v + g[k] * (n - v)
        y = x_next + b[k] * (x_next - x_k) if k < len(b) else x_next
        x_k = x_next
    out = blocks(x)
    torch.testing.assert_close(out, x_k, rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert blocks.prox_gate.grad.abs().min() > 0


@pytest.mark.parametrize("scheme", ["gd", "hb", "nag"])
def test_prox_is_apg2_only(scheme):
    with pytest.raises(ValueError, match="for scheme 'apg2' only"):
        tiny("vit", scheme=scheme, prox="norm")
    with pytest.raises(ValueError, match="the prox is one of"):
        tiny("vit", prox="l1")


def test_prox_checkpoint_into_a_model_without_prox_is_refused(tmp_path):
    torch.save(tiny("vit", prox="norm").state_dict(), tmp_path / "prox.pth")
    with pytest.raises(ValueError, match=r"prox gates \(blocks.prox_gate\)"):
        tiny("vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "prox.pth"), num_classes=5))
    model = tiny("vit", prox="norm", pretrained=True,
                 pretrained_cfg_overlay=dict(file=str(tmp_path / "prox.pth"), num_classes=5))
    assert model.blocks.prox_gate.shape == (3,) and not model.blocks.prox_gate.any()
