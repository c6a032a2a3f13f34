# The compiled part: partial JPEG decoding for the FFCV loaders (timm_optdnn/data/_jpeg.c, libjpeg-turbo).
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("timm_optdnn.data._jpeg", ["timm_optdnn/data/_jpeg.c"], libraries=["jpeg"], extra_compile_args=["-O3"]),
])
