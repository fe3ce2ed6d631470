#!/usr/bin/env python3
"""Reads a run's TensorBoard directory with TensorBoard's own EventAccumulator and prints
every tag with its event count and last value, so a sepdist event file can be checked
against the official reader. Not run in CI (needs `pip install tensorboard`):

    python3 -m venv /tmp/tbvenv && /tmp/tbvenv/bin/pip install tensorboard
    /tmp/tbvenv/bin/python scripts/check_tensorboard.py OUTPUT_DIR/tb
"""

import sys

from tensorboard.backend.event_processing import event_accumulator


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} TB_DIR", file=sys.stderr)
        return 2
    # size_guidance 0 keeps every event (the defaults sample scalars down to 10,000).
    acc = event_accumulator.EventAccumulator(
        sys.argv[1],
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.AUDIO: 0},
    )
    acc.Reload()
    tags = acc.Tags()
    print(f"file_version: {acc.file_version}")
    for tag in tags["scalars"]:
        events = acc.Scalars(tag)
        last = events[-1]
        print(f"scalar {tag}: {len(events)} events, last step {last.step} value {last.value:.6g}")
    for tag in tags["audio"]:
        events = acc.Audio(tag)
        last = events[-1]
        print(
            f"audio {tag}: {len(events)} events, last step {last.step}, "
            f"{last.sample_rate:g} Hz, {last.length_frames} frames, "
            f"{len(last.encoded_audio_string)} bytes {last.content_type}"
        )
    if not tags["scalars"] and not tags["audio"]:
        print("no scalars or audio found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
