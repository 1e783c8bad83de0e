#!/usr/bin/env bash
# The real-GPU check, on a CUDA machine without a package registry (an NVIDIA H200, sm_90, 16 cores here), from
# the repository root, with kit/scripts/cuda-carry.sh's .gpu-carry/ beside it. Each call does what is missing:
#   1. install the carried wheels into .gpu-site (ignored; kept on a warm machine between calls);
#   2. compile llama-cpp-python with CUDA for sm_90 only, on all cores (CMAKE_CUDA_ARCHITECTURES=90);
#   3. put the bundled GGUF together from its carried parts (two calls: one carries 64 MiB at most);
#   4. with small parameters: kit info, kit bench -ngl 0,all, notebooks 10, 20 and 30 and the tuner (notebook 85's
#      benchmark_settings), writing at most 8 files to $OUT (or outputs/gpu-check).
# Meant to fit one 10-minute command once the build is there: the build itself takes a few minutes on 16 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/gpu-check}
C=.gpu-carry
SITE=$PWD/.gpu-site
ARCH=${CUDA_ARCH:-90}
mkdir -p "$OUT" "$SITE"
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
if [ ! -f "$SITE/.wheels" ] && ls "$C"/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$C"/whl/*.whl
  touch "$SITE/.wheels"
fi
if ! python3 -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; then
  b0=$(date +%s)
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" \
    "$C/llama_cpp_python.tar.gz" 2>&1 | tail -20
  echo "cuda-check: llama-cpp-python compiled for sm_$ARCH in $(( $(date +%s) - b0 )) s on $(nproc) cores" | tee "$OUT/build.txt"
fi
# the model: parts arrive over two calls; each is kept in .gpu-site until all are there, then joined and checked
read -r SHA NPARTS NAME < "$C/model.sha256"
MODEL=$SITE/$NAME
if [ ! -f "$MODEL" ]; then
  for part in "$C"/model.part*; do [ -f "$part" ] && cp -n "$part" "$SITE/"; done
  have=$(ls "$SITE"/model.part* 2>/dev/null | wc -l)
  if [ "$have" -lt "$NPARTS" ]; then
    echo "cuda-check: $have of $NPARTS model parts here: carry the others in the next call"; exit 0
  fi
  cat "$SITE"/model.part* > "$MODEL.tmp"
  [ "$(sha256sum "$MODEL.tmp" | cut -d' ' -f1)" = "$SHA" ] || { echo "cuda-check: the joined model's sha256 differs"; exit 1; }
  mv "$MODEL.tmp" "$MODEL" && rm -f "$SITE"/model.part*
fi
python3 -m kit info --model "$MODEL" --no-bandwidth > "$OUT/info.txt" 2>&1
python3 -m kit bench -q -m "$MODEL" -ngl 0,99 -p 512 -n 128 -r 5 -o csv > "$OUT/bench_ngl.csv" 2> "$OUT/bench.log"
RUN=/tmp/gpu-check-run
python3 -m kit run --quick --model "$MODEL" --only 00,10,20,30 --out "$RUN" > "$OUT/run.log" 2>&1 || true
python3 - "$MODEL" "$RUN" "$OUT" <<'PY' >> "$OUT/run.log" 2>&1 || true
import json, sys
from kit.studies.autotune import AutotuneStudy, benchmark_settings
model, run, out = sys.argv[1:4]
study = AutotuneStudy(model=model, out_dir=f"{run}/85_autotune", repetitions=3, n_prompt=64, n_gen=16,
                      kv_type=["f16"], n_ctx=[512], rope_freq_base=[], n_batch=[512], n_ubatch=[512],
                      confirm_looks=1)
tune = benchmark_settings(**study.tuner_kwargs(), progress=False)
summary = {"best": tune.best.to_dict(), "why": tune.why_best, "gpu_layers": tune.gpu_layers,
           "steps": tune.steps, "confirmed": [c.to_row() for c in tune.confirmed]}
json.dump(summary, open(f"{out}/tuner.json", "w"), indent=2, default=str)
PY
python3 - "$RUN" "$OUT" <<'PY' >> "$OUT/run.log" 2>&1 || true
import json, pathlib, sys
from kit.results import load_results
run, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
verdicts, keep = {}, ["n_gpu_layers", "test", "status", "avg_ts", "vram_peak_mb", "vram_baseline_mb",
                      "vram_llama_mb", "vram_llama_model_mb", "vram_llama_kv_mb", "vram_ggml_used_mb", "error"]
for d in sorted(p for p in run.iterdir() if p.is_dir()):
    if (d / "verdicts.json").exists():
        verdicts[d.name] = json.loads((d / "verdicts.json").read_text())
g = load_results(run / "10_gpu_layers")
g[[c for c in keep if c in g]].to_csv(out / "g1_rows.csv", index=False)
search = run / "10_gpu_layers" / "gpu_search.json"
(out / "verdicts.json").write_text(json.dumps({"verdicts": verdicts, "gpu_search": json.loads(search.read_text())
                                               if search.exists() else None}, indent=2, default=str))
PY
echo "cuda-check: done in $(( $(date +%s) - t0 )) s; files: $(ls "$OUT" | tr '\n' ' ')"
