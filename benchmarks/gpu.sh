#!/usr/bin/env bash
# The GPU part of the benchmark suite, for a fresh GPU machine with this repo copied and
# python3 + torch (+ torchvision) preinstalled, but no .venv. The entries without
# gpu_resnet18_train_224px, q2_fused and the compile variants took about 6 minutes on one H100.
#
#   OUT=/some/dir bash benchmarks/gpu.sh
#
# Needs, carried with the repo (git-excluded here):
#   .whl/      wheels of what the machine may lack: optuna, alembic, colorlog, mako, sqlalchemy
#              (matching its Python); click, filelock, pyyaml, tqdm, pillow and numpy if absent
#   .gpudata/  Fashion-MNIST's four IDX .gz files (or set KDSWEEP_DATA to a folder holding them)
# Writes $OUT/<entry>.json per entry, $OUT/gpu.json (all entries) and $OUT/benchmarks-gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kdsweep-gpu-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || echo "warning: installing .whl/ failed"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
missing=$(python3 - <<'PY'
import importlib
mods = ["torch", "torchvision", "numpy", "PIL", "click", "filelock", "optuna", "sqlalchemy",
        "alembic", "colorlog", "tqdm", "yaml", "packaging"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "missing Python modules (add their wheels to .whl/): $missing" | tee "$OUT/missing.txt"
fi
if [ -z "${KDSWEEP_DATA:-}" ]; then
  mkdir -p /tmp/kdsweep-data && cp .gpudata/*.gz /tmp/kdsweep-data/ 2>/dev/null
  export KDSWEEP_DATA=/tmp/kdsweep-data
fi
export KDSWEEP_CACHE=/tmp/kdsweep-bench-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

# entry:seconds, most important first; each runs in its own process under its own timeout.
for spec in gpu_resnet18_train_32px:150 gpu_resnet18_train_224px:60 q2_fused:300 \
            gpu_resnet50_teacher_224px:30 core_vs_reference:70 \
            q2_vs_plain_ce:70 gpu_trials_per_device:110 gpu_compile_reuse:75; do
  name=${spec%%:*}; limit=${spec##*:}
  echo "== $name (limit ${limit}s)"
  start=$SECONDS
  timeout "$limit" python3 -m benchmarks --device cuda --only "$name" --output "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 3 "$OUT/$name.log"
  echo "   rc=$rc, $((SECONDS - start)) s"
done

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from benchmarks import report
out = Path(sys.argv[1])
entries, meta = [], None
for f in sorted(out.glob("*.json")):
    if f.name == "gpu.json":
        continue
    data = json.loads(f.read_text())
    meta = meta or data["machine"]
    entries += data["entries"]
names = [e["name"] for e in entries]
for n in ("gpu_resnet18_train_32px", "gpu_resnet18_train_224px", "q2_fused",
          "gpu_resnet50_teacher_224px", "core_vs_reference",
          "q2_vs_plain_ce", "gpu_trials_per_device", "gpu_compile_reuse"):
    if n not in names:
        entries.append({"name": n, "skipped": "timed out or failed: see its .log"})
meta = meta or report.machine()
report.write_json(out / "gpu.json", entries, meta)
(out / "benchmarks-gpu.md").write_text(report.markdown(entries, meta, "bash benchmarks/gpu.sh"))
print(report.table(entries))
PY
