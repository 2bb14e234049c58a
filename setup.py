"""The package list, derived from the source tree so a new subpackage cannot be left out of the wheel.

export/ and runtime/ live at the top level (the product's layout) but import as edgegpt.export and
edgegpt.runtime: one distribution, one namespace. pyproject.toml's TOML cannot map folders into another
package's namespace and find their subpackages at once, hence these few lines of code.
"""

from setuptools import find_packages, setup

# import name -> folder in the repository
PACKAGE_ROOTS = {"edgegpt": "edgegpt", "edgegpt.export": "export", "edgegpt.runtime": "runtime"}


def packages_under(name: str, folder: str) -> list[str]:
    return [name] + [f"{name}.{sub}" for sub in find_packages(folder)]


setup(
    packages=[package for name, folder in PACKAGE_ROOTS.items() for package in packages_under(name, folder)],
    package_dir=PACKAGE_ROOTS,
)
