"""A progress bar for long runs (tqdm, which transformers already depends on), on stderr."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """``step(label)`` after each finished unit of work; shows done/total, elapsed time and an estimate of the rest."""

    def __init__(self, total: int, what: str) -> None:
        self.bar = tqdm(total=total, desc=what, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def step(self, label: str) -> None:
        self.bar.set_postfix_str(label, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
