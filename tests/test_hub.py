"""Pretrained weights: publish -> local-dir round trip, verified url download from a loopback server, tags."""
import http.server
import re
import socket
import threading
from pathlib import Path
from typing import Dict, Tuple
from unittest import mock

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_optdnn  # noqa: F401  registers the models
from timm_optdnn.pretrained import PretrainedWeightsError, expected_sha256, sha256_file
from timm_optdnn.training.publish import main

FAMILIES = {  # both builders route pretrained=True through the verified download
    "convnext": ("optdnn_apg2_convnext_iso_s", dict(dim=32, depth=3, patch_size=8, num_classes=5)),
    "vit": ("optdnn_apg2_vit_ti", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)),
}
ARCH, ARGS = FAMILIES["convnext"]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny(arch: str = ARCH, **kw) -> torch.nn.Module:
    return timm.create_model(arch, **{**dict(FAMILIES.values())[arch], **kw}).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tmp_path_factory) -> Tuple[str, torch.nn.Module, Path]:
    """A model with non-default weights everywhere (incl. learned t_k) and its exported state dict."""
    arch = FAMILIES[request.param][0]
    model = tiny(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("run") / "export.safetensors"
    save_file(model.state_dict(), str(path))
    return arch, model, path


class Server:
    """A real HTTP server on 127.0.0.1 serving `files` (path -> (body, Content-Length it claims))."""

    def __init__(self):
        files: Dict[str, Tuple[bytes, int]] = {}
        self.files, self.hits = files, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(h):
                self.hits.append(h.path)
                if h.path not in files:
                    return h.send_error(404)
                body, length = files[h.path]
                h.send_response(200)
                h.send_header("Content-Length", str(length))
                h.end_headers()
                h.wfile.write(body)  # fewer bytes than claimed = a connection dropped mid-download
                h.close_connection = True

            def log_message(h, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, name: str, body: bytes, length: int = -1) -> str:
        self.files["/" + name] = (body, len(body) if length < 0 else length)
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def offline():
    """Any socket connection attempt fails the test: proves a load needs no network."""
    return mock.patch.object(socket.socket, "connect", side_effect=AssertionError("network access attempted"))


def from_url(arch: str, url: str, cache: Path) -> torch.nn.Module:
    return tiny(arch, pretrained=True, pretrained_cfg_overlay=dict(url=url, num_classes=5), cache_dir=cache)


def cli_args(arch: str):
    return ["--model", arch, "--model-args", *[f"{k}={v}" for k, v in dict(FAMILIES.values())[arch].items()]]


def hashed(body: bytes, stem: str = "w") -> str:
    import hashlib
    return f"{stem}-{hashlib.sha256(body).hexdigest()}.safetensors"


# ------------------------------------------------------------------------------------------- publish

@pytest.mark.timeout(120)
def test_publish_local_dir_round_trip(trained, tmp_path):
    arch, model, export = trained
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {arch}\nepochs: 3\nlr: 0.004\n")
    out = tmp_path / "pub"
    main(["publish", str(export), "--out", str(out), *cli_args(arch), "--name", f"{arch}.toy", "--input-size", "3", "32", "32",
          "--mean", "0.5", "--std", "0.25", "--top1", "91.23", "--dataset", "toy test", "--recipe", str(recipe)])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    with offline():
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert torch.equal(loaded(X), model(X))
    data = timm.data.resolve_data_config({}, model=loaded)
    assert (tuple(data["input_size"]), tuple(data["mean"]), tuple(data["std"])) == ((3, 32, 32), (0.5,) * 3, (0.25,) * 3)

    card = (out / "README.md").read_text()
    assert f"Params (M): {sum(p.numel() for p in model.parameters()) / 1e6:.3f}" in card
    assert "**Top-1 accuracy (%):** 91.23" in card and "toy test" in card
    assert "**Top-5 accuracy (%):** not measured" in card  # never invented
    assert "GFLOPs: not measured" in card
    assert "epochs: 3" in card and sha256_file(out / "model.safetensors") in card
    assert "Learned scheme coefficients" in card


DS_RUN = """
import os, sys, torch, deepspeed, timm, timm_optdnn
from timm_optdnn.training.run_dir import RunDir
run, port = sys.argv[1], sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
model = timm.create_model("{arch}", num_classes=5, **{kwargs})
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                  config=dict(train_batch_size=2, zero_optimization=dict(stage=1)))
for _ in range(2):  # move every weight (incl. the t_k) away from its init
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
    import subprocess
    import sys
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
def test_publish_rejects_a_checkpoint_of_another_shape(trained, tmp_path):
    arch, _, export = trained
    with pytest.raises(ValueError, match=r"does not fit optdnn_apg2_convnext_iso_s.*dim.*48"):
        main(["publish", str(export), "--out", str(tmp_path / "x"), "--model", ARCH,
              "--model-args", "dim=48", "depth=3", "patch_size=8", "num_classes=5"])
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        main(["publish", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "y"), "--model", ARCH])


@pytest.mark.timeout(60)
def test_hash_named_publish_loads_offline_as_a_verified_file(trained, tmp_path):
    arch, model, export = trained
    out = tmp_path / "pub"
    main(["publish", str(export), "--out", str(out), *cli_args(arch), "--hash-name"])
    (weights,) = out.glob("model-*.safetensors")
    assert expected_sha256(weights.name) == sha256_file(weights)
    with offline():
        assert torch.equal(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(X), model(X))
        via_file = tiny(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), num_classes=5))
    assert torch.equal(via_file(X), model(X))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one flipped byte
    with pytest.raises(PretrainedWeightsError, match=rf"{arch}: {re.escape(str(weights))} has sha256 .*corrupt"):
        tiny(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), num_classes=5))


# ------------------------------------------------------------------------------------------ download

@pytest.mark.timeout(60)
def test_url_download_verifies_caches_and_reuses(trained, server, tmp_path):
    arch, model, export = trained
    body = export.read_bytes()
    url = server.serve(hashed(body), body)
    cache = tmp_path / "cache"
    assert torch.equal(from_url(arch, url, cache)(X), model(X))
    assert [p.name for p in cache.iterdir()] == [hashed(body)]
    hits = len(server.hits)

    with offline():  # a verified cache entry is reused with no network at all
        assert torch.equal(from_url(arch, url, cache)(X), model(X))
    assert len(server.hits) == hits

    (cache / hashed(body)).write_bytes(b"garbage")  # a corrupt cache entry is replaced, not loaded
    server.serve(hashed(body), body)
    assert torch.equal(from_url(arch, url, cache)(X), model(X))
    assert len(server.hits) == hits + 1 and sha256_file(cache / hashed(body)) == expected_sha256(url)


def failing_urls(server: Server, body: bytes) -> Dict[str, Tuple[str, str]]:
    """name -> (url, error the message must contain), one per way a download can go wrong."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there any more
    junk = b"<html>not a checkpoint</html>"
    return {
        "wrong hash": (server.serve(hashed(b"other"), body), "has sha256 .* expected"),
        "404": (f"http://127.0.0.1:{server.httpd.server_port}/{hashed(body, 'gone')}", "HTTP 404"),
        "refused": (f"http://127.0.0.1:{port}/{hashed(body)}", "cannot reach .*refused"),
        "truncated": (server.serve(hashed(body, "cut"), body[:len(body) // 2], len(body)), "truncated"),
        "not a checkpoint": (server.serve(hashed(junk, "junk"), junk), "is not a safetensors checkpoint"),
        "no hash": (server.serve("plain.safetensors", body), "names no sha256"),
    }


@pytest.mark.timeout(60)
def test_every_download_failure_names_model_and_url_and_leaves_no_cache_file(trained, server, tmp_path):
    arch, _, export = trained
    for case, (url, why) in failing_urls(server, export.read_bytes()).items():
        cache = tmp_path / case.replace(" ", "_")
        with pytest.raises(PretrainedWeightsError) as e:
            from_url(arch, url, cache)
        msg = str(e.value)
        assert msg.startswith(f"{arch}: ") and url in msg and re.search(why, msg), (case, msg)
        assert not cache.exists() or not any(cache.iterdir()), (case, list(cache.iterdir()))


# ---------------------------------------------------------------------------------------------- tags

def test_list_pretrained_is_exactly_the_tags_with_weights():
    cfgs = {k: v for n in timm.list_models("optdnn_*") for k, v in timm.models.get_arch_pretrained_cfgs(n).items()}
    assert len(cfgs) >= 12
    with_weights = {n for n, c in cfgs.items() if c.url or c.file or c.hf_hub_id}
    assert set(timm.list_pretrained("optdnn*")) == with_weights
    for name, cfg in cfgs.items():
        assert cfg.license and cfg.paper_ids and cfg.num_classes > 0 and len(cfg.input_size) == 3, name
        assert cfg.crop_pct and len(cfg.mean) == len(cfg.std) == cfg.input_size[0], name
        if name in with_weights:  # every weight location is verifiable and (for files) present
            loc = cfg.file or cfg.url or cfg.hf_hub_id
            assert cfg.hf_hub_id or expected_sha256(loc), f"{name}: {loc} carries no sha256"
            assert not cfg.file or Path(cfg.file).is_file(), f"{name}: {cfg.file} is not shipped"
        else:
            assert not (cfg.url or cfg.file or cfg.hf_hub_id), name
    imagenet = [n for n, c in cfgs.items() if c.num_classes == 1000]
    assert imagenet and not set(imagenet) & with_weights  # no ImageNet weights are trained yet


@pytest.mark.timeout(30)
def test_pretrained_without_weights_is_a_clear_error():
    with pytest.raises(RuntimeError, match=f"No pretrained weights exist for {ARCH}"):
        timm.create_model(ARCH, pretrained=True, **ARGS)


# ------------------------------------------------------------------------------------- shipped weights

SHIPPED = timm.list_pretrained("optdnn*")


@pytest.fixture(scope="module")
def fashion_mnist_test(tmp_path_factory) -> Path:
    """The real Fashion-MNIST test split (10k, from the Debian package) as a beton, written like the demo's."""
    from timm_optdnn.data import write_beton
    beton = tmp_path_factory.mktemp("fmnist") / "fashion_mnist_test.beton"
    write_beton("fashion-mnist", beton, split="test")
    return beton


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_load_offline_and_score_their_model_card(name, fashion_mnist_test):
    from conftest import make_loaders
    with offline():
        model = timm.create_model(name, pretrained=True).eval()
    folder = Path(model.pretrained_cfg["file"]).parent
    card = (folder / "README.md").read_text()
    assert "Fashion-MNIST" in card, f"{name}: only Fashion-MNIST weights are shipped and evaluated here"
    stated = float(re.search(r"\*\*Top-1 accuracy \(%\):\*\* ([0-9.]+)", card).group(1))
    data = timm.data.resolve_data_config({}, model=model)  # the preprocessing the tag declares, as a user gets it
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
    assert torch.equal(timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(images), model(images))
