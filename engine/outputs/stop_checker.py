"""Stop strings: find them in the growing output text, even across token borders.

Rule: no part of a stop string is ever shown to the user (unless
`include_stop_str_in_output`). Finding a complete stop string truncates the text before it;
while the text *ends* with what could be the start of a stop string, that tail is held back
from streaming, because the next token may complete it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StopMatch:
    stop_string: str
    text_length: int  # where the text is cut: before the stop string, or after it if included


class StopChecker:
    """Checks one completion's text against its stop strings."""

    def __init__(self, stop: Optional[list[str]], include_stop_str_in_output: bool) -> None:
        self._stop = [s for s in (stop or ()) if s]
        self._include = include_stop_str_in_output
        self._max_len = max((len(s) for s in self._stop), default=0)

    @property
    def is_active(self) -> bool:
        return bool(self._stop)

    def find(self, text: str, num_new_chars: int) -> Optional[StopMatch]:
        """The earliest stop string that touches the last `num_new_chars` characters.

        Only the new text plus `max_len - 1` characters before it are searched, so a stop
        string spanning the border is found and each step costs O(new text).
        """
        if not self._stop or num_new_chars <= 0:
            return None
        start = max(0, len(text) - num_new_chars - self._max_len + 1)
        best: Optional[StopMatch] = None
        best_pos = len(text)
        for stop in self._stop:
            pos = text.find(stop, start)
            if pos != -1 and pos < best_pos:
                best_pos = pos
                cut = pos + len(stop) if self._include else pos
                best = StopMatch(stop, cut)
        return best

    def num_held_back(self, text: str) -> int:
        """How many trailing characters could be the start of a stop string (not shown yet)."""
        if self._include or not self._stop:
            # An included stop string is shown anyway, so a partial one may be shown early.
            return 0
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
