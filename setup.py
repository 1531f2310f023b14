"""Builds the Python module `nanscope` with the project's CMake build, for the python3 running pip.

`pip install .` / `pip wheel .` (with --no-build-isolation to use Debian's setuptools and wheel,
offline) configure a CMake build in build/pip-<python> with only the module's targets and copy
the module into the wheel. Environment:
  CMAKE_ARGS          extra CMake arguments (e.g. -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  NANSCOPE_BUILD_DIR  reuse a configured build tree (scripts/build.sh's build/) instead; its
                      module must have been configured for this same Python
  CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: all cores)
"""
import os
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r"project\(nanscope VERSION ([0-9][0-9.]*)",
                    (ROOT / "CMakeLists.txt").read_text()).group(1)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        reuse = os.environ.get("NANSCOPE_BUILD_DIR")
        if reuse:
            build = Path(reuse).resolve()
        else:
            # One tree per interpreter, kept between runs so that a rebuild is incremental.
            build = ROOT / "build" / f"pip-{sys.implementation.cache_tag}"
            self.run_cmd(["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
                          "-DCMAKE_BUILD_TYPE=Release", "-DNANSCOPE_TESTS=OFF",
                          "-DNANSCOPE_BENCH=OFF", "-DNANSCOPE_PYTHON=ON",
                          # pybind11's CMake finds the headers and the module suffix from it.
                          f"-DPYTHON_EXECUTABLE={sys.executable}",
                          f"-DPython_EXECUTABLE={sys.executable}"]
                         + shlex.split(os.environ.get("CMAKE_ARGS", "")))
        self.run_cmd(["cmake", "--build", str(build), "--target", "nanscope_py", "-j", jobs])
        built = build / "python" / f"nanscope{suffix}"
        if not built.is_file():
            found = sorted(p.name for p in (build / "python").glob("nanscope*.so"))
            raise RuntimeError(
                f"{built} was not built: {build} makes {found or 'no module'} for another "
                f"Python than {sys.executable} ({suffix}); unset NANSCOPE_BUILD_DIR or "
                f"configure that tree with -DPYTHON_EXECUTABLE={sys.executable}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(built), str(target))

    @staticmethod
    def run_cmd(cmd):
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)


setup(
    name="nanscope",
    version=VERSION,
    description=("Find out why a LoRA-merged checkpoint produces NaN: Hugging Face checkpoints "
                 "run on the CPU exactly as transformers does; hidden states of discrete and "
                 "soft prompts"),
    long_description=(ROOT / "docs" / "python.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    install_requires=["numpy"],
    ext_modules=[Extension("nanscope", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    # setuptools' own scratch space beside the CMake trees, not loose in build/.
    options={"build": {"build_base": "build/setuptools"}},
    zip_safe=False,
)
