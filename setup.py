"""Only the package list, which pyproject.toml cannot express: every package under src/ plus exprae.configs.

pyproject.toml maps ``exprae.configs`` to the repository's top-level ``configs/`` (``package-dir``), so a built
wheel or ``pip install .`` carries the Hydra configs inside the package while the checkout keeps one copy of
them at the top level. ``packages.find`` cannot add a package that lives outside ``src/``; this list does.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "exprae.configs"])
