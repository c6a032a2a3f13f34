"""The OptDNN models: scheme equations, baseline exactness, warm start and the timm interface."""
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn

import timm_optdnn
from timm_optdnn.training.benchmark import saved_bytes
from timm_optdnn.models import schemes
from timm_optdnn.models.schemes import Apg2Step, SchemeBlocks, apg2_step, fused_forward, init_coefficients
from reference_convnext_iso import ConvNeXtIsotropic

ALL = timm.list_models("optdnn_*")
TINY = {  # every family at toy size, full code path
    "vit": ("optdnn_apg2_vit_ti", dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)),
    "convnext": ("optdnn_apg2_convnext_iso_s", dict(dim=32, depth=3, patch_size=8, num_classes=5)),
}


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
    assert model.blocks.scheme == ("apg2" if "apg2" in name else "gd")
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


def hand_loop(scheme, branches, coefs, x):
    """DESIGN.md section 1, transcribed literally (z and x kept separately for apg2)."""
    x_prev, z = x, x
    for k, f in enumerate(branches):
        if scheme == "gd":
            x = x + f(x)
        elif scheme == "hb":
            x, x_prev = x + f(x) + coefs[k] * (x - x_prev), x
        elif scheme == "nag":
            y = x + coefs[k] * (x - x_prev)
            x, x_prev = y + f(y), x
        else:
            t = coefs[k]
            y = (1 - t) * x + t * z
            z = z + f(y) / t
            x = (1 - t) * x + t * z
    return x


