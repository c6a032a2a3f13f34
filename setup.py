# The compiled parts: partial JPEG decoding for the FFCV loaders (timm_optdnn/data/_jpeg.c, libjpeg-turbo) and the
# fused apg2 step (timm_optdnn/models/_apg2.c, OpenMP: it joins torch's libgomp at load time).
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("timm_optdnn.data._jpeg", ["timm_optdnn/data/_jpeg.c"], libraries=["jpeg"], extra_compile_args=["-O3"]),
    Extension("timm_optdnn.models._apg2", ["timm_optdnn/models/_apg2.c"],
              extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"], extra_link_args=["-fopenmp"]),
])
