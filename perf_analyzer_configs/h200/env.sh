# Sourced at the start of each H200 run (see README.md here): makes `pagetron` importable without pip,
# installs the carried wheels, and puts numpy 1.26 aside for the Triton stub only.
set -e
export PYTHONUNBUFFERED=1 SITE=/tmp/site STUB_SITE=/tmp/stub_site
mkdir -p "$SITE/pagetron" "$STUB_SITE"
for part in backend kernels client; do ln -sfn "$PWD/$part" "$SITE/pagetron/$part"; done
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$@"; }
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] || continue
  case "$(basename "$wheel")" in
    numpy-1.*) pip_install "$STUB_SITE" "$wheel" ;;   # the stub crashes on BYTES inputs with numpy 2
    nvidia_pytriton-*) pip_install /opt/pt "$wheel" ;;
    *) pip_install "$SITE" "$wheel" ;;
  esac
done
# trimmed archives (one call can carry them all): the nvidia-pytriton wheel's tritonserver, Python backend
# and 3.12 stub with their bundled libraries; tritonclient's Python package without perf_analyzer
[ -e .whl_ptt/pytriton-trimmed.tar.xz ] && mkdir -p /opt/pt && tar -C /opt/pt -xJf .whl_ptt/pytriton-trimmed.tar.xz
[ -e .whl_ptt/tritonclient-py.tar.xz ] && tar -C "$SITE" -xJf .whl_ptt/tritonclient-py.tar.xz
export PYTHONPATH="$SITE:/opt/pt" PAGETRON_STUB_SITE_PACKAGES="$STUB_SITE"
set +e
