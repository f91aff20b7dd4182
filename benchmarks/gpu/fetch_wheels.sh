#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels a bare GPU machine lacks for benchmarks/gpu/run.sh: this project's
# requirements at the versions of this machine's .venv, for CPython 3.12 on manylinux x86_64, less the packages that
# machine's image already holds (DEVICE_HAS, from /work/.library/device/KINDS.md) and torch. Run it where pip reaches
# an index; the folder then travels with the working tree (the device tool's carry: .whl).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
DEVICE_HAS="torch triton numpy pillow safetensors transformers tokenizers accelerate peft huggingface-hub hf-xet
filelock fsspec packaging pyyaml regex requests urllib3 idna certifi charset-normalizer tqdm typing-extensions
jinja2 markupsafe sympy mpmath networkx opencv-python-headless httpx httpcore h11 anyio sniffio prometheus-client
click psutil uvloop wrapt six python-dateutil attrs protobuf rich pygments markdown-it-py mdurl shellingham typer
annotated-doc zipp pyre-extensions typing-inspect mypy-extensions setuptools"

# Optional backends the benchmark does not use: S3 storage (boto3, imported only when SD_STORAGE=s3) and PostgreSQL.
OPTIONAL="boto3 botocore s3transfer jmespath psycopg psycopg-binary"

pins=$(mktemp)
runtime=$(mktemp)
trap 'rm -f "$pins" "$runtime"' EXIT
.venv/bin/python -m pip freeze --exclude-editable > "$pins"
# requirements.txt and what they pull in, pinned as tested here, without descending into what the machine has.
.venv/bin/python - "$pins" "$DEVICE_HAS $OPTIONAL" > "$runtime" <<'PY'
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


pins = {norm(line.split("==")[0]): line.strip() for line in open(sys.argv[1]) if "==" in line}
skipped = {norm(name) for name in sys.argv[2].split()}
roots = [re.split(r"[<>=\[; ]", line.strip())[0] for line in open("requirements.txt") if line.strip() and not line.startswith("#")]
roots += ["httptools", "websockets", "watchfiles", "python-dotenv"]  # uvicorn[standard]'s extras
seen: set[str] = set()
stack = [norm(root) for root in roots]
while stack:
    name = stack.pop()
    if name in seen or name in skipped:
        continue
    seen.add(name)
    try:
        requires = distribution(name).requires or []
    except PackageNotFoundError:
        continue
    stack += [norm(re.split(r"[<>=!~\[; (]", requirement)[0]) for requirement in requires if "extra ==" not in requirement]
print("\n".join(pins[name] for name in sorted(seen) if name in pins))
PY
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 --platform any \
    -d .whl -r "$runtime"
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), in .whl/: $(ls .whl | sed 's/-[0-9].*//' | tr '\n' ' ')"
