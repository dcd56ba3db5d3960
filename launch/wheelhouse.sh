#!/usr/bin/env bash
# Build a wheelhouse for air-gapped installs of sparsetron's dependencies.
#
# Run on a machine with internet access (any OS with pip >= 23); copy the output folder to
# the cluster and install there with the command this script prints:
#     pip install --no-index --find-links WHEELHOUSE -r WHEELHOUSE/requirements.txt
#
# How: deepspeed and antlr4-python3-runtime ship only as source, so they are built here as
# pure-Python wheels (`pip wheel --no-deps --no-build-isolation`, deepspeed with
# DS_BUILD_OPS=0: its CUDA ops are JIT-compiled at run time on the target). Then pip
# resolves the whole set for the *target* interpreter/platform (--python-version/--platform,
# binary wheels only) and downloads each wheel. torch (+ nvidia-*, triton) is skipped unless
# --with-torch, since it is several GB and clusters usually provide it; the target must
# then already have a matching torch. To keep the resolver from fetching torch at all
# (mirrors without PEP 658 metadata make it download the wheels), it resolves against
# empty stand-in wheels "torch==X+stub" / "triton==Y+stub" that never leave this script.
#
# Usage: launch/wheelhouse.sh [options] [requirement ...]
#   --out DIR          output folder                                  [./wheelhouse]
#   --python X.Y       target Python version                          [3.12]
#   --platform TAG     target platform tag, repeatable  [manylinux_2_28_x86_64 + older]
#   -r FILE            requirements file, repeatable (default: built-in list below)
#   --with-torch       also fetch torch and its CUDA wheels (multi-GB)
#   --torch-index URL  extra index for torch, e.g. https://download.pytorch.org/whl/cu128
#   --torch-version V  torch on the target (or to fetch with --with-torch)     [2.11.0]
#   --triton-version V triton on the target                                     [3.6.0]
#   --deepspeed SPEC   deepspeed to build locally       [deepspeed==0.19.8]; "none" skips
#   --antlr SPEC       antlr runtime to build locally   [antlr4-python3-runtime==4.9.3]
#   --pip CMD          pip used to build/download       [python3 -m pip]
set -euo pipefail

OUT="wheelhouse"
PYVER="3.12"
PLATFORMS=()
REQ_FILES=()
WITH_TORCH=0
TORCH_INDEX=""
TORCH_VERSION="2.11.0"
TRITON_VERSION="3.6.0"
DEEPSPEED_SPEC="deepspeed==0.19.8"
ANTLR_SPEC="antlr4-python3-runtime==4.9.3"   # hydra-core 1.3 needs antlr 4.9.x
PIP="python3 -m pip"
REQS=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "wheelhouse.sh: $*" >&2; exit 2; }

while (( $# )); do
    case "$1" in
        --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
        --python) PYVER="${2:?--python needs X.Y}"; shift 2 ;;
        --platform) PLATFORMS+=("${2:?--platform needs a tag}"); shift 2 ;;
        -r) REQ_FILES+=("${2:?-r needs a file}"); shift 2 ;;
        --with-torch) WITH_TORCH=1; shift ;;
        --torch-index) TORCH_INDEX="${2:?--torch-index needs a URL}"; shift 2 ;;
        --torch-version) TORCH_VERSION="${2:?--torch-version needs a version}"; shift 2 ;;
        --triton-version) TRITON_VERSION="${2:?--triton-version needs a version}"; shift 2 ;;
        --deepspeed) DEEPSPEED_SPEC="${2:?--deepspeed needs a spec or none}"; shift 2 ;;
        --antlr) ANTLR_SPEC="${2:?--antlr needs a spec or none}"; shift 2 ;;
        --pip) PIP="${2:?--pip needs a command}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; REQS+=("$@"); break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) REQS+=("$1"); shift ;;
    esac
done

