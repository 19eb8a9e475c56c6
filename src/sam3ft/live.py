"""dvclive as a plain file writer for our stages' metrics, plots and images."""

from __future__ import annotations

from pathlib import Path

from dvclive import Live


class FileLive(Live):
    """dvclive's metric and plot writer without its DVC/Git integration.

    DVC runs our stages; dvclive only writes files. Its `_init_dvc` looks the Git repo up and raises
    in one without commits (scmrepo SCMError "Empty git repo") and inside `dvc exp run` it tries to
    register its own outputs; everything it sets has a safe default before it is called.
    """

    def _init_dvc(self) -> None:
        return None


def open_live(directory: str | Path, resume: bool = False) -> Live:
    """A dvclive writer for `directory`: no report, no dvc.yaml, no experiment saving."""
    return FileLive(str(directory), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)
