# Rendered by reprobox 0.1.0 from spec "cuda-12-4" (a09efb54e43c2e76e8ee7446cf85c9c0d4b3456bc4b03203f43c3a3d2bf42ed9).
# Do not edit: change the spec and render again. Classic-builder syntax (no RUN --mount, no heredocs).

# Stage 1: torch and its dependency closure, in a layer of its own, so that changing a small pin
# elsewhere never reinstalls torch. Wheels come only from the verified cache; no index is reached.
FROM sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb AS torch
COPY build/reprobox_install.py /reprobox-build/reprobox_install.py
COPY build/pypa/ /reprobox-build/pypa/
COPY wheels/installer/ /reprobox-build/installer/
COPY requirements/torch.txt /reprobox-build/torch.txt
COPY wheels/torch/ /reprobox-build/wheels/
RUN PYTHONDONTWRITEBYTECODE=1 python3 /reprobox-build/reprobox_install.py --venv /opt/venv --installer /reprobox-build/installer/pip-26.3-py3-none-any.whl --pypa /reprobox-build/pypa --wheels /reprobox-build/wheels --requirements /reprobox-build/torch.txt --skeleton /reprobox-build/venv-skeleton.txt

# Stage 2: everything else; only the files it adds travel to the final image.
FROM torch AS rest
COPY requirements/rest.txt /reprobox-build/rest.txt
COPY wheels/rest/ /reprobox-build/wheels-rest/
RUN PYTHONDONTWRITEBYTECODE=1 python3 /reprobox-build/reprobox_install.py --venv /opt/venv --installer /reprobox-build/installer/pip-26.3-py3-none-any.whl --pypa /reprobox-build/pypa --wheels /reprobox-build/wheels-rest --wheels /reprobox-build/installer --requirements /reprobox-build/rest.txt --skeleton /reprobox-build/venv-skeleton.txt --delta /reprobox-delta

# Final stage: the base, the two package layers, the seed-on-import hook and the self-check.
# Build-only files (wheels, requirement subsets, the installer script) never reach it.
FROM sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb
COPY --from=torch /opt/venv /opt/venv
COPY --from=rest /reprobox-delta/ /
COPY image/ /opt/reprobox/
RUN python3 /opt/reprobox/reprobox_hook.py install
ENV VIRTUAL_ENV="/opt/venv" \
    PATH="/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    PYTHONHASHSEED="1234" \
    OMP_NUM_THREADS="4" \
    MKL_NUM_THREADS="4" \
    OMP_DYNAMIC="FALSE" \
    MKL_DYNAMIC="FALSE" \
    GOMP_CPU_AFFINITY="0-3" \
    CUBLAS_WORKSPACE_CONFIG=":4096:8" \
    REPROBOX_SEED="1234" \
    REPROBOX_DETERMINISTIC="1" \
    REPROBOX_WARN_ONLY="0" \
    REPROBOX_FILL_UNINITIALIZED_MEMORY="1" \
    REPROBOX_CPU="portable" \
    ATEN_CPU_CAPABILITY="avx2" \
    ONEDNN_MAX_CPU_ISA="AVX2" \
    MKL_CBWR="COMPATIBLE" \
    OPENBLAS_CORETYPE="Haswell" \
    NVIDIA_VISIBLE_DEVICES="all" \
    NVIDIA_DRIVER_CAPABILITIES="compute,utility" \
    NVIDIA_REQUIRE_CUDA="cuda>=12.4 driver>=525.60.13" \
    HF_HUB_OFFLINE="1"

# Labels last: provenance never invalidates a cached layer.
LABEL org.opencontainers.image.created="2022-10-22T00:00:00Z" \
      org.opencontainers.image.description="reprobox image: torch 2.5.1 (12.4)" \
      org.opencontainers.image.title="cuda-12-4" \
      org.opencontainers.image.version="e7daded2e675" \
      reprobox.base="sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb" \
      reprobox.cuda="12.4" \
      reprobox.lock-sha256="d5794392f9e5d80cde4d36fb9c851e091fb3149181bd9050a480a7a27cd79d04" \
      reprobox.seed="1234" \
      reprobox.spec-sha256="a09efb54e43c2e76e8ee7446cf85c9c0d4b3456bc4b03203f43c3a3d2bf42ed9" \
      reprobox.torch="2.5.1" \
      reprobox.version="0.1.0"
