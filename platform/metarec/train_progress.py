"""What ``metarec train`` prints while Ray trains: one line per epoch, read back from the
MLflow run that rank 0 logs to, above a progress bar (instead of Ray's worker logs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
from collections.abc import Iterator

__all__ = ["epoch_lines"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def epoch_lines(uri: str, run_id: str, epochs: int, valid_key: str = "valid/mae") -> Iterator[None]:
    """While the block runs, print one line per epoch as rank 0 logs it to the MLflow run,
    above a tqdm bar: what a user reads instead of Ray's worker logs. ``valid_key``: the
    validation objective (``loop.valid_key``)."""
    from tqdm import tqdm

    from metarec import tracking
    from metarec.loop import valid_label

    done = tracking.logged_epochs(uri, run_id, valid_key=valid_key)  # resumed: not news
    state = {
        "last": done[-1]["epoch"] if done else -1,
        "best": min((r[valid_key] for r in done), default=math.inf),
    }
    label = valid_label(valid_key)
    bar = tqdm(  # a bar only on a terminal: in a log file it is noise between the lines
        total=epochs,
        initial=len(done),
        unit="epoch",
        leave=False,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
    )
    stop = threading.Event()

    def poll() -> None:
        for row in tracking.logged_epochs(uri, run_id, int(state["last"]), valid_key):
            best = row[valid_key] < state["best"]
            state["best"] = min(state["best"], row[valid_key])
            bar.write(
                f"epoch {int(row['epoch']) + 1:>3}/{epochs}  "
                f"train loss {row['train/query_loss']:.4f}  "
                f"{label} {row[valid_key]:.4f}{' *' if best else '  '}  "
                f"{row['train/tasks_per_s']:,.0f} tasks/s  {row['train/epoch_s']:.1f} s",
                file=sys.stdout,
            )
            bar.update(1)
            state["last"] = row["epoch"]

    def loop() -> None:
        while not stop.wait(1.0):
            try:
                poll()
            except Exception as e:  # a busy store must never stop training; say why once
                log.debug("epoch lines: %s", e)

    thread = threading.Thread(target=loop, name="metarec-epoch-lines", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            poll()
        bar.close()