[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || die "--python must look like 3.12, got '$PYVER'"
(( ${#PLATFORMS[@]} )) || PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
for f in "${REQ_FILES[@]+"${REQ_FILES[@]}"}"; do [[ -f "$f" ]] || die "-r $f: no such file"; done
read -r -a pip <<< "$PIP"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
if (( ${#REQS[@]} == 0 && ${#REQ_FILES[@]} == 0 )); then
    if [[ -f "$ROOT/pyproject.toml" ]]; then
        REQS=(sparsetron)   # the project wheel built below pulls in its own dependencies
    else
        REQS=(numpy "hydra-core==1.3.2" "omegaconf==2.3.0" "megatron-core==0.16.1" transformers)
    fi
    [[ "$DEEPSPEED_SPEC" == none ]] || REQS+=("$DEEPSPEED_SPEC")
fi
(( WITH_TORCH )) && REQS+=("torch==$TORCH_VERSION")

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
abi="cp${PYVER/./}"
# abi3 / none: many binary wheels (psutil, cryptography, ...) use the stable ABI.
target_flags=(--only-binary=:all: --python-version "$PYVER" --implementation cp
              --abi "$abi" --abi abi3 --abi none)
for p in "${PLATFORMS[@]}"; do target_flags+=(--platform "$p"); done
index_flags=(--find-links "$OUT")
[[ -n "$TORCH_INDEX" ]] && index_flags+=(--extra-index-url "$TORCH_INDEX")

# 1. Source-only packages -> pure-Python wheels built here.
local_specs=()
[[ "$DEEPSPEED_SPEC" == none ]] || local_specs+=("$DEEPSPEED_SPEC")
[[ "$ANTLR_SPEC" == none ]] || local_specs+=("$ANTLR_SPEC")
if [[ -f "$ROOT/pyproject.toml" ]]; then
    # Build the project from a scratch copy: setuptools writes build/ and *.egg-info into
    # the source tree otherwise.
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
        --exclude=./runs --exclude=./outputs --exclude=./wheelhouse --exclude=__pycache__ -cf - . \
        | tar -C "$scratch" -xf -
    local_specs+=("$scratch")
fi
for spec in "${local_specs[@]+"${local_specs[@]}"}"; do
    echo "[wheelhouse] building $spec as a pure-Python wheel" >&2
    DS_BUILD_OPS=0 "${pip[@]}" wheel --no-deps --no-build-isolation -w "$OUT" "$spec" >&2
done
for whl in "$OUT"/*.whl; do
    [[ -e "$whl" ]] || continue
    case "$(basename "$whl")" in
        deepspeed-*|antlr4_python3_runtime-*|sparsetron-*)
            [[ "$whl" == *-py3-none-any.whl ]] || die "$whl is not pure Python; it would not install on the target" ;;
    esac
done

# 2. Resolve the full set for the target (metadata only), then download each wheel.
report="$OUT/.resolve-report.json"
req_args=()
for f in "${REQ_FILES[@]+"${REQ_FILES[@]}"}"; do req_args+=(-r "$f"); done
if (( ! WITH_TORCH )); then
    stubs="$OUT/.stubs"
    mkdir -p "$stubs"
    python3 - "$stubs" "torch" "$TORCH_VERSION+stub" "triton" "$TRITON_VERSION+stub" <<'EOF'
import sys, zipfile
out, pairs = sys.argv[1], sys.argv[2:]
for name, version in zip(pairs[::2], pairs[1::2]):
    info = f"{name}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: sparsetron-wheelhouse\n"
                              "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(f"{out}/{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
EOF
    printf 'torch==%s+stub\ntriton==%s+stub\n' "$TORCH_VERSION" "$TRITON_VERSION" > "$stubs/constraints.txt"
    req_args+=(--find-links "$stubs" -c "$stubs/constraints.txt")
fi
echo "[wheelhouse] resolving for cp$PYVER on ${PLATFORMS[*]}" >&2
"${pip[@]}" install --dry-run --ignore-installed --quiet --report "$report" \
    --target "$OUT/.resolve-target" "${target_flags[@]}" "${index_flags[@]}" \
    "${req_args[@]+"${req_args[@]}"}" "${REQS[@]+"${REQS[@]}"}"
rm -rf "$OUT/.resolve-target" "$OUT/.stubs"

# name==version per line; torch family dropped unless --with-torch; local wheels kept as is.
python3 - "$report" "$WITH_TORCH" > "$OUT/requirements.txt" <<'EOF'
import json, re, sys
report, with_torch = sys.argv[1], sys.argv[2] == "1"
skip = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")
for item in json.load(open(report))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if not with_torch and skip.match(name.lower()):
        continue
    print(f"{name}=={version}")
EOF
echo "[wheelhouse] downloading $(wc -l < "$OUT/requirements.txt") wheels" >&2
"${pip[@]}" download --no-deps --quiet -d "$OUT" "${target_flags[@]}" "${index_flags[@]}" \
    -r "$OUT/requirements.txt"
rm -f "$report"

count=$(find "$OUT" -maxdepth 1 -name '*.whl' | wc -l)
echo "[wheelhouse] $count wheels in $OUT" >&2
(( WITH_TORCH )) || echo "[wheelhouse] torch not included: the target needs a matching torch already installed" >&2
echo "pip install --no-index --find-links \"$OUT\" -r \"$OUT/requirements.txt\""