@pytest.mark.parametrize("scheme", ["gd", "hb", "nag", "apg2"])
def test_scheme_matches_hand_written_loop(scheme):
    branches = [Lin(k) for k in range(5)]
    blocks = SchemeBlocks(copy.deepcopy(branches), scheme=scheme)
    if scheme != "gd":
        with torch.no_grad():  # away from the init schedule, so every coefficient matters
            blocks.coef.copy_(torch.tensor([0.9, 0.7, 0.45, 0.3, 0.6]))
    x = torch.randn(3, 4, dtype=torch.float64)
    blocks.double()
    coefs = blocks.coef.detach()
    expected = hand_loop(scheme, [b.double() for b in branches], coefs, x)
    torch.testing.assert_close(blocks(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheme", ["hb", "nag", "apg2"])
def test_scheme_gradients_match_hand_written_loop(scheme):
    """apg2 rebuilds F(y) in backward instead of saving it: gradients must still be autograd's."""
    branches = [Lin(k).double() for k in range(5)]
    blocks = SchemeBlocks(copy.deepcopy(branches), scheme=scheme).double()
    with torch.no_grad():
        blocks.coef.copy_(torch.tensor([1.0, 0.7, 0.45, 0.3, 0.6]))
    coef = blocks.coef.detach().clone().requires_grad_(True)
    x = torch.randn(3, 4, dtype=torch.float64)
    blocks(x).sin().sum().backward()
    hand_loop(scheme, branches, coef, x).sin().sum().backward()
    torch.testing.assert_close(blocks.coef.grad, coef.grad, rtol=1e-10, atol=1e-12)
    mine = [p for n, p in blocks.named_parameters() if n != "coef"]
    for p, ref in zip(mine, [p for b in branches for p in b.parameters()], strict=True):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_apg2_rebuilt_state_gives_autograds_gradients(monkeypatch):
    """Apg2Step keeps every m-th d (m = ceil(sqrt(10)) = 4 here: d_4, d_8) and rebuilds the others in backward, once
    per segment: against plain autograd through the same float32 step (apg2_step, what TorchScript runs), every
    gradient, the coefficients' included, differs by float32 rounding only; a retained graph's second backward too."""
    blocks = SchemeBlocks([Lin(k) for k in range(10)], scheme="apg2")
    with torch.no_grad():
        blocks.coef.copy_(torch.tensor([1.0, 0.7, 0.45, 0.3, 0.6, 0.9, 0.2, 0.5, 0.8, 0.35]))
    x = torch.randn(20000, 4)  # 80,000 elements: both threads of the kernels get work
    grads, over, rebuilt = [], [], []
    fused, rebuild = schemes.fused_forward, schemes.rebuild_d
    monkeypatch.setattr(schemes, "fused_forward", lambda *a, **kw: over.append(kw["d_out"] is a[2]) or fused(*a, **kw))
    monkeypatch.setattr(schemes, "rebuild_d", lambda kept, ys, ts: rebuilt.append(len(ys) - 1) or rebuild(kept, ys, ts))

    def backward(out, **kw):
        blocks.zero_grad()
        out.backward(**kw)
        grads.append({n: p.grad.clone() for n, p in blocks.named_parameters()})

    out = blocks(x).sin().sum()
    backward(out, retain_graph=True)
    backward(out)
    blocks.apg2_step_lean = lambda y, fy, d, t0, t1, *segment: apg2_step(y, fy, d, t0, t1)  # shadows it
    backward(blocks(x).sin().sum())
    mine, again, plain = grads
    for n, g in plain.items():
        torch.testing.assert_close(mine[n], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())
        assert torch.equal(again[n], mine[n])
    assert over == [True] * 4 + [False] + [True] * 3 + [False]  # d' is written over d, unless d is kept
    assert rebuilt == [3, 3] * 2  # d_1..d_3 from d_0 = 0, d_5..d_7 from d_4 (step 8's d_8 is kept), each backward


LAYOUTS = {  # 2 x 76,800 elements: both threads of the fused kernels get work
    "contiguous": lambda t: t.reshape(4, 50, 384),
    "channels_last": lambda t: t.reshape(4, 384, 10, 5).contiguous(memory_format=torch.channels_last),
    "transposed": lambda t: t.reshape(4, 384, 50).transpose(1, 2),  # not dense in one order: the torch ops
}


@pytest.mark.parametrize("d_used", [True, False], ids=["d_used", "last_step"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_apg2_step_matches_the_torch_ops(layout, d_used, monkeypatch):
    """_apg2.c against the torch ops it replaces: forward (also written over its inputs), backward's rebuilt d's, and
    every gradient (also when d' reaches nothing, as after the last step: its gradient is None, not zeros)."""
    g = torch.Generator().manual_seed(0)
    y, fy, d, g_y1, g_d1 = [LAYOUTS[layout](torch.randn(4 * 50 * 384, generator=g)) for _ in range(5)]
    t0, t1 = torch.tensor(0.55), torch.tensor(0.4)
    fusable = schemes.fusable(y, fy, d)
    assert fusable == (layout != "transposed")
    y1, d1 = apg2_step(y, fy, d, t0, t1)
    first = apg2_step(y, fy, torch.zeros_like(d), t0, t1)  # d_0 = 0, passed as None
    if fusable:
        fresh, y_, d_ = fused_forward(y, fy, d, t0, t1), y.clone(), d.clone()
        for mine, ref in zip(fresh + fused_forward(y, fy, None, t0, t1), (y1, d1) + first):
            torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
            assert mine.stride() == ref.stride()
        assert all(o is i for o, i in zip(fused_forward(y_, fy, d_, t0, t1, y_, d_), (y_, d_)))
        assert torch.equal(y_, fresh[0]) and torch.equal(d_, fresh[1])  # written over y, d: the same numbers
    t2 = torch.tensor(0.7)
    ts = torch.stack([t0, t1, t2])
    y2, d2 = apg2_step(y1, g_y1, d1, t1, t2)  # a second step, from d and from d = 0
    first2 = apg2_step(first[0], g_y1, first[1], t1, t2)

    def rebuilds():  # d', d'' from y, y', y'' and d, and from y, y', y'' alone (d = 0)
        return schemes.rebuild_d(d, [y, y1, y2], ts) + schemes.rebuild_d(None, [y, first[0], first2[0]], ts)

    rebuilt = rebuilds()

    def grads():
        inputs = [t.clone().requires_grad_(True) for t in (y, fy, d, t0, t1)]
        state = inputs[2].clone()  # as in the driver, d is an earlier step's output; kept here, so not written over
        y1, d1 = Apg2Step.apply(*inputs[:2], state, *inputs[3:], t0[None], 0, {}, state)
        # clones: the fused backward writes the gradient of d over that of d', which in the driver is its own
        torch.autograd.backward((y1, d1) if d_used else y1, (g_y1, g_d1.clone()) if d_used else g_y1)
        return [t.grad for t in inputs]

    fused, again = grads(), grads()
    monkeypatch.setattr(schemes, "FUSED", False)
    for mine, same, ref in zip(fused, again, grads(), strict=True):
        assert torch.equal(mine, same)  # per-thread sums added in a fixed order: repeatable
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for mine, ref in zip(rebuilt, rebuilds(), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    for mine, ref in zip(rebuilt, (d1, d2, first[1], first2[1]), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_apg2_inference_overwrites_only_its_own_state(monkeypatch):
    """Inference writes y' over y (d' always takes d's place): the same output as training's step, the caller's input
    untouched, and never a block input that a hook may keep (y_2 below)."""
    blocks = SchemeBlocks([Lin(k) for k in range(5)], scheme="apg2")
    x = torch.randn(20000, 4)  # 80,000 elements: both threads of the kernel get work
    x0, ref, seen, in_place = x.clone(), [], [], []
    blocks[2].register_forward_pre_hook(lambda m, args: ref.append(args[0].clone()))
    expected = blocks(x).detach()  # autograd on: Apg2Step, fresh tensors
    blocks[2].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    fused = schemes.fused_forward
    monkeypatch.setattr(schemes, "fused_forward", lambda *a, **kw: in_place.append(kw["y_out"] is a[0]) or fused(*a, **kw))
    with torch.inference_mode():
        assert torch.equal(blocks(x), expected)
    assert in_place == [False, True, False, True]  # y_0 is the caller's, block 2 is hooked
    assert torch.equal(x, x0) and torch.equal(seen[0], ref[0])
    blocks[2]._forward_pre_hooks.clear()
    in_place.clear()
    with torch.no_grad():
        assert torch.equal(blocks(x), expected)
    assert in_place == [False, True, True, True]


def test_apg2_inference_takes_torch_ops_for_a_branch_output_in_another_layout():
    class Transposed(Lin):  # F(y) of y's shape in column-major strides: the fused kernel would misread it
        def forward(self, x):
            return super().forward(x).t().contiguous().t()

    blocks = SchemeBlocks([Lin(0), Transposed(1), Lin(2), Lin(3)], scheme="apg2")
    x = torch.randn(20000, 4)
    expected = blocks(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(blocks(x), expected)


@pytest.mark.parametrize("family", ["vit", "convnext"])
@pytest.mark.parametrize("depth", [2, 10])
def test_apg2_saves_every_mth_state_beyond_gd_and_nothing_else(family, depth):
    x = torch.randn(4, 3, 32, 32)
    gd, apg2 = tiny(family, scheme="gd", depth=depth).train(), tiny(family, depth=depth).train()
    state = apg2.blocks[0](apg2.stem(x) if family == "convnext" else apg2._pos_embed(apg2.patch_embed(x)))
    extra = saved_bytes(apg2, lambda: apg2(x)) - saved_bytes(gd, lambda: gd(x))
    kept = {2: 0, 10: 2}[depth]  # d_k for 0 < k < depth - 1 with k % ceil(sqrt(depth)) == 0: none; d_4, d_8
    assert extra == kept * state.numel() * state.element_size()


def test_initial_coefficients_follow_the_algorithms():
    torch.testing.assert_close(init_coefficients("apg2", 4), torch.tensor([1.0, 2 / 3, 0.5, 0.4]))
    torch.testing.assert_close(init_coefficients("nag", 4), torch.tensor([0.0, 0.0, 0.25, 0.4]))
    model = tiny("vit")
    assert model.scheme_coefficients()[:2] == pytest.approx([1.0, 2 / 3])
    assert "t=[1.000, 0.667" in repr(model.blocks)


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_apg2_with_unit_t_is_gd_bit_for_bit(family):
    torch.manual_seed(0)
    apg2 = perturb_(tiny(family))
    gd = tiny(family, scheme="gd")
    state = {k: v for k, v in apg2.state_dict().items() if k != "blocks.coef"}
    gd.load_state_dict(state)
    with torch.no_grad():
        apg2.blocks.coef.fill_(1.0)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(apg2(x), gd.eval()(x))


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


def test_coefficients_are_trainable_and_never_weight_decayed():
    model = tiny("convnext")
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    coef_groups = [g for g in opt.param_groups if any(p is model.blocks.coef for p in g["params"])]
    assert len(coef_groups) == 1 and coef_groups[0]["weight_decay"] == 0.0
    ld = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    assert any(p is model.blocks.coef and g["weight_decay"] == 0.0 for g in ld.param_groups for p in g["params"])


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
    assert model.scheme_coefficients() == [1.0] * 12  # warm start: apg2 begins as the baseline
    assert model.blocks.coef.requires_grad


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
                              pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "ls.pth"), num_classes=7))
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
        timm.create_model("optdnn_apg2_vit_s", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "ten.pth")))
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
        timm.create_model("optdnn_apg2_vit_s", pretrained=True)


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
        assert model.blocks.coef.shape == (2,)
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
@pytest.mark.parametrize("scheme", ["gd", "apg2", "nag"])
def test_torchscript(family, scheme):
    model = tiny(family, scheme=scheme).eval()
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


@pytest.mark.timeout(600)
def test_torch_compile_matches_eager():
    model = tiny("convnext").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


def test_convnext_channels_last():
    model = tiny("convnext").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref)
