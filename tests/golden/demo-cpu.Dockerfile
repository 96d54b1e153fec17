# Rendered by reprobox 0.1.0 from spec "demo-cpu" (da29ef344034e0bdf1398ec4f107de9a1103f564ca65eea08dfa2abb418b9fa3).
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
    PYTHONHASHSEED="0" \
    OMP_NUM_THREADS="1" \
    MKL_NUM_THREADS="1" \
    OMP_DYNAMIC="FALSE" \
    MKL_DYNAMIC="FALSE" \
    GOMP_CPU_AFFINITY="0" \
    CUBLAS_WORKSPACE_CONFIG=":4096:8" \
    REPROBOX_SEED="0" \
    REPROBOX_DETERMINISTIC="1" \
    REPROBOX_WARN_ONLY="0" \
    REPROBOX_FILL_UNINITIALIZED_MEMORY="1" \
    REPROBOX_CPU="portable" \
    ATEN_CPU_CAPABILITY="avx2" \
    ONEDNN_MAX_CPU_ISA="AVX2" \
    MKL_CBWR="COMPATIBLE" \
    OPENBLAS_CORETYPE="Haswell" \
    NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"

# Labels last: provenance never invalidates a cached layer.
LABEL org.opencontainers.image.created="2021-07-13T00:00:00Z" \
      org.opencontainers.image.description="reprobox image: torch 2.13.0 (cpu)" \
      org.opencontainers.image.title="demo-cpu" \
      org.opencontainers.image.version="71d079e870a0" \
      reprobox.base="sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb" \
      reprobox.cuda="cpu" \
      reprobox.lock-sha256="07879fb268db3df629a61bb4cc9b11cba82a264811028fde5153e0c9d3614bcb" \
      reprobox.seed="0" \
      reprobox.spec-sha256="da29ef344034e0bdf1398ec4f107de9a1103f564ca65eea08dfa2abb418b9fa3" \
      reprobox.torch="2.13.0" \
      reprobox.version="0.1.0"
