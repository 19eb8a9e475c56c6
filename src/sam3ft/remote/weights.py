"""Resolve `fetch.weights` (none | hf://owner/repo[/file][@rev] | s3://bucket/key | local path).

Credentials never come from params: the hub token from HF_TOKEN or `huggingface-cli login`, S3 from the
usual AWS variables/profiles (AWS_ENDPOINT_URL for S3-compatible stores). Nothing secret is recorded.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sam3ft.errors import ConfigError, Sam3ftError

HF_DEFAULT_FILE = "sam3.pt"
_HF = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<file>[^@]+))?(?:@(?P<rev>[\w.-]+))?$")


@dataclass(frozen=True)
class WeightsSource:
    """Where base weights come from, parsed from `fetch.weights`."""

    kind: str  # none | hf | s3 | path
    location: str
    filename: str = ""
    revision: str | None = None


def parse_source(value: str) -> WeightsSource:
    """Parse and check `fetch.weights` before anything is downloaded."""
    if value == "none":
        return WeightsSource("none", "")
    if value.startswith("hf://"):
        match = _HF.match(value)
        if not match:
            raise ConfigError(
                f"fetch.weights={value!r} is not a hub address",
                fix="use hf://owner/repo, hf://owner/repo/file.pt or hf://owner/repo@revision",
                key="fetch.weights",
            )
        return WeightsSource("hf", match["repo"], match["file"] or HF_DEFAULT_FILE, match["rev"])
    if value.startswith("s3://"):
        bucket_key = value[len("s3://") :]
        if "/" not in bucket_key or bucket_key.endswith("/"):
            raise ConfigError(
                f"fetch.weights={value!r} names no object",
                fix="use s3://bucket/path/to/sam3.pt",
                key="fetch.weights",
            )
        return WeightsSource("s3", value, bucket_key.rsplit("/", 1)[1])
    if "://" in value:
        raise ConfigError(
            f"fetch.weights={value!r}: unknown scheme",
            fix="use none, hf://..., s3://... or a local path",
            key="fetch.weights",
        )
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"fetch.weights={value!r}: no such file",
            fix="give the path of a checkpoint (.pt or .safetensors), or none",
            key="fetch.weights",
        )
    return WeightsSource("path", str(path), path.name)


def download(source: WeightsSource, dest: Path) -> dict[str, str]:
    """Copy the weights to `dest`; return what identifies them (revision, never credentials)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.kind == "path":
        shutil.copyfile(source.location, dest)
        return {}
    if source.kind == "hf":
        return _from_hub(source, dest)
    if source.kind == "s3":
        return _from_s3(source.location, dest)
    raise ValueError(f"nothing to download for {source}")


def _from_hub(source: WeightsSource, dest: Path) -> dict[str, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    try:  # token: HF_TOKEN or the login cache, picked up by huggingface_hub itself
        cached = Path(hf_hub_download(source.location, source.filename, revision=source.revision))
    except GatedRepoError as exc:
        raise Sam3ftError(
            f"hf://{source.location} is gated and this account has no access",
            fix="accept the licence on the model page, then set HF_TOKEN",
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise Sam3ftError(
            f"hf://{source.location}/{source.filename} is not in the local cache and "
            "the hub cannot be reached",
            fix="go online once, or pass a local path",
        ) from exc
    except HfHubHTTPError as exc:
        raise Sam3ftError(
            f"hf://{source.location}/{source.filename}: {exc}", fix="check the address, HF_TOKEN and network"
        ) from exc
    shutil.copyfile(cached, dest)
    # cache layout: .../snapshots/<commit>/<file>: the commit pins exactly what was fetched
    commit = cached.parent.name if cached.parent.parent.name == "snapshots" else ""
    return {"revision": commit}


def _from_s3(url: str, dest: Path) -> dict[str, str]:
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {})
    try:
        fs.get(url, str(dest))
    except FileNotFoundError as exc:
        raise Sam3ftError(f"{url}: no such object", fix="check the bucket and key") from exc
    except PermissionError as exc:
        raise Sam3ftError(f"{url}: access denied", fix="check the AWS credentials for this bucket") from exc
    except OSError as exc:
        raise Sam3ftError(
            f"{url}: {type(exc).__name__}: {exc}", fix="check the endpoint and network"
        ) from exc
    return {}
