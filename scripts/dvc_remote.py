"""Point the DVC repository at an S3 remote (dvc-s3): the URL in .dvc/config (shared, committed), the endpoint,
region and credentials in .dvc/config.local (this machine only, git-ignored by DVC).

    python scripts/dvc_remote.py s3://my-bucket/llava-dvc --endpoint http://127.0.0.1:9000 --region us-east-1

Credentials are read from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when set (never from the command line,
so they do not show in the process list); without them DVC uses boto3's own chain (~/.aws, instance role).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def configure(
    root: Path,
    url: str,
    name: str = "storage",
    endpoint: str | None = None,
    region: str | None = None,
    default: bool = True,
) -> Path:
    """Write the remote into the repository's configs; returns the path of config.local."""
    from dvc.repo import Repo

    if not url.startswith("s3://"):
        raise SystemExit(f"{url!r}: an S3 remote URL looks like s3://bucket/prefix")
    repo = Repo(str(root))
    with repo.config.edit("repo") as conf:
        conf["remote"][name] = {"url": url}
        if default:
            conf["core"]["remote"] = name
    # the URL here too: DVC merges config.local into every revision it reads (`dvc metrics diff`, `dvc exp show`),
    # and a remote section without a URL makes the revisions from before the remote was committed unreadable
    local = {"url": url}
    if endpoint:
        local["endpointurl"] = endpoint
    if region:
        local["region"] = region
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        local.update(access_key_id=key, secret_access_key=secret)
    with repo.config.edit("local") as conf:
        conf["remote"][name] = local
    return Path(repo.dvc_dir) / "config.local"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="s3://bucket/prefix")
    ap.add_argument("--name", default="storage", help="remote name (default: storage)")
    ap.add_argument("--endpoint", default=None, help="S3 endpoint URL (MinIO, moto...); default: AWS")
    ap.add_argument("--region", default=None)
    ap.add_argument("--root", type=Path, default=Path("."), help="the DVC repository (default: .)")
    ap.add_argument("--no-default", action="store_true", help="do not make it the default remote")
    args = ap.parse_args(argv)
    local = configure(args.root, args.url, args.name, args.endpoint, args.region, not args.no_default)
    print(f"remote {args.name!r} -> {args.url}; endpoint, region and credentials in {local}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
