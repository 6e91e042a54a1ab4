#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_pending.sh installs on a device machine without a package
# registry, into the git-ignored .whl/ (carry it with the run). Runs here, where pip can reach
# the registry. PY selects the device's Python (default 3.12, what the lent H100s have). The
# device tool carries at most 64 MiB, so .whl/ should hold only this folder (about 50 MB).
set -euo pipefail
PY="${PY:-3.12}"
dest="${WHEELS_DIR:-.whl/all}"
mkdir -p "$dest"
pkgs="zarr donfig numcodecs google-crc32c dask distributed click cloudpickle fsspec locket partd
  sortedcontainers tblib toolz zict msgpack psutil tornado pyyaml jinja2 markupsafe packaging
  typing_extensions tqdm requests charset_normalizer idna urllib3 certifi pydantic pydantic_core
  annotated_types typing_inspection python-dateutil pytz six scikit-learn joblib threadpoolctl"
# the versions this project's .venv runs (and tests) with
specs=$(.venv/bin/python - $pkgs <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PYEOF
)
.venv/bin/python -m pip download -q --only-binary=:all: --no-deps --python-version "$PY" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$dest" $specs
du -sh "$dest"
