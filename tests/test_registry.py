"""The model registry flow of the README on a real S3 endpoint (moto on loopback): `gto register`,
`gto assign --stage prod`, then `dvc artifacts get` from a clone and from the git remote.

A toy stage writes the artifact's path so that no model is trained; the `artifacts:` entry is the
one of this repo's dvc.yaml, so its name and path are what the test exercises.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer

from conftest import REPO, run_ok

BIN = Path(sys.executable).parent
DVC, GTO = [sys.executable, "-m", "dvc"], [str(BIN / "gto")]
BUCKET = "sam3ft-registry-test"
KEYS = {"access_key_id": "registry", "secret_access_key": "registry-secret"}
NAME = "fuse-neutrals-detector"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    ).create_bucket(Bucket=BUCKET)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    aws = tmp_path_factory.mktemp("aws")  # empty AWS config: keys come from DVC's config only
    for name in ("config", "credentials"):
        (aws / name).touch()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_", "AWS_"))}
    return clean | {
        "PATH": f"{BIN}{os.pathsep}{clean['PATH']}",
        "AWS_CONFIG_FILE": str(aws / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        **{
            f"GIT_{who}_{what}": value
            for who in ("AUTHOR", "COMMITTER")
            for what, value in (("NAME", "t"), ("EMAIL", "t@t"))
        },
    }


def use_bucket(repo: Path, env: dict[str, str], endpoint: str) -> None:
    """Keys in the git-ignored .dvc/config.local, as docs/remotes.md says."""
    for option, value in {"endpointurl": endpoint, **KEYS}.items():
        run_ok([*DVC, "remote", "modify", "--local", "storage", option, value], repo, env)


def test_register_assign_and_get_from_clone_and_remote(tmp_path, endpoint, env):
    artifact = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"][NAME]
    path = artifact["path"]
    hub, origin = tmp_path / "hub.git", tmp_path / "origin"
    run_ok(["git", "init", "-q", "--bare", "-b", "main", str(hub)], tmp_path, env)
    origin.mkdir()
    stage = {"cmd": f"mkdir -p {path} && echo v1 > {path}/model.json", "outs": [path]}
    (origin / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"export": stage}, "artifacts": {NAME: artifact}})
    )
    for command in (
        ["git", "init", "-q", "-b", "main"],
        [*DVC, "init", "-q"],
        [*DVC, "remote", "add", "-d", "storage", f"s3://{BUCKET}/sam3ft"],
    ):
        run_ok(command, origin, env)
    use_bucket(origin, env, endpoint)
    run_ok([*DVC, "repro", "-q"], origin, env)
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "model"], [*DVC, "push", "-q"]):
        run_ok(command, origin, env)

    run_ok([*GTO, "register", NAME, "--version", "v0.1.0"], origin, env)
    run_ok([*GTO, "assign", NAME, "--version", "v0.1.0", "--stage", "prod"], origin, env)
    assert run_ok(["git", "tag"], origin, env).stdout.split() == [f"{NAME}#prod#1", f"{NAME}@v0.1.0"]
    run_ok(["git", "push", "-q", str(hub), "main", "--tags"], origin, env)

    clone = tmp_path / "clone"
    run_ok(["git", "clone", "-q", str(hub), str(clone)], tmp_path, env)
    use_bucket(clone, env, endpoint)
    run_ok([*DVC, "artifacts", "get", ".", NAME, "--stage", "prod", "-o", "prod"], clone, env)
    assert (clone / "prod/model.json").read_text() == "v1\n"

    settings = [f"endpointurl={endpoint}", *(f"{k}={v}" for k, v in KEYS.items())]
    got = tmp_path / "from-remote"
    got.mkdir()
    run_ok(
        [
            *DVC,
            "artifacts",
            "get",
            f"file://{hub}",
            NAME,
            "--rev",
            "v0.1.0",
            "-o",
            "model",
            "--remote-config",
            *settings,
        ],
        got,
        env,
    )
    assert (got / "model/model.json").read_text() == "v1\n"
