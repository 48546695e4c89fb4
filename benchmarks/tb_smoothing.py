#!/usr/bin/env python
"""What TensorBoard's default smoothing shows at the end of each run's full-pass loss curve.

    python benchmarks/tb_smoothing.py runs/compare-digits      # after python examples/compare.py

For every run folder under the given log folder: the number of ``train/epoch_loss``
points, the last true value, and the last value TensorBoard draws with its default
smoothing (0.6, a debiased exponential moving average) on that chart and on
``train/log10_epoch_loss``.  A smoothed value far from the true one is a chart that
misleads at first sight.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Iterable

TENSORBOARD_DEFAULT_SMOOTHING = 0.6


def smoothed_last(values: Iterable[float], weight: float = TENSORBOARD_DEFAULT_SMOOTHING) -> float:
    """TensorBoard's smoothing of a series, at its last point: an EMA divided by its bias."""
    last, count = 0.0, 0
    for value in values:
        last, count = last * weight + (1 - weight) * value, count + 1
    return last / (1 - weight ** count)


def main() -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", type=Path)
    args = parser.parse_args()
    print("| run | points | true | smoothed, linear chart | smoothed, log10 chart |\n| --- | --- | --- | --- | --- |")
    for run in sorted(p for p in args.logdir.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run))
        events.Reload()
        if "train/epoch_loss" not in events.Tags()["scalars"]:
            continue
        values = [e.value for e in events.Scalars("train/epoch_loss")]
        logs = [e.value for e in events.Scalars("train/log10_epoch_loss")]
        print(f"| {run.name} | {len(values)} | {values[-1]:.2g} | {smoothed_last(values):.2g} | "
              f"{10 ** smoothed_last(logs):.2g} |")


if __name__ == "__main__":
    main()
