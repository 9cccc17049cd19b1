"""Only the C extension lives here; everything else about the package is in pyproject.toml.

``custseg.scoring._forest`` is optional: without a C compiler the package installs without it and batch
scoring falls back to ONNX Runtime (slower, same answers), saying so in its log.
"""

from setuptools import Extension, setup

FLAGS = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        Extension(
            "custseg.scoring._forest",
            ["custseg/scoring/_forest.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        # Exact Tree SHAP for explanations (custseg/scoring/explainer.py); optional like the forest kernel.
        Extension(
            "custseg.scoring._treeshap",
            ["custseg/scoring/_treeshap.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        # The bitmask forest evaluator (custseg/scoring/quickscorer.py); optional: the node walk stays.
        Extension(
            "custseg.scoring._quickscorer",
            ["custseg/scoring/_quickscorer.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
    ]
)
