# Sourced at the start of each H200 run (see README.md here): makes `pagetron` importable without pip,
# installs the carried wheels, and puts numpy 1.26 aside for the Triton stub only.
set -e
export PYTHONUNBUFFERED=1 SITE=/tmp/site STUB_SITE=/tmp/stub_site
mkdir -p "$SITE/pagetron" "$STUB_SITE"
for part in backend kernels client; do ln -sfn "$PWD/$part" "$SITE/pagetron/$part"; done
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$@"; }
for wheel in .whl/*.whl; do
  [ -e "$SITE/.installed-$(basename "$wheel")" ] && continue  # a warm machine keeps what it installed
  [ -e "$wheel" ] || continue
  case "$(basename "$wheel")" in
    numpy-1.*) pip_install "$STUB_SITE" "$wheel" ;;   # the stub crashes on BYTES inputs with numpy 2
    nvidia_pytriton-*) pip_install /opt/pt "$wheel" ;;
    *) pip_install "$SITE" "$wheel" ;;
  esac
  touch "$SITE/.installed-$(basename "$wheel")"
done
# trimmed archives (one call can carry them all): the nvidia-pytriton wheel's tritonserver, Python backend
# and 3.12 stub with their bundled libraries; tritonclient's Python package without perf_analyzer
[ -e /opt/pt/pytriton/tritonserver/bin/tritonserver ] || { [ -e .whl_ptt/pytriton-trimmed.tar.xz ] && mkdir -p /opt/pt && tar -C /opt/pt -xJf .whl_ptt/pytriton-trimmed.tar.xz; }
[ -e .whl_ptt/tritonclient-py.tar.xz ] && tar -C "$SITE" -xJf .whl_ptt/tritonclient-py.tar.xz
# The image's scipy and scikit-learn need numpy 2, which the stub cannot have, and transformers imports
# sklearn.metrics (for assisted generation only) whenever sklearn is installed; loading a tokenizer then
# fails inside the stub. The stub gets a stand-in sklearn whose roc_curve says why it is not there.
mkdir -p "$STUB_SITE/sklearn"
echo '"""Stand-in for the stub (see perf_analyzer_configs/h200/env.sh)."""' > "$STUB_SITE/sklearn/__init__.py"
printf 'def roc_curve(*args, **kwargs):\n    raise NotImplementedError("scikit-learn needs numpy 2; not in the Triton stub")\n' \
  > "$STUB_SITE/sklearn/metrics.py"
export PYTHONPATH="$SITE:/opt/pt" PAGETRON_STUB_SITE_PACKAGES="$STUB_SITE"
set +e
