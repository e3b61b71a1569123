#!/usr/bin/env bash
# The GPU checks and benchmarks in one offline run, results in one JSON file.
#
#   bench/gpu.sh --wheels      on a machine with PyPI: the wheels a bare CUDA+PyTorch machine lacks, into .whl/
#   bench/gpu.sh               on the CUDA machine: installs .whl/ (no network), runs the gpu tests, the
#                              indexing benchmark (nvJPEG decode, bf16, batch 256) and the query benchmark,
#                              writes $OUT/gpu.json (or --out DIR); well under 10 minutes on one H200
#   bench/gpu.sh --dry         anywhere: the same steps on the CPU with the tiny model and a few images
#                              (tests/test_gpu_script.py runs it), so the script is known to work before a
#                              GPU machine is at hand
#
# faiss on the GPU (the [gpu] extra, faiss-gpu: 135 MB) needs CUDA 12's cuBLAS, hundreds of MB more: too big to
# carry, so without it here the faiss GPU tests skip and search runs on the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
out=${OUT:-/tmp/crossmodal-gpu}
wheels=.whl
while [ $# -gt 0 ]; do
    case "$1" in
        --dry) dry=1 ;;
        --out) out=$2; shift ;;
        --wheels)
            # For the device machines' Python 3.12; each package alone (--no-deps): the rest is there.
            mkdir -p "$wheels"
            python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                -d "$wheels" open_clip_torch ftfy wcwidth faiss-cpu sqlalchemy greenlet pillow-heif
            ls -la "$wheels"
            exit 0 ;;
        *) echo "unknown argument: $1 (use --dry, --out DIR or --wheels)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$out"
rm -f "$out"/{gpu,index,query}.json "$out"/*.log "$out/gpu.txt"  # a reused folder must not report an old run
py=${PYTHON:-python3}
if [ "$dry" = 1 ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
if [ "$dry" = 0 ] && compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/crossmodal-site.XXXXXX)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
started=$(date +%s)

if [ "$dry" = 1 ]; then
    index_args=(--device cpu --decode device --model crossmodal-tiny --n 12 --distinct 4 --rounds 1 --batch-size 4)
    query_args=(--model crossmodal-tiny --images 8 --queries 3 --flat-n 2000 --rounds 1)
    test_args=(-m gpu)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
    index_args=(--device cuda --n 6000 --distinct 300 --rounds 2 --batch-size 256)
    query_args=(--images 200 --queries 50 --flat-n 1000000 --rounds 3)
    test_args=(-m gpu -p no:cacheprovider)
fi

# Each step's outcome is recorded and the next one runs: one failure should not cost the others' figures.
status=0
"$py" -m pytest -q "${test_args[@]}" tests/test_gpu.py 2>&1 | tee "$out/tests.log" || status=1
"$py" bench/index_throughput.py "${index_args[@]}" --json-out "$out/index.json" 2>&1 | tee "$out/index.log" \
    || status=1
"$py" bench/query_latency.py "${query_args[@]}" --json-out "$out/query.json" 2>&1 | tee "$out/query.log" || status=1

"$py" - "$out" "$dry" "$(( $(date +%s) - started ))" <<'EOF'
import json, sys
from pathlib import Path
out, dry, seconds = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
def read(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None
tests = (out / "tests.log").read_text().strip().splitlines()
result = {"dry": dry, "seconds": seconds, "gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None,
          "tests": tests[-1] if tests else None, "index": read("index.json"), "query": read("query.json")}
(out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"wrote {out / 'gpu.json'} after {seconds} s")
EOF
exit $status
