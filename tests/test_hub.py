"""Pretrained weights: publish -> local-dir round trip (the printed and the carded commands), bad weight files, url
downloads from a loopback server, the ImageNet tags through a loopback Hugging Face hub, the shipped tags."""
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Tuple
from unittest import mock

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import timm_optdnn  # noqa: F401  registers the models
from timm_optdnn.models.schemes import SCHEMES
from timm_optdnn.pretrained import PretrainedWeightsError, expected_sha256, sha256_file
from timm_optdnn.training.publish import HERE, main

FAMILIES = {  # both builders route pretrained=True through the checks
    "convnext": ("optdnn_apg2_convnext_iso_s", dict(dim=32, depth=3, patch_size=8, num_classes=5)),
    "vit": ("optdnn_apg2_vit_ti", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)),
}
ARCH, ARGS = FAMILIES["convnext"]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
NO_SOURCE = dict(hf_hub_id=None, url=None, file=None)  # a cfg overlay that leaves only the source a test gives


def tiny(arch: str = ARCH, **kw) -> torch.nn.Module:
    """A family's toy size under its apg2 or gd name."""
    return timm.create_model(arch, **{**dict(FAMILIES.values())[arch.replace("_gd_", "_apg2_")], **kw}).eval()


def with_file(arch: str, path, **kw) -> torch.nn.Module:
    return tiny(arch, pretrained=True, pretrained_cfg_overlay=dict(NO_SOURCE, file=str(path), num_classes=5), **kw)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tmp_path_factory) -> Tuple[str, torch.nn.Module, Path]:
    """A model with non-default weights everywhere (incl. learned scheme coefficients) and its exported state dict."""
    arch = FAMILIES[request.param][0]
    model = tiny(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("run") / "export.safetensors"
    save_file(model.state_dict(), str(path))
    return arch, model, path


class Server:
    """A real HTTP server on 127.0.0.1 serving `files` (path -> (body, Content-Length it claims, extra headers))."""

    def __init__(self):
        files: Dict[str, Tuple[bytes, int, Dict[str, str]]] = {}
        self.files, self.hits = files, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def head(h):
                self.hits.append(h.path)
                if h.path not in files:
                    h.send_response(404)
                    h.send_header("X-Error-Code", "EntryNotFound")  # how the Hugging Face hub says it
                    h.send_header("Content-Length", "0")
                    h.end_headers()
                    return b""
                body, length, headers = files[h.path]
                h.send_response(200)
                for k, v in dict(headers, **{"Content-Length": str(length)}).items():
                    h.send_header(k, v)
                h.end_headers()
                h.close_connection = True
                return body

            def do_HEAD(h):
                h.head()

            def do_GET(h):
                h.wfile.write(h.head())  # fewer bytes than claimed = a connection dropped mid-download

            def log_message(h, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, path: str, body: bytes, length: int = -1, **headers: str) -> str:
        self.files["/" + path] = (body, len(body) if length < 0 else length, headers)
        return f"{self.url}/{path}"


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def offline():
    """Any socket connection attempt fails the test: proves a load needs no network."""
    return mock.patch.object(socket.socket, "connect", side_effect=AssertionError("network access attempted"))


def cli_args(arch: str):
    return ["--model", arch, "--model-args", *[f"{k}={v}" for k, v in dict(FAMILIES.values())[arch].items()]]


def hashed(body: bytes, stem: str = "w", ext: str = "safetensors") -> str:
    return f"{stem}-{hashlib.sha256(body).hexdigest()}.{ext}"


def card_usage(folder: Path) -> str:
    """The Python block of a folder's model card, pointed at the folder."""
    card = (folder / "README.md").read_text()
    code = re.search(r"## Model Usage\n```python\n(.*?)```", card, re.S).group(1)
    assert HERE in code
    return code.replace(HERE, str(folder))


def run_snippet(code: str, cwd: Path, image: Image.Image) -> dict:
    """Run documented code as a user would, in `cwd` next to an image.png."""
    image.save(cwd / "image.png")
    scope: dict = {}
    old = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, "<documented>", "exec"), scope)
    finally:
        os.chdir(old)
    return scope


