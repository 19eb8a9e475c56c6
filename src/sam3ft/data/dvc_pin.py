"""The bundled sample's DVC pin: never let another dataset be pushed into the git-tracked store.

`data.dvc` pins the sample to `remote: bundled`, a DVC store committed in the repository
(bundled-store/), and marks it `push: false`. `dvc add data` and `dvc repro` re-commit `data.dvc`
with both lines kept, so a user's own dataset in `data/` inherits them: `push: false` makes every
`dvc push` skip it (even `-r bundled`), so it never lands in git; prepare and doctor then warn that
the dataset is in no remote and name the two lines to delete. Without `push: false`, a pinned
in-repo store that lacks the data `data.dvc` names is refused outright: a push would copy it into git.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from sam3ft.errors import DatasetError


def dvc_file_for(data_dir: Path) -> Path:
    """The .dvc file beside `data_dir` that tracks it (data -> data.dvc)."""
    return data_dir.with_name(data_dir.name + ".dvc")


def remote_urls(repo_root: Path) -> dict[str, str]:
    """Remote name -> url from .dvc/config, overridden by .dvc/config.local ({} without DVC)."""
    from configobj import ConfigObj, ConfigObjError  # DVC's config parser, installed with dvc

    urls: dict[str, str] = {}
    for path in (repo_root / ".dvc" / "config", repo_root / ".dvc" / "config.local"):
        if not path.is_file():
            continue
        try:
            sections = ConfigObj(str(path)).items()
        except ConfigObjError as exc:
            raise DatasetError(
                f"{path} is not a valid DVC config", fix=f"fix line {exc.line_number}"
            ) from exc
        for name, section in sections:
            if name.startswith('remote "') and isinstance(section, dict) and "url" in section:
                urls[name[len('remote "') : -1]] = section["url"]
    return urls


def local_store(repo_root: Path, url: str) -> Path | None:
    """The folder of a local-path remote (relative urls are relative to .dvc/), else None."""
    if "://" in url:
        return None
    return (repo_root / ".dvc" / url).resolve()


def store_object(store: Path, md5: str) -> Path:
    """Where a DVC 3 store keeps the object with this md5 (`files/md5/ab/cdef...`)."""
    return store / "files" / "md5" / md5[:2] / md5[2:]


def pinned_outputs(dvc_file: Path) -> list[dict[str, Any]]:
    """The outs of a .dvc file that name a `remote:` ([] if the file is absent)."""
    if not dvc_file.is_file():
        return []
    data = yaml.safe_load(dvc_file.read_text()) or {}
    return [o for o in data.get("outs", []) if isinstance(o, dict) and o.get("remote") and o.get("md5")]


def unpin_command(name: str, dvc_file: Path) -> str:
    """The shell command deleting the pin lines (`remote: <name>`, `push: false`) from a .dvc file."""
    return f"sed -i '/^  remote: {name}$/d; /^  push: false$/d' {dvc_file}"


def check_pinned_remote(data_dir: Path) -> list[str]:
    """Warnings for data pinned to a store inside this repository that lacks it but is never pushed
    (`push: false`); DatasetError when such data would be pushed: into the store, i.e. into git."""
    dvc_file = dvc_file_for(data_dir)
    outs = pinned_outputs(dvc_file)
    if not outs:
        return []
    repo_root, warnings = dvc_file.parent, []
    urls = remote_urls(repo_root)
    for out in outs:
        name, md5 = out["remote"], out["md5"]
        store = local_store(repo_root, urls.get(name, "://"))
        if store is None or store_object(store, md5).is_file():
            continue
        fix = (
            f"for your own dataset, delete the lines 'remote: {name}' and 'push: false' from {dvc_file} "
            f"({unpin_command(name, dvc_file)}); `dvc push` then sends it to the default remote. To go "
            f"back to the bundled sample: git checkout {dvc_file} && dvc checkout {dvc_file}"
        )
        if out.get("push") is False:
            warnings.append(
                f"{dvc_file}: this dataset (md5 {md5}) kept the bundled sample's 'remote: {name}' and "
                f"'push: false': `dvc push` skips it, so no remote holds it; fix: {fix}"
            )
            continue
        raise DatasetError(
            f"{dvc_file}: pins 'remote: {name}' (the store {store} inside this repository, tracked by "
            f"git), but its data (md5 {md5}) is not the data in that store: `dvc push` would copy this "
            "dataset into git",
            fix=fix,
        )
    return warnings


def unpinned_entries(data_dir: Path) -> tuple[str, list[str]] | None:
    """(remote, top-level names in `data_dir` missing from the pinned data) when the .dvc file pins a
    store inside the repository that holds its data; None otherwise or when nothing is extra.

    Such names (a user's new export) are not at risk yet, but `dvc add`/`dvc repro` would commit
    them with the pin kept.
    """
    dvc_file = dvc_file_for(data_dir)
    outs = pinned_outputs(dvc_file)
    if not outs or not data_dir.is_dir():
        return None
    urls = remote_urls(dvc_file.parent)
    for out in outs:
        store = local_store(dvc_file.parent, urls.get(out["remote"], "://"))
        listing = store_object(store, out["md5"]) if store is not None else None
        if listing is None or not listing.is_file() or not out["md5"].endswith(".dir"):
            continue
        pinned = {entry["relpath"].split("/")[0] for entry in json.loads(listing.read_text())}
        extra = sorted(p.name for p in data_dir.iterdir() if p.name not in pinned)
        if extra:
            return out["remote"], extra
    return None
