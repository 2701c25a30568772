"""What happened to a source's rows: the typed errors of the data pipeline and the ``DataReport`` that
counts every dropped row by reason (``realjax.data.sources`` fills it, ``render_prompts`` adds its stage)."""

from __future__ import annotations

import dataclasses

# Fields read, in order of precedence. Everything else is kept as an extra column.
PROMPT_FIELDS = ("prompt", "messages", "problem", "question")
ANSWER_FIELDS = ("ground_truth", "answer", "solution")  # after verl's reward_model.ground_truth


class DataError(ValueError):
    """A data source or its contents cannot be used as configured."""


class MalformedRow(DataError):
    """One row cannot be normalised; ``reason`` is its counter key in the report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class DataReport:
    """Where rows went: ``total == kept + too_long + sum(malformed.values())``."""

    source: str
    total: int = 0
    kept: int = 0
    too_long: int = 0
    malformed: dict[str, int] = dataclasses.field(default_factory=dict)
    columns: tuple[str, ...] = ()  # the fields the source's rows had, for a report that nothing was usable
    max_prompt_tokens: int | None = None  # the limit behind too_long, and the setting that raises it
    limit_key: str = "data.max_prompt_tokens"

    @property
    def dropped(self) -> int:
        return self.too_long + sum(self.malformed.values())

    def count(self, reason: str) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + 1

    def then(self, later: DataReport) -> DataReport:
        """This stage followed by ``later``, which saw this stage's kept rows."""
        malformed = dict(self.malformed)
        for reason, n in later.malformed.items():
            malformed[reason] = malformed.get(reason, 0) + n
        return DataReport(self.source, self.total, later.kept, self.too_long + later.too_long, malformed,
                          self.columns or later.columns, later.max_prompt_tokens or self.max_prompt_tokens,
                          later.limit_key)

    def summary(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.malformed.items())) or "none"
        limit = (f" (over {self.max_prompt_tokens} prompt tokens; raise {self.limit_key} to keep them)"
                 if self.too_long and self.max_prompt_tokens else "")
        return (f"{self.source}: kept {self.kept}/{self.total} rows; dropped {self.too_long} too long{limit}, "
                f"{sum(self.malformed.values())} malformed ({bad})")

    def check(self, max_bad_fraction: float) -> None:
        """Raise ``DataError`` when nothing is kept or too large a fraction was dropped."""
        if self.kept == 0:
            hint = ""
            if self.malformed.get("no_prompt") or self.malformed.get("no_ground_truth"):
                found = ", ".join(self.columns) or "none"
                hint = (f"; realjax reads the prompt from a field {' / '.join(PROMPT_FIELDS)} and the answer from "
                        f"reward_model.ground_truth / {' / '.join(ANSWER_FIELDS)}; the rows have: {found}")
            raise DataError(f"no usable rows: {self.summary()}{hint}")
        fraction = self.dropped / self.total
        if fraction > max_bad_fraction:
            raise DataError(f"{fraction:.1%} of rows dropped, more than max_bad_fraction="
                            f"{max_bad_fraction}: {self.summary()}")
