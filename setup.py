"""The one compiled piece of moxkit: the fused CPU loop, loaded with ctypes.

optional=True: where no C compiler is available the install still succeeds and moxkit falls
back to the torch path, which computes the same bits more slowly."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "moxkit._fused",
            sources=["moxkit/_fused.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