GREY = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36), dtype=np.uint8), mode="L")


# ------------------------------------------------------------------------------------------- publish

@pytest.mark.timeout(120)
def test_publish_round_trips_through_the_printed_and_the_carded_commands(trained, tmp_path, capsys):
    arch, model, export = trained
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {arch}\nepochs: 3\nlr: 0.004\n")
    out = tmp_path / "pub"
    main(["publish", str(export), "--out", str(out), *cli_args(arch), "--name", f"{arch}.toy",
          "--input-size", "3", "32", "32", "--mean", "0.5", "--std", "0.25", "--top1", "91.23", "--dataset",
          "toy test", "--recipe", str(recipe), "--label-names", "a,b,c,d,e"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    printed = capsys.readouterr().out.split("load with:\n", 1)[1]  # the exact lines publish prints
    with offline():
        loaded = run_snippet(printed, tmp_path, GREY)["model"].eval()
    assert torch.equal(loaded(X), model(X))
    assert list(loaded.pretrained_cfg["label_names"]) == ["a", "b", "c", "d", "e"]
    data = timm.data.resolve_data_config({}, model=loaded)
    assert [tuple(data[k]) for k in ("input_size", "mean", "std")] == [(3, 32, 32), (0.5,) * 3, (0.25,) * 3]

    with offline():  # the card's usage block, grey image included
        scope = run_snippet(card_usage(out), tmp_path, GREY)
    x = scope["transform"](GREY.convert("RGB")).unsqueeze(0)
    assert torch.equal(scope["probs"], model(x).softmax(-1))

    card = (out / "README.md").read_text()
    assert f"Params (M): {sum(p.numel() for p in model.parameters()) / 1e6:.3f}" in card
    assert "**Top-1 accuracy (%):** 91.23" in card and "toy test" in card
    assert "**Top-5 accuracy (%):** not measured" in card  # never invented
    assert "GFLOPs: not measured" in card
    assert "epochs: 3" in card and sha256_file(out / "model.safetensors") in card
    assert "Learned scheme coefficients" in card
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["tag"] == "toy"


@pytest.mark.timeout(120)
def test_grey_model_publishes_its_channel_count(tmp_path):
    model = tiny(ARCH, in_chans=1)
    with torch.no_grad():
        model.head.bias.add_(torch.arange(5.0))
    save_file(model.state_dict(), str(tmp_path / "grey.safetensors"))
    out = tmp_path / "pub"
    main(["publish", str(tmp_path / "grey.safetensors"), "--out", str(out), *cli_args(ARCH), "in_chans=1",
          "--mean", "0.3", "--std", "0.2"])  # the channel count comes from the model
    with offline():
        scope = run_snippet(card_usage(out), tmp_path, GREY)
    assert tuple(scope["model"].pretrained_cfg["input_size"]) == (1, 224, 224)
    assert tuple(scope["config"]["mean"]) == (0.3,) and scope["probs"].shape == (1, 5)
    x = scope["transform"](GREY).unsqueeze(0)
    assert x.shape == (1, 1, 224, 224) and torch.equal(scope["probs"], model(x).softmax(-1))


@pytest.mark.timeout(120)
def test_publish_never_destroys_what_it_did_not_write(trained, tmp_path, capsys):
    arch, model, export = trained
    out = tmp_path / "pub"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["publish", str(export), "--out", str(out), *cli_args(arch)])
    assert e.value.code == 1 and "is not empty (README.md, keep.txt): pass --overwrite" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "my notes" and sorted(p.name for p in out.iterdir()) == [
        "README.md", "keep.txt"]

    main(["publish", str(export), "--out", str(out), *cli_args(arch), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "keep.txt", "model.safetensors"]
    assert (out / "keep.txt").read_text() == "mine" and "Model card" in (out / "README.md").read_text()

    (out / "old-weights.pth").write_bytes(b"someone else's")  # another weight file: which one loads? refused
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit):
        main(["publish", str(export), "--out", str(out), *cli_args(arch), "--overwrite", "--hash-name"])
    assert "holds other weights (model.safetensors, old-weights.pth)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched, no temporary left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


DS_RUN = """
import os, sys, torch, deepspeed, timm, timm_optdnn
from timm_optdnn.training.run_dir import RunDir
run, port = sys.argv[1], sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
model = timm.create_model("{arch}", num_classes=5, **{kwargs})
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                  config=dict(train_batch_size=2, zero_optimization=dict(stage=1)))
for _ in range(2):  # move every weight (incl. the scheme coefficients) away from its init
    engine.backward(engine(torch.randn(2, 3, 32, 32)).logsumexp(1).mean())
    engine.step()
engine.save_checkpoint(run + "/checkpoints", tag="step00000002", client_state=dict(
    model="{arch}", model_kwargs={kwargs}, num_classes=5))
RunDir(run).commit_checkpoint("step00000002", run_id="test", world_size=1)
open(run + "/config.yaml", "w").write("model: {arch}\\nzero_stage: 1\\n")
torch.save(engine.module.eval()(torch.load(sys.argv[3])), run + "/logits.pt")
"""


@pytest.mark.timeout(180)
def test_publish_from_a_deepspeed_run_dir(tmp_path):
    """A real (one-rank, ZeRO-1) DeepSpeed checkpoint: model, kwargs and recipe come from the run itself."""
    kwargs = {k: v for k, v in ARGS.items() if k != "num_classes"}
    torch.save(X, tmp_path / "x.pt")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-c", DS_RUN.format(arch=ARCH, kwargs=kwargs), str(run), str(port),
                    str(tmp_path / "x.pt")], check=True, timeout=170, capture_output=True)
    main(["publish", str(run), "--out", str(tmp_path / "pub")])
    loaded = timm.create_model(f"local-dir:{tmp_path / 'pub'}", pretrained=True).eval()
    assert torch.equal(loaded(X), torch.load(run / "logits.pt"))
    assert "zero_stage: 1" in (tmp_path / "pub" / "README.md").read_text()


