#!/usr/bin/env bash
# Run the CUDA tests on a lent GPU machine that has its own Python and CUDA torch but no network.
#
#   tools/gpu_check.sh prepare PYVER   # here, online: wheels of our pure deps for that Python -> .device/
#   tools/gpu_check.sh run             # there, offline: install them, run the tests marked `cuda`
#   tools/gpu_check.sh lane            # there: the stream suite at 1 GiB on the GPU machine's cores,
#                                      # the seal pool off and on, and CUDA-to-CUDA rows (issue #18)
#
# .device/ is git-ignored; pass it to the device tool as a carried path. py-libp2p 0.8.1 imports
# fastecdsa at import time and fastecdsa has no wheel for Python 3.12, so `prepare` writes a stand-in
# module: no p2pcompute path uses ECDSA keys (identities are Ed25519). Test-machine use only.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    pyver=${2:-3.12}
    mkdir -p .device/wheels .device/stub/fastecdsa/encoding
    pip=${PIP:-.venv/bin/pip}
    $pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-(cu|nccl|nvtx|cusparse|nvjit)|fastecdsa|playwright|greenlet|pyee|mypy|ruff|numpy|matplotlib|pillow|fonttools|kiwisolver|contourpy|sympy|mpmath|networkx|jinja2|markupsafe|filelock|fsspec|py-spy)[=-]' >.device/requirements.txt
    while read -r req; do
        $pip download -q -d .device/wheels --no-deps --only-binary=:all: --python-version "$pyver" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            --platform any "$req" >/dev/null 2>&1 || $pip wheel -q --no-deps -w .device/wheels "$req"
    done <.device/requirements.txt
    printf '"""Stand-in for fastecdsa on the GPU test machine (see tools/gpu_check.sh)."""\n' >.device/stub/fastecdsa/__init__.py
    cp .device/stub/fastecdsa/__init__.py .device/stub/fastecdsa/encoding/__init__.py
    for m in curve keys point encoding/sec1 encoding/util; do
        printf '"""Stand-in (see tools/gpu_check.sh)."""\n\n\ndef __getattr__(name):\n    return type(name, (), {})\n' >.device/stub/fastecdsa/$m.py
    done
    printf '\n\ndef int_bytelen(n):\n    return (n.bit_length() + 7) // 8\n' >>.device/stub/fastecdsa/encoding/util.py
    du -sh .device
    ;;
run | lane)
    python -V
    python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
    python -m pip install -q --no-index --no-deps .device/wheels/*.whl
    export PYTHONPATH=$PWD/.device/stub:$PWD
    if [ "$1" = lane ]; then
        out=${OUT:-bench-results}
        nproc
        # one process pair at a time; each row is a fresh pair of processes
        timeout "${T:-400}" python -m benchmarks.stream --sizes 1024 --reps 2 --codecs none,bf16 \
            --seal-threads 1 --out "$out/stream-pool1.json"
        timeout "${T:-400}" python -m benchmarks.stream --sizes 1024 --reps 2 --codecs none,bf16 \
            --cuda --out "$out/stream-pool.json"
        exit 0
    fi
    # shellcheck disable=SC2086
    timeout "${T:-400}" python -m pytest -q -p no:cacheprovider -m cuda -W ignore::DeprecationWarning \
        ${TESTS:-tests}
    ;;
*)
    echo "usage: tools/gpu_check.sh prepare [PYVER] | run | lane" >&2
    exit 2
    ;;
esac
