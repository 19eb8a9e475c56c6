"""`sam3ft doctor`: check this machine against the configured run before any compute starts.

Each check is a small function returning a `Check`; `run_checks` runs them all and the CLI prints them.
No secret value is ever read into a `Check`: only variable names and where a credential was found.
torch and sam3ft.compat (which imports torch) are imported lazily, so a broken install still gets a report.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import socket
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from sam3ft import params as params_module
from sam3ft.errors import ConfigError
from sam3ft.model.spec import ModelSpec, load_preset
from sam3ft.preflight import (
    GB,
    PRESETS,
    Check,
    check_disk,
    check_vram,
    cuda_memory_gb,
    disk_needed_gb,
    installed_version,
)
from sam3ft.preflight import (
    check_preset as check_preset_params,
)

PACKAGES = ("torch", "torchvision", "sam3", "dvc", "dvclive", "hydra-core")
REQUIRED = ("torch", "sam3")  # nothing trains without these
CONNECT_TIMEOUT_S = 2.0
PLACEHOLDER_BUCKET = "change-me"  # .dvc/config ships s3://CHANGE-ME-bucket/... for the team to replace
S3_KEY_PAIR = ("access_key_id", "secret_access_key")


# -- 1. versions ---------------------------------------------------------------------------------


def pinned_specifiers() -> dict[str, str]:
    """Version ranges sam3ft's install metadata (pyproject.toml) asks for, by distribution name."""
    try:
        requires = metadata.requires("sam3ft") or []
    except metadata.PackageNotFoundError:  # running from src/ without an install
        return {}
    reqs = [Requirement(r) for r in requires]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs if r.marker is None}


def check_package(name: str, version: str | None, pinned: str) -> Check:
    """FAIL if a required package is missing, WARN if another is missing or outside its pin."""
    fix = "pip install -e . (in the project's virtualenv)"
    if version is None:
        return Check("FAIL" if name in REQUIRED else "WARN", name, "not installed", fix)
    if pinned and not SpecifierSet(pinned).contains(version, prereleases=True):
        return Check("WARN", name, f"{version}, but pyproject.toml asks for {pinned}", fix)
    return Check("OK", name, version + (f" (wants {pinned})" if pinned else ""))


def check_python() -> Check:
    """The interpreter against sam3ft's Requires-Python."""
    version = platform.python_version()
    try:
        wanted = metadata.metadata("sam3ft")["Requires-Python"] or ""
    except metadata.PackageNotFoundError:
        wanted = ""
    if wanted and not SpecifierSet(wanted).contains(version):
        return Check(
            "FAIL", "python", f"{version}, but sam3ft needs {wanted}", "use Python 3.11 (see README)"
        )
    return Check("OK", "python", version)


def version_checks() -> list[Check]:
    """Python and each package the pipeline runs on."""
    pins = pinned_specifiers()
    return [check_python()] + [check_package(n, installed_version(n), pins.get(n, "")) for n in PACKAGES]


# -- 2. params and preset ------------------------------------------------------------------------


def load_params(path: Path) -> tuple[Check, params_module.Params | None]:
    """Every params.yaml section through its validator; the typed sections when they are valid."""
    try:
        p = params_module.load(list(params_module.SECTIONS), path)
    except ConfigError as exc:
        message = params_module.in_file(exc, path)
        detail = f"{message} (model, accelerator, vram, disk, secrets, threads not checked)"
        return Check("FAIL", "params", detail, exc.fix or "see README"), None
    return Check("OK", "params", f"{path}: {len(p.sections)} sections valid"), p


def check_preset(p: params_module.Params) -> Check:
    """The preset file exists, matches trainer.resolution (preflight's rule), and its size is known."""
    name = p.model.preset
    try:
        check_preset_params(p.model, p.trainer)
    except ConfigError as exc:
        return Check("FAIL", "model", exc.message, exc.fix or "")
    spec = load_preset(name)
    if name not in PRESETS:
        fix = "add its parameter count to PRESETS in src/sam3ft/preflight.py"
        return Check("WARN", "model", f"preset {name!r}: size unknown, no VRAM or disk estimate", fix)
    return Check(
        "OK", "model", f"preset {name!r}: {spec.image_size} px, ~{PRESETS[name].params / 1e6:g} M params"
    )


# -- 3. accelerator and VRAM estimate (comparisons: sam3ft.preflight) -----------------------------


def check_accelerator(accelerator: str) -> Check:
    """trainer.num_gpus >= 1 needs a CUDA device torch can see; report it and its free memory."""
    import torch

    if not torch.cuda.is_available():
        if accelerator == "cpu":
            return Check("OK", "accelerator", "cpu (no CUDA device visible)")
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        detail = f"trainer.num_gpus >= 1 but torch {torch.__version__} ({build}) sees no CUDA device"
        fix = "set trainer.num_gpus: 0 (CPU), or run on a machine with an NVIDIA GPU and driver"
        return Check("FAIL", "accelerator", detail, fix)
    free_gb, total_gb = cuda_memory_gb() or (0.0, 0.0)
    device = f"{torch.cuda.get_device_name()}, {free_gb:.1f} of {total_gb:.1f} GB free"
    return Check("OK", "accelerator", f"{accelerator}; CUDA device: {device}")


