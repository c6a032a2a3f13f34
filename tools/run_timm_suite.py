"""Run timm's own model test suite (tests/test_models.py of timm's source distribution) on the optdnn models.

    python tools/run_timm_suite.py [extra pytest args]      (make timm-suite; ~2 min on 2 idle cores)

The sdist comes from PyPI (a package registry) into build/. timm's suite classifies models by name:
its ViTs are listed in NON_STD_FILTERS (token outputs, no pool_size), so our ViT names are added
there exactly as timm lists its own; nothing else in the suite is changed.
"""
import subprocess
import sys
import tarfile
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parent.parent / "build"


def fetch_suite() -> Path:
    src = ROOT / f"timm-{timm.__version__}"
    if not (src / "tests" / "test_models.py").exists():
        ROOT.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(ROOT), f"timm=={timm.__version__}"], check=True)
        with tarfile.open(ROOT / f"timm-{timm.__version__}.tar.gz") as tar:
            tar.extractall(ROOT, filter="data")
    tests = src / "tests" / "test_models.py"
    text = tests.read_text()
    if "'optdnn_*_vit_*'" not in text:
        tests.write_text(text.replace("NON_STD_FILTERS = [\n", "NON_STD_FILTERS = [\n    'optdnn_*_vit_*',\n", 1))
    return src


if __name__ == "__main__":
    src = fetch_suite()
    runner = ("import sys, pytest, timm_optdnn; "
              "sys.exit(pytest.main(['tests/test_models.py', '-k', 'optdnn', '-q', '-p', 'no:cacheprovider'] + sys.argv[1:]))")
    sys.exit(subprocess.run([sys.executable, "-c", runner, *sys.argv[1:]], cwd=src).returncode)
