"""Run timm's own model test suite (tests/test_models.py of timm's source distribution) on the optdnn models.

    python tools/run_timm_suite.py [-k EXPR] [extra pytest args]      (make timm-suite)

The sdist comes from PyPI (a package registry) into build/. timm's suite picks models by name and by module, and
our families join its lists exactly as timm lists its own: the ViTs NON_STD_FILTERS (token outputs, no pool_size),
both modules FEAT_INTER_FILTERS (forward_intermediates, pruning, features_only through FeatureGetterNet);
nothing else in the suite is changed. By default it runs the apg2/gd pairs of the sizes below (~8 min on 2 idle
cores); the larger sizes run the same code at other widths and depths, and timm's pruning contract test alone
takes ~15 min for ViT-B and ~30 min for ConvNeXt-iso-L here: `-k optdnn_apg2_vit_b` picks any. The scheme-neutral
names (optdnn_vit_s, ...) build the same classes as the named pairs. By default timm's two tests that download
pretrained weights are left out (NEEDS_NETWORK).
"""
import subprocess
import sys
import tarfile
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parent.parent / "build"
LISTS = {  # timm's list -> the entries for our models, inserted at its head
    "NON_STD_FILTERS": ["optdnn_*vit_*"],
    "FEAT_INTER_FILTERS": ["vit", "convnext_iso"],  # module names: timm_optdnn.models.vit, .convnext_iso
}
PAIRS = " or ".join(f"optdnn_{scheme}_{size}" for scheme in ("apg2", "gd")
                    for size in ("vit_ti", "convnext_iso_s", "convnext_iso_fm"))
# they download the pretrained tags' weights (Hugging Face hub, dl.fbaipublicfiles.com): run them with your own -k
# where the network reaches those; the loading itself is tested offline in tests/test_hub.py
NEEDS_NETWORK = ("test_model_load_pretrained", "test_model_features_pretrained")
DEFAULT_SELECTION = f"({PAIRS}) and not ({' or '.join(NEEDS_NETWORK)})"


def fetch_suite() -> Path:
    """timm's tests for the installed timm version, with our families in its lists."""
    src = ROOT / f"timm-{timm.__version__}"
    if not (src / "tests" / "test_models.py").exists():
        ROOT.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(ROOT), f"timm=={timm.__version__}"], check=True)
        with tarfile.open(ROOT / f"timm-{timm.__version__}.tar.gz") as tar:
            tar.extractall(ROOT, filter="data")
    tests = src / "tests" / "test_models.py"
    text = tests.read_text()
    for name, entries in LISTS.items():
        head = f"{name} = [\n"
        if head not in text:
            raise RuntimeError(f"timm {timm.__version__}'s {tests} has no list {name}: update {__file__}")
        missing = [e for e in entries if f"'{e}'," not in text]
        if missing:
            text = text.replace(head, head + "    " + " ".join(f"'{e}'," for e in missing) + "\n", 1)
    tests.write_text(text)
    return src


if __name__ == "__main__":
    src = fetch_suite()
    args = sys.argv[1:] if "-k" in sys.argv[1:] else ["-k", DEFAULT_SELECTION, *sys.argv[1:]]
    runner = ("import sys, pytest, timm_optdnn; "
              "sys.exit(pytest.main(['tests/test_models.py', '-q', '-p', 'no:cacheprovider'] + sys.argv[1:]))")
    sys.exit(subprocess.run([sys.executable, "-c", runner, *args], cwd=src).returncode)
