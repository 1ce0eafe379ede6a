"""Rewrite wheels in place without files the benchmark never loads, so all wheels fit one `run` call.

pip does not check a wheel's RECORD hashes when it installs, so dropping members is safe; the
dropped files are CUDA libraries for other CUDA versions, a web app and service descriptions.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

DROP: dict[str, re.Pattern[str]] = {
    "bitsandbytes-": re.compile(r"bitsandbytes/libbitsandbytes_(cuda(?!130)\d+|rocm\d+)\.so$"),
    "unsloth-": re.compile(r"^studio/"),
    "botocore-": re.compile(r"^botocore/data/(?!s3/|sts/|[^/]+\.json$)"),
    "moto-": re.compile(r"^moto/(ec2|ssm|emr|rds|iam|stepfunctions)/resources/"),
}


def trim(wheel: Path, drop: re.Pattern[str]) -> None:
    kept = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(kept, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not drop.search(item.filename):
                dst.writestr(item, src.read(item))
    before, after = wheel.stat().st_size, kept.stat().st_size
    kept.replace(wheel)
    print(f"{wheel.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")


def main(folder: str) -> None:
    for wheel in sorted(Path(folder).glob("*.whl")):
        for prefix, drop in DROP.items():
            if wheel.name.startswith(prefix):
                trim(wheel, drop)


if __name__ == "__main__":
    main(sys.argv[1])
