# The compiled parts are optional: a machine without a compiler or libjpeg-turbo's headers still installs the package
# (pip prints a warning for each one it skips). _jpeg is the FFCV loaders' partial JPEG decoder ([data] extra,
# libjpeg-turbo); _apg2 the fused apg2 step (OpenMP: it joins torch's libgomp at load time).
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("timm_optdnn.data._jpeg", ["timm_optdnn/data/_jpeg.c"], libraries=["jpeg"], extra_compile_args=["-O3"],
              optional=True),
    Extension("timm_optdnn.models._apg2", ["timm_optdnn/models/_apg2.c"], optional=True,
              extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"], extra_link_args=["-fopenmp"]),
])
