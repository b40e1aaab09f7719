#!/usr/bin/env bash
# Provide a Python virtual environment with torch (CPU-usable), schemathesis and NCCL's library for
# trainctl's tests and examples.
#
# Usage:  PY=$(scripts/python-env.sh)
#
# - Creates the venv at ${TRAINCTL_VENV:-<repo>/.venv} with `python3 -m venv` (idempotent).
# - Installs torch (and numpy) from PyPI unless `<venv>/bin/python -c 'import torch'` already works.
# - Installs schemathesis (the OpenAPI fuzzer of tests/openapi_fuzz.rs, run as `python -m
#   schemathesis.cli`) from PyPI unless the pinned version is already there.
# - Installs NVIDIA's NCCL wheel (nvidia-nccl-cu13, about 216 MB; its lib/libnccl.so.2 is what
#   trainctl-ffi's tests load) unless the venv has nvidia-nccl-cu13 or -cu12 already (torch's CUDA
#   wheels bring it; the CPU-only wheel does not).
# - Prints the venv's python path as the last line of stdout; all progress goes to stderr.
# - When everything is present it installs nothing: one interpreter start (importing torch, seconds).
#
# Environment:
#   TRAINCTL_VENV   venv directory (default: <repo>/.venv)
#   PYTHON3         interpreter used to create the venv (default: python3)
#   TRAINCTL_TORCH_SPEC  pip requirement for torch (default: torch)
#   TRAINCTL_SCHEMATHESIS_SPEC  pip requirement for schemathesis (default: schemathesis==4.32.5;
#                   with `schemathesis==X` that exact version is required, else any installed one does)
#   TRAINCTL_PYTHON an existing interpreter that already imports torch: it is checked and printed,
#                   and no venv is made and nothing installed (without schemathesis there, a warning:
#                   the OpenAPI fuzz test fails until it is installed)
#   TRAINCTL_NCCL_SPEC  pip requirement for NCCL's wheel (default: nvidia-nccl-cu13)
#   TORCH_INDEX_URL pip index torch is installed from, e.g. https://download.pytorch.org/whl/cpu
#                   for the CPU-only wheel (about 200 MB instead of torch's CUDA wheels, about 5 GB
#                   with the venv); numpy still comes from PyPI
set -euo pipefail

