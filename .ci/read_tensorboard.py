"""Reads burn-fabric's TensorBoard event files with TensorBoard's own reader (an independent
check of the format) and verifies the scalars an image_classifier run logs.

usage: python3 read_tensorboard.py LOG_VERSION_DIR EXPECTED_STEPS
"""
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

directory, expected_steps = sys.argv[1], int(sys.argv[2])
events = EventAccumulator(directory)
events.Reload()
tags = events.Tags()["scalars"]
for tag in ["train/loss", "train/epoch_loss", "test/accuracy"]:
    assert tag in tags, f"{tag} missing from {tags}"
losses = events.Scalars("train/loss")
assert len(losses) == expected_steps, f"{len(losses)} train/loss points, expected {expected_steps}"
assert [e.step for e in losses] == list(range(1, expected_steps + 1)), "steps must be 1..N"
assert all(0.0 < e.value < 10.0 for e in losses), "losses must be plausible"
accuracy = events.Scalars("test/accuracy")[-1].value
assert 0.5 < accuracy <= 1.0, accuracy
print(f"tensorboard read {len(tags)} tags, {len(losses)} losses, final accuracy {accuracy:.3f}")
