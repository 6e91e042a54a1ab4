#!/usr/bin/env bash
# The GPU measurements the open issues still need, as one command for a lent device machine
# (torch/torchvision preinstalled, no package registry). Run from the repository root:
#
#   bash benchmarks/gpu_pending.sh     # writes results_cuda.{json,md} under $OUT (or benchmarks/out)
#
# Packages the machine lacks (zarr for bench_features; dask/distributed for bench_locality;
# scikit-learn for the smoke check's Lasso) are
# installed from wheel folders under the git-ignored .whl/ (fill it with benchmarks/fetch_wheels.sh;
# carry it with the run: carry [".whl"]);
# pip picks the wheels matching the machine's Python from --find-links. Budget: about 5 minutes
# (H100, 2026-11-26: smoke 20 s, train 45 s, excitation 60 s, features 60 s, locality 90 s;
# bench_zcolumn, not yet run there, estimated at about 1 minute).
set -uo pipefail
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
site="$(mktemp -d)"
missing=""
for pair in zarr:zarr donfig:donfig numcodecs:numcodecs google_crc32c:google-crc32c dask:dask \
    distributed:distributed click:click cloudpickle:cloudpickle fsspec:fsspec \
    locket:locket partd:partd sortedcontainers:sortedcontainers tblib:tblib toolz:toolz zict:zict \
    msgpack:msgpack psutil:psutil tornado:tornado yaml:pyyaml jinja2:jinja2 markupsafe:markupsafe \
    packaging:packaging typing_extensions:typing_extensions tqdm:tqdm requests:requests \
    charset_normalizer:charset_normalizer idna:idna urllib3:urllib3 certifi:certifi \
    pydantic:pydantic pydantic_core:pydantic_core annotated_types:annotated_types \
    typing_inspection:typing_inspection dateutil:python-dateutil pytz:pytz six:six \
    sklearn:scikit-learn joblib:joblib threadpoolctl:threadpoolctl; do
  python3 -c "import ${pair%%:*}" 2>/dev/null || missing="$missing ${pair##*:}"
done
links=""
for d in .whl/*/; do links="$links --find-links $d"; done
if [ -n "$missing" ] && [ -n "$links" ]; then
  echo "installing from .whl:$missing"
  python3 -m pip install -q --no-deps --no-index --no-compile $links --target "$site" $missing 2>&1 | tail -3
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# The CPU topology decides what 1 -> 16 Dask workers can reach (16 vCPUs may be 8 cores x 2 threads).
lscpu > "$OUT/lscpu.txt" 2>&1 || true
grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket)" "$OUT/lscpu.txt" || true
# Trainer at paper size (issue 2), excitation at VGG19 pool3 (issue 4), VGG19 extraction (issue 3),
# Dask 1 -> 16 workers and the Z column over all 4096 dims (issue 5). A failing benchmark is
# recorded and the others still run.
# First the library's stages on CUDA against the CPU (benchmarks/gpu_smoke.py, under a minute).
timeout 120 python3 -m benchmarks.gpu_smoke --device cuda | tee "$OUT/gpu_smoke.txt"
# BENCHES picks a subset (default: all five; "none" runs only the smoke check).
if [ "${BENCHES:-}" != "none" ]; then
  timeout 500 python3 -m benchmarks.run --device cuda --full \
    --only ${BENCHES:-bench_train bench_excitation bench_features bench_locality bench_zcolumn} --out "$OUT"
fi
