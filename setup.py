"""The one compiled piece of moxkit: the fused CPU loop, loaded with ctypes.

Built for the baseline of the platform: the AVX2 and AVX-512 paths are compiled with function
target attributes and chosen at run time, so one build serves every x86-64 CPU. Contraction
into fused multiply-adds and fast-math stay off: the contract fixes every fp32 rounding.
optional=True: where no C compiler is available the install still succeeds and moxkit falls
back to the torch path, which computes the same bits more slowly."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "moxkit.engine._fused",
            sources=["moxkit/engine/_fused.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
