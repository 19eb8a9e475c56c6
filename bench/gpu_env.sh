# Sourced by the bench/gpu_*.sh scripts on the GPU machine, from the repository root: installs the
# carried wheels (.whl/, or the folder WHL names) into /tmp/site, puts src/ and them on PYTHONPATH,
# creates $OUT (default /tmp/gpu-out) and appends the GPUs, torch, Python and the date to
# $OUT/device.txt. bench/gpu_sam3_train.md ("How it was run") says how .whl/ is made.
OUT=${OUT:-/tmp/gpu-out}
SITE=/tmp/site
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WHL:-.whl}"/*.whl
# boto3 without botocore (left out of .whl/ to fit a call's carry limit) breaks the import chain
# sam3's loss -> torchmetrics -> the image's transformers -> accelerate -> boto3: drop it then
[ -d "$SITE/botocore" ] || rm -rf "$SITE"/boto3 "$SITE"/boto3-* "$SITE"/s3transfer "$SITE"/s3transfer-*
export OUT SITE PYTHONPATH="$PWD/src:$SITE" PYTHONUNBUFFERED=1
# Python's bytecode cache goes to a writable folder: the lent image kept no .pyc for its torch or
# the wheels installed above, so every process compiled ~1900 source files again (6 s of each
# stage's start-up, bench/LOG.md call 74); now a call's first process pays that, later ones read it.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
{
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], 'pycache', sys.pycache_prefix)"
    date -u +%FT%TZ
} | tee -a "$OUT/device.txt"