def vram_estimate_gb(spec: ModelSpec, trainer: params_module.Trainer, vocab: Path) -> tuple[float, str]:
    """Estimated training peak in GB for this preset and recipe (sam3ft.train.memory), and how."""
    from sam3ft.train.memory import param_sizes, training_peak_gb
    from sam3ft.train.model import trained_groups

    groups = trained_groups(trainer.trainable, trainer.segmentation)
    total, trainable, largest = param_sizes(spec, vocab, groups, trainer.lora_rank)
    return training_peak_gb(spec, total, trainable, trainer, largest)


# -- 4. DVC remotes -------------------------------------------------------------------------------


def read_dvc_config(path: Path) -> dict[str, dict[str, str]]:
    """One DVC config file (configobj INI, as DVC reads it) as plain dicts; {} if absent."""
    from configobj import ConfigObj, ConfigObjError

    if not path.is_file():
        return {}
    try:
        sections = ConfigObj(str(path)).items()
    except ConfigObjError as exc:  # its message quotes the offending line, which may hold a key
        raise ConfigError(f"{path} is not a valid DVC config", fix=f"fix line {exc.line_number}") from exc
    return {name: dict(section) for name, section in sections if isinstance(section, dict)}


def display_url(url: str) -> str:
    """The URL without any password or query string (where SAS tokens and signatures live)."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.hostname or ""
    host += f":{parts.port}" if parts.port else ""
    user = f"{parts.username}:***@" if parts.password else (f"{parts.username}@" if parts.username else "")
    return f"{parts.scheme}://{user}{host}{parts.path}"


def s3_credentials(
    name: str, shared: dict[str, str], local: dict[str, str], env: Mapping[str, str], home: Path
) -> Check:
    """Where DVC will find S3 credentials for remote `name`: names the source, never the values."""
    check = f"remote {name} credentials"
    if any(k in shared for k in (*S3_KEY_PAIR, "session_token")):
        fix = f"move them: dvc remote modify --local {name} access_key_id ... (and secret_access_key)"
        return Check("FAIL", check, "keys are in .dvc/config, which git tracks", fix)
    credentials_file = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials")
    sources = [
        (all(k in local for k in S3_KEY_PAIR), "access_key_id/secret_access_key in .dvc/config.local"),
        ("profile" in local or "credentialpath" in local, "profile/credentialpath in .dvc/config.local"),
        (
            all(env.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
            "AWS_ACCESS_KEY_ID/SECRET env",
        ),
        (bool(env.get("AWS_PROFILE")), "AWS_PROFILE env"),
        (credentials_file.is_file(), f"{credentials_file}"),
    ]
    found = [label for present, label in sources if present]
    if found:
        return Check("OK", check, "found: " + "; ".join(found))
    fix = (
        f"dvc remote modify --local {name} access_key_id ID (and secret_access_key), "
        "or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or set AWS_PROFILE"
    )
    return Check(
        "WARN", check, "none found (env, .dvc/config.local, ~/.aws; instance roles not checked)", fix
    )


def s3_endpoint(remote: dict[str, str]) -> tuple[str, int]:
    """(host, port) DVC will talk to: the remote's endpointurl, else AWS's regional S3 endpoint."""
    if remote.get("endpointurl"):
        parts = urlsplit(remote["endpointurl"])
        return parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)
    region = remote.get("region")
    return (f"s3.{region}.amazonaws.com" if region else "s3.amazonaws.com"), 443


def check_reachable(name: str, host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> Check:
    """A TCP connect to the remote's endpoint (nothing is sent); FAIL if it does not answer."""
    check = f"remote {name} endpoint"
    if not host:
        return Check(
            "FAIL", check, "endpointurl names no host", f"dvc remote modify --local {name} endpointurl URL"
        )
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        fix = f"check the network, or the endpoint: dvc remote modify --local {name} endpointurl URL"
        return Check("FAIL", check, f"{host}:{port} unreachable ({exc.strerror or exc})", fix)
    return Check("OK", check, f"{host}:{port} reachable")