@pytest.mark.timeout(60)
def test_publish_bad_inputs_exit_with_one_line(trained, tmp_path, capsys):
    arch, _, export = trained
    cases = [
        (["--model", ARCH, "--model-args", "dim=48", "depth=3", "patch_size=8", "num_classes=5"],
         export, r"does not fit optdnn_apg2_convnext_iso_s.*dim.*48"),
        (["--model", ARCH], tmp_path / "missing.safetensors", r"missing.safetensors does not exist"),
        (["--model", ARCH], tmp_path, r"has no intact checkpoint \(none was saved\)"),
    ]
    for args, source, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["publish", str(source), "--out", str(tmp_path / "x"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: ") and re.search(message, err), (source, err)
        assert not (tmp_path / "x").exists()


@pytest.mark.timeout(60)
def test_hash_named_publish_loads_offline_as_a_checked_file(trained, tmp_path):
    arch, model, export = trained
    out = tmp_path / "pub"
    main(["publish", str(export), "--out", str(out), *cli_args(arch), "--hash-name"])
    (weights,) = out.glob("model-*.safetensors")
    assert expected_sha256(weights.name) == sha256_file(weights)
    with offline():
        assert torch.equal(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(X), model(X))
        assert torch.equal(with_file(arch, weights)(X), model(X))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one flipped byte
    for load in (lambda: with_file(arch, weights), lambda: timm.create_model(f"local-dir:{out}", pretrained=True)):
        with pytest.raises(PretrainedWeightsError, match=rf"{arch}: weight file {re.escape(str(weights))} has "
                                                         r"sha256 \w+, but its name promises \w+ \(a corrupt"):
            load()


# ------------------------------------------------------------------------------------------ bad files

def bad_files(good: bytes, folder: Path, suffix: str) -> Dict[str, Tuple[Path, str]]:
    """name -> (a bad weight file, what the one-line error must say)."""
    rng = np.random.default_rng(0)
    kinds = {"random bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "zero bytes": b"",
             "truncated": good[:len(good) // 2]}
    files = {}
    for kind, body in kinds.items():
        path = folder / f"{kind.replace(' ', '_')}{suffix}"
        path.write_bytes(body)
        files[kind] = path, "is empty" if not body else f"is not a complete {suffix[1:].replace('pth', 'torch')}"
    files["missing"] = folder / f"missing{suffix}", "does not exist"
    return files


@pytest.mark.timeout(60)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_bad_weight_file_gets_one_message_naming_it(trained, tmp_path, suffix):
    arch, model, export = trained
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save({"model": model.state_dict()}, good)  # the official checkpoints' layout
    else:
        good.write_bytes(export.read_bytes())
    assert torch.equal(with_file(arch, good)(X), model(X))
    for kind, (path, what) in bad_files(good.read_bytes(), tmp_path, suffix).items():
        with pytest.raises(PretrainedWeightsError) as e:
            with_file(arch, path)
        msg = str(e.value)
        assert msg.startswith(f"{arch}: weight file {path} {what}") and "\n" not in msg, (kind, msg)
        assert "Re-running" not in msg, (kind, msg)  # torch's page of advice stays out


@pytest.mark.timeout(60)
def test_a_local_dir_with_bad_or_no_weights_names_them(trained, tmp_path):
    arch, _, export = trained
    out = tmp_path / "pub"
    main(["publish", str(export), "--out", str(out), *cli_args(arch)])
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(PretrainedWeightsError, match=rf"weight file {re.escape(str(out))}/model.safetensors is empty"):
        timm.create_model(f"local-dir:{out}", pretrained=True)
    (out / "model.safetensors").unlink()
    with pytest.raises(PretrainedWeightsError, match=r"holds 0 weight files \(none\); expected model.safetensors"):
        timm.create_model(f"local-dir:{out}", pretrained=True)


# ------------------------------------------------------------------------------------------ url download

def official_checkpoint(model: torch.nn.Module) -> bytes:
    """A checkpoint in the layout of the official isotropic ConvNeXt files: {"model": state dict}, no coefficients."""
    import io
    buf = io.BytesIO()
    torch.save({"model": {k: v for k, v in model.state_dict().items() if k != "blocks.coef"}}, buf)
    return buf.getvalue()


def from_url(url: str, cache: Path, scheme: str = "apg2") -> torch.nn.Module:
    return tiny(ARCH.replace("apg2", scheme), pretrained=True, cache_dir=cache,
                pretrained_cfg_overlay=dict(NO_SOURCE, url=url, num_classes=5))


@pytest.mark.timeout(60)
def test_url_download_checks_caches_and_reuses(server, tmp_path):
    gd = tiny(ARCH.replace("apg2", "gd"))
    body = official_checkpoint(gd)
    url = server.serve("convnext/iso_tiny_1k_ema.pth", body)  # no hash in the name, as the official files
    cache = tmp_path / "cache"
    warm = from_url(url, cache)
    assert torch.equal(warm(X), gd(X))  # the apg2 warm start computes the baseline
    assert [p.name for p in cache.iterdir()] == ["iso_tiny_1k_ema.pth"]
    hits = len(server.hits)
    with offline():  # a cached file is reused with no network at all
        assert torch.equal(from_url(url, cache, "gd")(X), gd(X))
    assert len(server.hits) == hits

    (cache / "iso_tiny_1k_ema.pth").write_bytes(body[:100])  # a cut-off cache entry is fetched again
    assert torch.equal(from_url(url, cache)(X), gd(X))
    assert len(server.hits) == hits + 1 and (cache / "iso_tiny_1k_ema.pth").read_bytes() == body

    hashed_url = server.serve(hashed(body, "iso", "pth"), body)  # a hash in the name is checked on every load
    assert torch.equal(from_url(hashed_url, cache)(X), gd(X))
    (cache / hashed(body, "iso", "pth")).write_bytes(body[:-1] + b"\0")
    assert torch.equal(from_url(hashed_url, cache)(X), gd(X))
    assert sha256_file(cache / hashed(body, "iso", "pth")) == expected_sha256(hashed_url)


def failing_urls(server: Server, body: bytes) -> Dict[str, Tuple[str, str]]:
    """name -> (url, what the message must say), one per way a download can go wrong."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nothing listens there once closed
    junk = b"<html>not a checkpoint</html>"
    return {
        "wrong hash": (server.serve(hashed(b"other"), body), "download of .* failed .*invalid hash value"),
        "404": (f"{server.url}/gone.pth", r"download of .* failed \(HTTP Error 404"),
        "refused": (f"http://127.0.0.1:{port}/w.pth", "download of .* failed .*refused"),
        "truncated": (server.serve("cut.pth", body[:len(body) // 2], len(body)), "is not a complete torch"),
        "not a checkpoint": (server.serve("junk.safetensors", junk), "is not a complete safetensors"),
    }


@pytest.mark.timeout(60)
def test_every_download_failure_names_model_and_url_and_leaves_no_cache_file(server, tmp_path):
    body = official_checkpoint(tiny(ARCH.replace("apg2", "gd")))
    for case, (url, why) in failing_urls(server, body).items():
        cache = tmp_path / case.replace(" ", "_")
        with pytest.raises(PretrainedWeightsError) as e:
            from_url(url, cache)
        msg = str(e.value)
        assert msg.startswith(f"{ARCH}: ") and url in msg and re.search(why, msg), (case, msg)
        assert not cache.exists() or not any(cache.iterdir()), (case, list(cache.iterdir()))


# ---------------------------------------------------------------------------------------------- tags

def all_cfgs():
    return {k: v for n in timm.list_models("optdnn_*") for k, v in timm.models.get_arch_pretrained_cfgs(n).items()}


def test_every_tag_has_weights_a_license_and_preprocessing():
    cfgs = all_cfgs()
    weighted = {name for name, cfg in cfgs.items() if cfg.file or cfg.url or cfg.hf_hub_id}
    assert set(timm.list_pretrained("optdnn*")) == weighted
    # only the scheme-neutral names (optdnn_vit_s, built with scheme=...) come without weights
    assert sorted(n.split(".")[0] for n in set(cfgs) - weighted) == sorted(
        n for n in timm.list_models("optdnn_*") if n.split("_")[1] not in SCHEMES)
    for name, cfg in cfgs.items():
        assert cfg.license and cfg.paper_ids and cfg.num_classes > 0 and len(cfg.input_size) == 3, name
        assert cfg.crop_pct and len(cfg.mean) == len(cfg.std) == cfg.input_size[0], name
        assert bool(cfg.file) + bool(cfg.url) + bool(cfg.hf_hub_id) == (name in weighted), name
        assert not cfg.file or Path(cfg.file).is_file() and expected_sha256(cfg.file), f"{name}: {cfg.file}"


@pytest.mark.parametrize("size, deit", [("ti", "tiny"), ("s", "small"), ("b", "base")])
def test_vit_tags_are_timms_deit_weights_with_deits_preprocessing(size, deit):
    deit_cfg = timm.models.get_pretrained_cfg(f"deit_{deit}_patch16_224.fb_in1k")
    for name in (f"optdnn_gd_vit_{size}.fb_in1k", f"optdnn_apg2_vit_{size}.fb_in1k_warmstart"):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id == deit_cfg.hf_hub_id == f"timm/deit_{deit}_patch16_224.fb_in1k"
        for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes",
                    "fixed_input_size", "license"):
            assert getattr(cfg, key) == getattr(deit_cfg, key), (name, key)


@pytest.mark.parametrize("size, official", [("s", "small"), ("b", "base"), ("l", "large")])
def test_convnext_tags_are_the_official_isotropic_weights(size, official):
    url = f"https://dl.fbaipublicfiles.com/convnext/convnext_iso_{official}_1k_224_ema.pth"
    for name in (f"optdnn_gd_convnext_iso_{size}.fb_in1k", f"optdnn_apg2_convnext_iso_{size}.fb_in1k_warmstart"):
        cfg = timm.models.get_pretrained_cfg(name)
        assert (cfg.url, cfg.input_size, cfg.interpolation, cfg.crop_pct, cfg.mean, cfg.std, cfg.license) == (
            url, (3, 224, 224), "bicubic", 0.875, timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD,
            "mit")


@pytest.mark.timeout(30)
def test_pretrained_without_weights_is_a_clear_error():
    with pytest.raises(RuntimeError, match=f"No pretrained weights exist for {ARCH}"):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=NO_SOURCE, **ARGS)


HUB_LOAD = """
import sys, torch, timm, timm_optdnn
x = torch.load(sys.argv[1])
deit = timm.create_model("deit_tiny_patch16_224.fb_in1k", pretrained=True).eval()
gd = timm.create_model("optdnn_gd_vit_ti", pretrained=True).eval()
warm = timm.create_model("optdnn_apg2_vit_ti.fb_in1k_warmstart", pretrained=True).eval()
print(gd.pretrained_cfg["tag"], warm.pretrained_cfg["tag"], (gd(x) - deit(x)).abs().max().item(),
      torch.equal(warm(x), gd(x)))
"""


@pytest.mark.timeout(300)
def test_vit_tags_download_from_the_hub_then_load_offline(server, tmp_path):
    """`optdnn-hub download` against a loopback Hugging Face hub fills the cache; with the hub gone and
    HF_HUB_OFFLINE=1 the tags load from it and compute timm's own DeiT."""
    deit = timm.create_model("deit_tiny_patch16_224")
    save_file(deit.state_dict(), str(tmp_path / "deit.safetensors"))
    body = (tmp_path / "deit.safetensors").read_bytes()
    server.serve("timm/deit_tiny_patch16_224.fb_in1k/resolve/main/model.safetensors", body,
                 **{"X-Repo-Commit": "0" * 40, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'})
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hf"), HF_ENDPOINT=server.url, HF_HUB_DISABLE_TELEMETRY="1")
    cli = [sys.executable, "-m", "timm_optdnn.training.publish", "download"]
    r = subprocess.run([*cli, "optdnn_gd_vit_ti.fb_in1k", "optdnn_apg2_vit_ti.fb_in1k_warmstart"], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert f"optdnn_gd_vit_ti.fb_in1k: hf-hub:timm/deit_tiny_patch16_224.fb_in1k -> {tmp_path}/hf/" in r.stdout
    assert "HF_HUB_OFFLINE=1" in r.stdout and r.stderr == ""

    torch.save(torch.randn(2, 3, 224, 224), tmp_path / "x.pt")
    offline_env = dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    hits = len(server.hits)
    r = subprocess.run([sys.executable, "-c", HUB_LOAD, str(tmp_path / "x.pt")], env=offline_env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    gd_tag, warm_tag, diff, warm_is_gd = r.stdout.split()
    assert (gd_tag, warm_tag, warm_is_gd) == ("fb_in1k", "fb_in1k_warmstart", "True") and float(diff) <= 1e-5
    assert len(server.hits) == hits


def test_download_of_an_unknown_tag_lists_the_tags(capsys):
    with pytest.raises(SystemExit, match="optdnn_gd_vit_xl.fb_in1k is no pretrained tag; those with weights: .*"
                                         "optdnn_gd_vit_ti.fb_in1k"):
        main(["download", "optdnn_gd_vit_xl.fb_in1k"])


@pytest.mark.timeout(300)
def test_convnext_tag_loads_the_official_checkpoint_from_the_torch_hub_cache(tmp_path, monkeypatch, capsys):
    """An official-layout ConvNeXt-S checkpoint where torch.hub caches the official URL: `optdnn-hub download` finds
    it without network and both tags compute the official network."""
    from reference_convnext_iso import ConvNeXtIsotropic
    official = ConvNeXtIsotropic(depth=18, dim=384).eval()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "convnext_iso_small_1k_224_ema.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"model": official.state_dict()}, cached)
    with offline():
        main(["download", "optdnn_gd_convnext_iso_s.fb_in1k"])
        gd = timm.create_model("optdnn_gd_convnext_iso_s", pretrained=True).eval()
        warm = timm.create_model("optdnn_apg2_convnext_iso_s", pretrained=True).eval()
    assert f"optdnn_gd_convnext_iso_s.fb_in1k: {cached} (sha256 {sha256_file(cached)})" in capsys.readouterr().out
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (gd(x) - official(x)).abs().max() <= 1e-5 and torch.equal(warm(x), gd(x))


# ------------------------------------------------------------------------------------- shipped weights

def test_a_grey_image_through_the_documented_preprocessing(tmp_path):
    """docs/weights.md's preprocessing: grey images go in as RGB to the 3-channel tag, and straight to the same tag
    built with in_chans=1 (timm folds the stem over the channels): the two agree."""
    code = re.search(r"## Preprocessing.*?```python\n(.*?)```", (Path(__file__).parents[1] / "docs" / "weights.md")
                     .read_text(), re.S).group(1)
    with offline():
        rgb = run_snippet(code, tmp_path, GREY)
        grey = run_snippet(code.replace("pretrained=True)", "pretrained=True, in_chans=1)"), tmp_path, GREY)
    assert rgb["config"]["input_size"] == (3, 28, 28) and grey["config"]["input_size"] == (1, 28, 28)
    assert torch.allclose(rgb["probs"], grey["probs"], atol=1e-6)


SHIPPED = [n for n in timm.list_pretrained("optdnn*") if n.endswith(".fmnist")]


@pytest.fixture(scope="module")
def fashion_mnist_test(tmp_path_factory) -> Path:
    """The real Fashion-MNIST test split (10k, from the Debian package) as a beton, written like the demo's."""
    from timm_optdnn.data import write_beton
    beton = tmp_path_factory.mktemp("fmnist") / "fashion_mnist_test.beton"
    write_beton("fashion-mnist", beton, split="test")
    return beton


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_load_offline_and_score_their_model_card(name, fashion_mnist_test, tmp_path):
    from conftest import make_loaders
    with offline():
        model = timm.create_model(name, pretrained=True).eval()
    folder = Path(model.pretrained_cfg["file"]).parent
    assert model.pretrained_cfg["label_names"][9] == "Ankle boot"
    card = (folder / "README.md").read_text()
    stated = float(re.search(r"\*\*Top-1 accuracy \(%\):\*\* ([0-9.]+)", card).group(1))
    data = timm.data.resolve_input_data_config(model)  # the preprocessing the tag declares, as a user gets it
    _, val = make_loaders(str(fashion_mnist_test), str(fashion_mnist_test), num_classes=model.num_classes,
                          batch_size=1000, num_workers=2, img_size=data["input_size"][-1],
                          crop_pct=data["crop_pct"], mean=data["mean"], std=data["std"])
    correct = seen = 0
    with torch.no_grad():
        for images, labels in val:
            correct += (model(images).argmax(1) == labels).sum().item()
            seen += labels.numel()
    assert seen == 10_000
    assert abs(100 * correct / seen - stated) <= 0.1, (name, 100 * correct / seen, stated)
    with offline():
        scope = run_snippet(card_usage(folder), tmp_path, GREY)  # a grey image through the card's preprocessing
    assert torch.equal(scope["model"](images), model(images)) and scope["probs"].shape == (1, 10)
