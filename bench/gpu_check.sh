#!/usr/bin/env bash
# The CUDA paths of this project, checked for real on a machine with a CUDA GPU, in about 8 minutes:
#   1. the card(s): nvidia-smi, torch and CUDA versions, names, compute capability, native bf16;
#   2. the packages the checks need (requirements-dev.txt and accelerate), installed if missing,
#      never torch itself;
#   3. the GPU tests: python -m pytest -q -m gpu tests/test_gpu.py;
#   4. bench/compare_hf.py on the card (ours, hf_shipped, hf_tuned on a CLINC150 slice), and on a
#      card with native bf16 a second run of ours in fp16;
#   5. one summary block: tests passed / failed / skipped, and per system samples/s (training,
#      evaluation), peak GPU memory, MFU and the ratios of ours over the peers.
# Each part runs under `timeout`, within a budget for the whole script. Nothing is written into the
# checkout: logs and JSON lines go to the results folder. On a machine without a CUDA GPU it says
# so in one line and exits 0 without running anything.
#
# Usage, from anywhere (it runs from the repository root):
#   bash bench/gpu_check.sh [RESULTS_DIR] [--data-dir CLINC150_DIR]
# RESULTS_DIR: the first argument, else $OUT if set, else a new temporary folder.
# CLINC150_DIR: --data-dir, else $CLINC150_DIR, else ../shared/datasets/clinc150 from the repository
# root (train.csv, val.csv, test.csv); without it the benchmark is skipped and the tests still run.
# Environment: PYTHON (default python), GPU_CHECK_BUDGET (seconds for the whole script, default 440),
# GPU_CHECK_ROWS (training rows of the benchmark, default 6000).
# Exit status: 0 when every part that ran passed (or there is no GPU), 1 otherwise.

set -u -o pipefail

PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
results=${OUT:-}
data_dir=${CLINC150_DIR:-}
while (($#)); do
    case $1 in
        --data-dir) data_dir=${2:?--data-dir needs a folder}; shift 2 ;;
        --data-dir=*) data_dir=${1#--data-dir=}; shift ;;
        -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) results=$1; shift ;;
    esac
done
if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU present (torch.cuda.is_available() is False, or torch is missing): the GPU checks were not run."
    exit 0
fi

[[ -n $results ]] || results=$(mktemp -d -t gpu_check.XXXXXX)
if ! mkdir -p "$results" || ! results=$(cd "$results" && pwd); then
    echo "gpu_check: cannot create the results folder $results" >&2
    exit 1
fi
if [[ -n $data_dir ]] && resolved=$(cd "$data_dir" 2>/dev/null && pwd); then
    data_dir=$resolved  # absolute, before the cd below
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 1
if [[ -z $data_dir ]]; then
    data_dir="$repo/../shared/datasets/clinc150"