log() { printf 'python-env: %s\n' "$*" >&2; }
die() { printf 'python-env: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)
venv=${TRAINCTL_VENV:-$repo_root/.venv}
case $venv in /*) ;; *) venv=$PWD/$venv ;; esac   # callers get an absolute python path
python3_bin=${PYTHON3:-python3}
torch_spec=${TRAINCTL_TORCH_SPEC:-torch}
schemathesis_spec=${TRAINCTL_SCHEMATHESIS_SPEC:-schemathesis==4.32.5}
nccl_spec=${TRAINCTL_NCCL_SPEC:-nvidia-nccl-cu13}
case $schemathesis_spec in
    schemathesis==*) schemathesis_wanted=${schemathesis_spec#schemathesis==} ;;
    *) schemathesis_wanted= ;;
esac
py=$venv/bin/python

# What $py has, in one interpreter start (importing torch takes seconds): torch's version and
# schemathesis' and NCCL's wheel's installed versions (read from their metadata, without importing
# them), each empty if absent.
torch_version=
schemathesis_version=
nccl_version=
probe() {
    torch_version=
    schemathesis_version=
    nccl_version=
    [ -x "$py" ] || return 0
    local out
    out=$("$py" - 2>/dev/null <<'PY'
import importlib.metadata
try:
    import torch
    print(torch.__version__)
except Exception:
    print("")
try:
    print(importlib.metadata.version("schemathesis"))
except Exception:
    print("")
for name in ("nvidia-nccl-cu13", "nvidia-nccl-cu12"):
    try:
        print(name + "==" + importlib.metadata.version(name))
        break
    except Exception:
        pass
else:
    print("")
PY
) || return 0
    torch_version=$(printf '%s\n' "$out" | sed -n 1p)
    schemathesis_version=$(printf '%s\n' "$out" | sed -n 2p)
    nccl_version=$(printf '%s\n' "$out" | sed -n 3p)
}
has_torch() { [ -n "$torch_version" ]; }
has_schemathesis() {
    [ -n "$schemathesis_version" ] \
        && { [ -z "$schemathesis_wanted" ] || [ "$schemathesis_version" = "$schemathesis_wanted" ]; }
}
has_nccl() { [ -n "$nccl_version" ]; }
ready() { has_torch && has_schemathesis && has_nccl; }

if [ -n "${TRAINCTL_PYTHON:-}" ]; then
    py=$(command -v "$TRAINCTL_PYTHON" || true)
    [ -n "$py" ] || die "TRAINCTL_PYTHON=$TRAINCTL_PYTHON: no such interpreter"
    case $py in /*) ;; *) py=$PWD/$py ;; esac
    probe
    has_torch || die "TRAINCTL_PYTHON=$TRAINCTL_PYTHON cannot 'import torch'; install torch into it, or unset TRAINCTL_PYTHON to make a venv"
    has_schemathesis || log "warning: TRAINCTL_PYTHON=$py lacks $schemathesis_spec" \
        "(has: ${schemathesis_version:-none}); the OpenAPI fuzz test fails until you run:" \
        "$py -m pip install '$schemathesis_spec'"
    has_nccl || log "warning: TRAINCTL_PYTHON=$py lacks NCCL's wheel; trainctl-ffi's NCCL tests fail" \
        "until you run: $py -m pip install '$nccl_spec'"
    log "using TRAINCTL_PYTHON=$py (torch $torch_version, schemathesis ${schemathesis_version:-none}); no venv made"
    printf '%s\n' "$py"
    exit 0
fi

probe
if ready; then
    log "torch $torch_version, schemathesis $schemathesis_version and $nccl_version already in $venv"
    printf '%s\n' "$py"
    exit 0
fi

# Serialise concurrent callers (e.g. tests started in parallel) so only one creates/installs; the others
# wait and then take the fast path. The lock lives inside the venv directory (ignored by git with it).
mkdir -p "$venv"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$venv/.python-env.lock"
    if ! flock -n 9; then
        log "another python-env.sh is preparing $venv; waiting for it"
        flock 9
    fi
    probe
    if ready; then
        log "torch $torch_version, schemathesis $schemathesis_version and $nccl_version in $venv (prepared by a concurrent caller)"
        printf '%s\n' "$py"
        exit 0
    fi
fi

command -v "$python3_bin" >/dev/null 2>&1 \
    || die "'$python3_bin' not found on PATH; install Python 3 (Debian/Ubuntu: apt-get install -y python3 python3-venv)"

make_venv() {
    # --clear is not used: an existing but broken venv is repaired in place by venv itself.
    "$python3_bin" -m venv "$venv" >&2
}

if [ ! -x "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
    log "creating virtual environment at $venv"
    if ! make_venv; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            log "'$python3_bin -m venv' failed; trying apt-get install -y python3-venv (running as root)"
            pyver=$("$python3_bin" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
            apt-get update >&2 || true
            # Debian splits ensurepip into python3-venv and, on newer releases, python3.X-venv.
            DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >&2 \
                || die "apt-get install -y python3-venv failed"
            if [ -n "$pyver" ]; then
                DEBIAN_FRONTEND=noninteractive apt-get install -y "python$pyver-venv" >&2 || true
            fi
            # Re-running venv over the half-made one (no pip) completes it in place.
            make_venv || die "'$python3_bin -m venv $venv' still fails after installing python3-venv"
        else
            die "'$python3_bin -m venv $venv' failed; the venv/ensurepip module is missing.
  On Debian/Ubuntu run (as root): apt-get install -y python3-venv"
        fi
    fi
fi

[ -x "$py" ] || die "venv at $venv has no bin/python after creation"
"$py" -m pip --version >/dev/null 2>&1 || die "venv at $venv has no working pip (try: rm -rf $venv and re-run)"

if has_torch; then
    log "torch $torch_version already importable in $venv"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    log "installing $torch_spec from $TORCH_INDEX_URL and numpy from PyPI into $venv"
    "$py" -m pip install --disable-pip-version-check --index-url "$TORCH_INDEX_URL" "$torch_spec" >&2 \
        || die "pip install --index-url $TORCH_INDEX_URL $torch_spec failed (is the index reachable?)"
    "$py" -m pip install --disable-pip-version-check numpy >&2 \
        || die "pip install numpy failed (is PyPI reachable?)"
else
    log "installing $torch_spec and numpy from PyPI into $venv (torch with its CUDA wheels: about 5 GB" \
        "with the venv, cached by pip; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU-only wheel)"
    "$py" -m pip install --disable-pip-version-check "$torch_spec" numpy >&2 \
        || die "pip install $torch_spec numpy failed (is PyPI reachable?)"
fi

if ! has_schemathesis; then
    log "installing $schemathesis_spec from PyPI into $venv (has: ${schemathesis_version:-none})"
    "$py" -m pip install --disable-pip-version-check "$schemathesis_spec" >&2 \
        || die "pip install $schemathesis_spec failed (is PyPI reachable?)"
fi

if ! has_nccl; then
    log "installing $nccl_spec from PyPI into $venv (about 216 MB; NCCL's libnccl.so.2 for trainctl-ffi's tests)"
    "$py" -m pip install --disable-pip-version-check "$nccl_spec" >&2 \
        || die "pip install $nccl_spec failed (is PyPI reachable?)"
fi

probe
has_torch || die "torch installed but 'import torch' still fails in $venv"
has_nccl || die "$nccl_spec installed but $venv has neither nvidia-nccl-cu13 nor nvidia-nccl-cu12"
has_schemathesis || die "$schemathesis_spec installed but $venv has schemathesis ${schemathesis_version:-none}"
log "torch $torch_version, schemathesis $schemathesis_version and $nccl_version ready in $venv"
printf '%s\n' "$py"
