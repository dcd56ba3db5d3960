# The repository root is the package `sparsetron` (package-dir in pyproject.toml); its subpackages
# are every folder below with an __init__.py, found here so new ones need no listing.
from setuptools import find_packages, setup

setup(packages=["sparsetron"] + [f"sparsetron.{p}" for p in find_packages(".", exclude=["tests*", "build*"])])