def remote_checks(
    name: str,
    shared: dict[str, str],
    local: dict[str, str],
    dvc_dir: Path,
    env: Mapping[str, str],
    home: Path,
    default: bool,
) -> list[Check]:
    """The remote's URL, and for S3 its credentials and endpoint; a local store must exist."""
    remote = {**shared, **local}
    url = remote.get("url", "")
    label = f"remote {name}" + (" (default)" if default else "")
    parts = urlsplit(url)
    if not url:
        return [Check("WARN", label, "no url", f"dvc remote modify {name} url URL")]
    if parts.scheme == "s3":
        if parts.netloc.lower().startswith(PLACEHOLDER_BUCKET):
            fix = f"dvc remote modify {name} url s3://<bucket>/<prefix> (only needed to push or share)"
            return [Check("WARN", label, f"{url}: not configured (placeholder bucket)", fix)]
        host, port = s3_endpoint(remote)
        return [
            Check("OK", label, display_url(url)),
            s3_credentials(name, shared, local, env, home),
            check_reachable(name, host, port),
        ]
    if not parts.scheme or len(parts.scheme) == 1:  # a local path (or a Windows drive letter)
        store = (dvc_dir / url).resolve()
        if not store.is_dir():
            fix = f"restore it (git checkout -- {url}) or point the remote elsewhere"
            return [Check("WARN", label, f"{url}: local store {store} missing", fix)]
        return [Check("OK", label, f"{url} (local store)")]
    return [Check("OK", label, f"{display_url(url)} (not checked: {parts.scheme} remotes)")]


def dvc_remote_checks(repo_root: Path, env: Mapping[str, str], home: Path) -> list[Check]:
    """Every remote named in .dvc/config and .dvc/config.local (local values override)."""
    dvc_dir = repo_root / ".dvc"
    if not dvc_dir.is_dir():
        return [Check("FAIL", "dvc", f"no .dvc/ in {repo_root}", "run doctor from the repository root")]
    if importlib.util.find_spec("configobj") is None:  # DVC's config parser, installed with dvc
        return [Check("WARN", "remotes", "not checked: configobj missing", "pip install -e . (brings dvc)")]
    try:
        shared, local = read_dvc_config(dvc_dir / "config"), read_dvc_config(dvc_dir / "config.local")
    except ConfigError as exc:
        return [Check("FAIL", "remotes", exc.message, exc.fix or "")]
    default = {**shared.get("core", {}), **local.get("core", {})}.get("remote")
    names = sorted({m.group(1) for s in (*shared, *local) if (m := re.fullmatch(r'remote "(.+)"', s))})
    if not names:
        return [Check("WARN", "remotes", "none configured", "see README, section Remotes")]
    checks: list[Check] = []
    for name in names:
        section = f'remote "{name}"'
        checks += remote_checks(
            name, shared.get(section, {}), local.get(section, {}), dvc_dir, env, home, name == default
        )
    return checks


# -- 5. secrets, 6. threads ----------------------------------------------------------------------


def check_secrets(weights: str, env: Mapping[str, str]) -> Check:
    """HF_TOKEN is needed only for hf:// weights; lists which secret-looking variables are set (names)."""
    from sam3ft.compat import is_secret_name

    names = sorted(n for n in env if is_secret_name(n))
    if weights.startswith("hf://") and not env.get("HF_TOKEN"):
        fix = "export HF_TOKEN=<a Hugging Face read token with access to the repo>"
        return Check(
            "WARN", "secrets", f"fetch.weights is on the HF hub ({weights}) but HF_TOKEN is not set", fix
        )
    shown = ", ".join(names) or "none"
    return Check("OK", "secrets", f"{len(names)} secret-looking variable(s) set, values not shown: {shown}")


def check_threads(base_threads: int, torch_threads: int, cpus: int) -> Check:
    """base.threads (what the stages pin torch to) against this machine's CPUs."""
    detail = (
        f"base.threads={base_threads} (stages pin torch to it); torch default {torch_threads}; {cpus} CPU(s)"
    )
    if base_threads > cpus:
        return Check(
            "WARN", "threads", detail, f"set base.threads <= {cpus}; 1 is fastest on 2-core machines"
        )
    return Check("OK", "threads", detail)


def usable_cpus() -> int:
    """CPUs this process may run on (the container's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -- all together --------------------------------------------------------------------------------


def run_params_checks(p: params_module.Params, repo_root: Path, env: Mapping[str, str]) -> list[Check]:
    """The checks that need valid params and an importable torch."""
    import torch

    trainer, facts = p.trainer, PRESETS.get(p.model.preset)
    checks = [check_preset(p), check_accelerator(trainer.accelerator)]
    if facts is not None:
        memory = cuda_memory_gb() if trainer.accelerator == "cuda" else None
        from sam3ft.model.build import bundled_vocab

        estimate, how = vram_estimate_gb(load_preset(p.model.preset), trainer, bundled_vocab())
        checks.append(check_vram(estimate, how, *(memory or (None, None))))
        free_gb = shutil.disk_usage(repo_root).free / GB
        checks.append(check_disk(disk_needed_gb(facts.params, trainer, p.export), free_gb, repo_root))
    checks.append(check_secrets(p.fetch.weights, env))
    checks.append(check_threads(p.base.threads, torch.get_num_threads(), usable_cpus()))
    return checks


def run_checks(params_path: Path, repo_root: Path) -> list[Check]:
    """Every check for the run `params_path` configures, in report order."""
    env, checks = os.environ, version_checks()
    params_check, p = load_params(params_path)
    checks.append(params_check)
    if p is not None and importlib.util.find_spec("torch") is not None:
        checks += run_params_checks(p, repo_root, env)
    return checks + dvc_remote_checks(repo_root, env, Path.home())
