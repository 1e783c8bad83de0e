#!/usr/bin/env bash
# Prepare what the real-GPU check (kit/scripts/cuda-check.sh) needs on a CUDA machine that has no package registry:
#   .gpu-carry/llama_cpp_python.tar.gz   the llama-cpp-python sdist (the version .venv runs), slimmed: its git pack,
#                                        llama.cpp's vocab test models, docs, tests and benches removed (76 -> ~8 MB)
#   .gpu-carry/whl/                      Python 3.12 manylinux wheels of what the kit needs and the machine's image
#                                        lacks (papermill, ipykernel and their needs, gguf, diskcache ...)
#   .gpu-carry/model.part00 ...          the bundled GGUF (92 MiB) in parts of 44 MiB, and model.sha256 (its hash,
#                                        the number of parts): one call may carry 64 MiB in all, working tree
#                                        included, so the check takes two calls (see cuda-check.sh)
# Run here (a machine with PyPI), from the repository root. Ignored by git (.gitignore: .gpu-carry/).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
C=.gpu-carry
rm -rf "$C" && mkdir -p "$C/whl" "$C/tmp"
version=$($PY -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))")
$PY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$C/tmp"
tar xzf "$C/tmp/llama_cpp_python-$version.tar.gz" -C "$C/tmp"
src="$C/tmp/llama_cpp_python-$version"
rm -rf "$src/.git" "$src/vendor/llama.cpp/models" "$src/vendor/llama.cpp/docs" "$src/vendor/llama.cpp/tests" \
       "$src/vendor/llama.cpp/benches" "$src/vendor/llama.cpp/media"
tar czf "$C/llama_cpp_python.tar.gz" -C "$C/tmp" "llama_cpp_python-$version"
# the device image's Python (3.12) has numpy, pandas, seaborn, matplotlib, psutil, jinja2, nvidia-ml-py, cmake,
# ninja, scikit-build-core, tqdm, pyyaml, requests, httpx ...: fetch the rest, then drop what the image holds
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
$PY -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$C/whl" \
    papermill ipykernel nbformat nbclient gguf diskcache
image="numpy pandas seaborn matplotlib psutil jinja2 markupsafe nvidia_ml_py pyyaml requests urllib3 idna certifi
       charset_normalizer tqdm packaging typing_extensions attrs python_dateutil six pytz tzdata click pygments
       contourpy cycler fonttools kiwisolver pillow pyparsing httpx httpcore h11 anyio sniffio"
# debugpy and jedi (10 MB) are optional for ipykernel and IPython: a headless kernel runs without them
for name in $image debugpy jedi; do rm -f "$C/whl/${name}"-*.whl "$C/whl/$(echo "$name" | tr _ -)"-*.whl; done
model=$($PY -c "from kit.models import resolve_model; print(resolve_model('smollm2-135m'))")
# parts of 44 MiB: call 1 carries the sdist, the wheels and part 0 (about 61 MiB with the working tree), call 2 the rest
split -b 44M -d "$model" "$C/model.part"
echo "$(sha256sum "$model" | cut -d' ' -f1) $(ls "$C"/model.part* | wc -l) $(basename "$model")" > "$C/model.sha256"
rm -rf "$C/tmp"
du -sh "$C"/* | sed 's/^/  /'
echo "call 1 carries: .gpu-carry/llama_cpp_python.tar.gz .gpu-carry/whl .gpu-carry/model.part00 .gpu-carry/model.sha256"
echo "call 2 carries: $(ls "$C"/model.part* | tail -n +2 | tr '\n' ' ').gpu-carry/model.sha256"
echo "(the build in .gpu-site and part 0 stay on the warm machine between the two calls)"