fi
case $results/ in
    "$repo"/*) echo "[gpu_check] note: the results folder $results is inside the checkout" ;;
esac

export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the checkout
export HF_HUB_OFFLINE=1           # the packaged model only; no hub timeouts
budget=${GPU_CHECK_BUDGET:-440}
rows=${GPU_CHECK_ROWS:-6000}
summary_reserve=20                # seconds kept for the summary
started=0                         # SECONDS counts from the start of the script
parts="$results/parts.tsv"
: > "$parts"

say() { echo "[gpu_check] $*"; }

# run_part NAME CAP MIN LOG COMMAND...: run COMMAND under timeout (CAP seconds, or what is left of
# the budget), its stdout and stderr shown and kept in LOG; a part that cannot have MIN seconds is
# skipped. One line per part goes to parts.tsv: name, status, seconds.
run_part() {
    local name=$1 cap=$2 min=$3 log=$4
    shift 4
    local left=$((budget - (SECONDS - started) - summary_reserve))
    local limit=$((cap < left ? cap : left))
    if ((limit < min)); then
        say "$name: skipped, the time budget (${budget}s) is spent"
        printf '%s\tskipped: no time left\t0\n' "$name" >> "$parts"
        return 0
    fi
    say "$name (at most ${limit}s) ..."
    local t0=$SECONDS rc
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local status="ok"
    if ((rc == 124 || rc == 137)); then status="timed out after ${limit}s"; elif ((rc != 0)); then status="failed (exit $rc)"; fi
    printf '%s\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) >> "$parts"
    say "$name: $status in $((SECONDS - t0))s"
    return "$rc"
}

# 1. The card(s).
say "results go to $results"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi 2>&1 | tee "$results/nvidia-smi.txt"
else
    say "nvidia-smi is not on PATH"
fi
run_part environment 60 5 "$results/environment.txt" "$PYTHON" - <<'EOF'
import json, platform, subprocess
import torch
cards = []
for index in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(index)
    cards.append({"index": index, "name": p.name, "capability": f"{p.major}.{p.minor}",
                  "native_bf16": p.major >= 8, "memory_gib": round(p.total_memory / 2**30, 1)})
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "nccl": None, "commit": commit or None, "cards": cards}
try:
    info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
except Exception:  # a build without NCCL
    pass
print(json.dumps(info))
for card in cards:
    print(f"GPU {card['index']}: {card['name']}, compute capability {card['capability']}, "
          f"{card['memory_gib']} GiB, native bf16: {'yes' if card['native_bf16'] else 'no (fp16 instead)'}")
print(f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, NCCL {info['nccl']}, "
      f"Python {info['python']}, commit {info['commit']}")
EOF

# 2. Packages: what requirements-dev.txt and accelerate ask for and is missing or too old; torch is
# pinned to the installed build (a constraint), so pip never replaces it.
missing=$("$PYTHON" - <<'EOF'
import os, re
from importlib import metadata

def requirements(path):
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r"):
                yield from requirements(os.path.join(os.path.dirname(path), line[2:].strip()))
            elif line:
                yield line

try:
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
for text in [*requirements("requirements-dev.txt"), "accelerate>=1.1"]:
    name = re.split(r"[<>=!~;\[ ]", text, maxsplit=1)[0]
    if name.lower() == "torch":
        continue
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(text)
        continue
    if Requirement is not None and not Requirement(text).specifier.contains(version, prereleases=True):
        print(text)
EOF
)
torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
if [[ -n $missing ]]; then
    mapfile -t wanted <<< "$missing"
    say "packages to install: ${wanted[*]} (torch stays $torch_version)"
    echo "torch==$torch_version" > "$results/torch-constraint.txt"
    run_part install 180 30 "$results/pip.log" "$PYTHON" -m pip install -q --retries 1 --timeout 20 \
        -c "$results/torch-constraint.txt" "${wanted[@]}"
else
    say "packages: everything requirements-dev.txt and accelerate need is installed"
    printf 'install\tok (nothing missing)\t0\n' >> "$parts"
fi

# 3. The GPU tests.
run_part tests 300 60 "$results/pytest.log" "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -rfEs \
    -p no:cacheprovider --junitxml "$results/pytest.xml"

# 4. The benchmark on the card.
native_bf16=$("$PYTHON" -c "import torch; print(int(torch.cuda.get_device_capability(0)[0] >= 8))" 2>/dev/null || echo 0)
if [[ -f $data_dir/train.csv && -f $data_dir/val.csv && -f $data_dir/test.csv ]]; then
    # --json-out appends: start from empty files. The JSON lines also show in the logs.
    rm -f "$results/compare_hf.jsonl" "$results/compare_hf_fp16.jsonl"
    common=(--data-dir "$data_dir" --rows "$rows" --epochs 1 --wait-idle 0 --peak-repeats 5)
    run_part benchmark 300 90 "$results/compare_hf.log" "$PYTHON" bench/compare_hf.py "${common[@]}" \
        --json-out "$results/compare_hf.jsonl"
    if ((native_bf16)); then  # our auto is bf16 there: fp16 too, for the comparison
        run_part benchmark_fp16 150 45 "$results/compare_hf_fp16.log" "$PYTHON" bench/compare_hf.py \
            "${common[@]}" --systems ours --ours-precision fp16 --json-out "$results/compare_hf_fp16.jsonl"
    fi
else
    say "benchmark: skipped, no CLINC150 at $data_dir (pass --data-dir or set CLINC150_DIR)"
    printf 'benchmark\tskipped: no CLINC150 at %s\t0\n' "$data_dir" >> "$parts"
fi

# 5. One summary.
GPU_CHECK_RESULTS=$results GPU_CHECK_SECONDS=$((SECONDS - started)) timeout 30 "$PYTHON" - <<'EOF'
import json, os
import xml.etree.ElementTree as ET
from pathlib import Path

results = Path(os.environ["GPU_CHECK_RESULTS"])
out = ["", "=" * 30 + " gpu_check summary " + "=" * 30]


def json_lines(path):
    lines = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


def number(value, digits=0, suffix=""):
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


env = next(iter(json_lines(results / "environment.txt")), None)
peak = next((line["peak"] for line in json_lines(results / "compare_hf.jsonl") if "peak" in line), {})
if env:
    for card in env["cards"]:
        out.append(f"GPU {card['index']}: {card['name']} (compute capability {card['capability']}, "
                   f"{card['memory_gib']} GiB, native bf16 {'yes' if card['native_bf16'] else 'no'})")
    out.append(f"torch {env['torch']}, CUDA {env['cuda']}, NCCL {env['nccl']}, commit {env['commit']}")

xml = results / "pytest.xml"
if xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    out.append(f"tests (pytest -m gpu): {total - failed - skipped} passed, {failed} failed, {skipped} skipped")
    for case in suite.iter("testcase"):
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                message = (element.get("message") or "").splitlines()[0][:150] if element.get("message") else ""
                out.append(f"  {kind:8} {case.get('name')}: {message}")
else:
    out.append("tests (pytest -m gpu): no report (see pytest.log)")

runs = {line["system"]: line for line in json_lines(results / "compare_hf.jsonl") if "system" in line}
fp16 = {line["system"]: line for line in json_lines(results / "compare_hf_fp16.jsonl") if "system" in line}
rows = [(name, runs[name]) for name in ("ours", "hf_shipped", "hf_tuned") if name in runs]
if "ours" in fp16:
    rows.append(("ours fp16", fp16["ours"]))
if rows:
    first = rows[0][1]
    out.append(f"benchmark (CLINC150, {first['train_rows']} training rows x {first['epochs']} epoch(s), "
               f"{first.get('gpu_name', first.get('device'))}; train/s and eval/s are samples per second):")
    out.append(f"  {'system':<11} {'precision':<9} {'train/s':>9} {'eval/s':>9} {'GPU MiB':>8} {'RSS MiB':>8} "
               f"{'MFU':>7} {'test acc':>8}")
    for name, line in rows:
        out.append(f"  {name:<11} {line['precision']:<9} {number(line['train_samples_per_s'], 1):>9} "
                   f"{number(line['eval_samples_per_s'], 1):>9} {number(line.get('peak_gpu_mib')):>8} "
                   f"{number(line.get('peak_rss_mib')):>8} "
                   f"{number(None if line.get('mfu') is None else 100 * line['mfu'], 1, '%'):>7} "
                   f"{number(line['test_accuracy'], 4):>8}")
    peaks = [f"{name} {peak[f'peak_{name}_flops'] / 1e12:.1f}" for name in ("fp32", "fp16", "bf16")
             if peak.get(f"peak_{name}_flops")]
    if peaks:
        out.append(f"  matmul peak TFLOP/s (MFU's denominator): {', '.join(peaks)}")
    for peer, ratio in runs.get("ratios", {}).items():
        if not peer.startswith("ours_over_"):
            continue
        out.append(f"  ours / {peer[len('ours_over_'):]}: train samples/s x{number(ratio.get('train_samples_per_s'), 2)}, "
                   f"eval samples/s x{number(ratio.get('eval_samples_per_s'), 2)}, peak GPU memory "
                   f"x{number(ratio.get('peak_gpu_memory'), 2)}, MFU x{number(ratio.get('mfu'), 2)}, "
                   f"accuracy {number(ratio.get('accuracy_diff_points'), 2)} points")
    if "ours" in fp16 and "ours" in runs:
        a, b = fp16["ours"], runs["ours"]
        out.append(f"  ours fp16 / ours {b['precision']}: train samples/s x{number(a['train_samples_per_s'] / b['train_samples_per_s'], 2)}, "
                   f"peak GPU memory x{number(a['peak_gpu_mib'] / b['peak_gpu_mib'] if a.get('peak_gpu_mib') and b.get('peak_gpu_mib') else None, 2)}")
else:
    out.append("benchmark: no results (see parts below and compare_hf.log)")

parts = [line.split("\t") for line in (results / "parts.tsv").read_text().splitlines() if line.strip()]
out.append("parts: " + " | ".join(f"{name} {status} ({seconds}s)" for name, status, seconds in parts))
out.append(f"total {os.environ['GPU_CHECK_SECONDS']}s; results in {results}")
out.append("=" * 79)
print("\n".join(out))
EOF

# Exit 1 when a part failed or timed out, or a test failed.
if grep -qE $'\t(failed|timed out)' "$parts"; then
    exit 1
fi
exit 0
