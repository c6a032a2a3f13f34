"""`python -m train` from a checkout: the trainer's command line (installed: `optdnn-train`)."""
import sys

from timm_optdnn.training.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
