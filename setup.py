"""Build vmiso: the Python package plus the Cython hot paths in vmiso/_fast/.

VMISO_NO_EXTENSIONS=1 builds none of them (the pure-Python twins are used instead).
"""
import glob
import os

from setuptools import find_packages, setup


def extensions():
    if os.environ.get("VMISO_NO_EXTENSIONS") == "1":
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    modules = [
        Extension(
            "vmiso._fast." + os.path.basename(path)[:-4],
            [path],
            extra_compile_args=["-O2"],
        )
        for path in sorted(glob.glob("vmiso/_fast/*.pyx"))
    ]
    return cythonize(modules, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False})


setup(
    name="vmiso",
    version="0.1.0",
    description="Run a cluster agent's tasks inside QEMU/KVM virtual machines",
    packages=find_packages(include=["vmiso", "vmiso.*"]),
    package_data={"vmiso": ["image/guest/*", "py.typed"]},
    python_requires=">=3.9",
    install_requires=["libvirt-python>=9.0", "pyroute2>=0.7", "pycdlib>=1.14", "psutil>=5.9",
                      "prometheus_client>=0.17"],
    ext_modules=extensions(),
    entry_points={"console_scripts": ["vmiso = vmiso.cli.main:main"]},
    zip_safe=False,
)
