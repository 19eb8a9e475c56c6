"""The trainer's step logger (train/logging.py): every step to steps.jsonl, every n-th to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from sam3ft.train.logging import StepLogger, read_steps

LOSS = "Step_Losses/Losses/train_all_loss"


def test_every_step_reaches_the_steps_file_and_every_third_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    logger = StepLogger(
        log_dir=str(tmp_path / "tb"),
        steps_file=str(tmp_path / "logs/steps.jsonl"),
        telemetry_dir=str(tmp_path / "live"),
        images_per_step=2,
        total_steps=7,
        tensorboard_every=3,
        flush_secs=120,
    )
    for step in range(7):
        logger.log(LOSS, 10.0 - step, step)
        logger.log(LOSS + "/loss_bbox", 1.0 + step, step)
        logger.log("Optim/1_/lr", 1e-4 * step, step)
        written = (tmp_path / "logs/steps.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in written[-1:]] == (
            [step - 1] if step else []
        )  # at a step's end
        logger.log("Step_Stats/train/Batch Time", 0.5, step)
        logger.log("Step_Stats/train/Mem (GB)", 1.5, step)
    logger.log("Trainer/epoch", 1, 0)  # not a per-step name: always to TensorBoard
    logger.tb.flush()

    steps = read_steps(tmp_path / "logs/steps.jsonl")
    assert list(steps) == list(range(7))
    assert steps[4] == {"loss": 6.0, "loss_bbox": 5.0, "lr_group1": pytest.approx(4e-4)}

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()  # sam3 writes new-style scalars: tensor events

    def logged(tag: str) -> list[tuple[int, float]]:
        return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]

    assert logged(LOSS) == [(0, 10.0), (3, 7.0), (6, 4.0)]
    assert [step for step, _ in logged("Optim/1_/lr")] == [0, 3, 6]
    assert logged("Trainer/epoch") == [(0, 1.0)]


def test_secret_names_are_told_by_whole_words():
    """The trainer's environment log names secret-looking variables; a TOKEN inside a longer word
    (TOKENIZERS_PARALLELISM) or a path setting (AWS_CA_BUNDLE) is not one."""
    from sam3ft.compat import is_secret_name

    secret = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"]
    secret += [
        "AWS_SESSION_TOKEN",
        "SAM3FT_API_KEY",
        "GITHUB_TOKEN",
        "DB_PASSWORD",
        "AZURE_STORAGE_SAS_TOKEN",
    ]
    plain = ["TOKENIZERS_PARALLELISM", "AWS_CA_BUNDLE", "AWS_REGION", "AWS_ENDPOINT_URL", "PATH", "KEYBOARD"]
    assert [n for n in secret if not is_secret_name(n)] == []
    assert [n for n in plain if is_secret_name(n)] == []
