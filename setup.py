# The compiled part is optional: a machine without a compiler or libjpeg-turbo's headers still installs the package
# (pip prints a warning when it skips it). _jpeg is the FFCV loaders' partial JPEG decoder ([data] extra, libjpeg-turbo).
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("timm_optdnn.data._jpeg", ["timm_optdnn/data/_jpeg.c"], libraries=["jpeg"], extra_compile_args=["-O3"],
              optional=True),
])
