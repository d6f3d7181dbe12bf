"""What one measurement is (a cell), the fields every result carries, and the plan of cells for a run.

A cell = (model, precision, engine, backend, scenario, lengths). Scenarios follow the seed:
"encode" = a long context and one new token; "generate" = a 1-token context and N new tokens.
"""

from __future__ import annotations

import dataclasses

from qwen_quant.errors import UserError

PRECISIONS = ("bf16", "fp16", "fp32", "int4")
SCENARIOS = ("encode", "generate")
STATUSES = ("ok", "oom", "error")

# results.json `cells[i]` holds exactly these keys (issue 5); null where a field does not apply.
CELL_FIELDS = (
    "model", "precision", "engine", "backend", "scenario", "context_tokens", "new_tokens",
    "tokens_per_s", "decode_tokens_per_s", "prefill_s", "peak_allocated_gib", "peak_reserved_gib",
    "peak_nvml_gib", "peak_rss_gib", "roofline_pct", "repeats", "spread", "status", "error",
)


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str  # what the user typed: HF id, dir, "demo", "synthetic:<shape>"
    label: str  # short model name for tables and folders
    precision: str
    engine: str
    backend: str
    scenario: str
    context_tokens: int
    new_tokens: int
    batch: int = 1

    @property
    def name(self) -> str:
        return (f"{self.label}-{self.precision}-{self.engine}-{self.scenario}"
                f"-c{self.context_tokens}-n{self.new_tokens}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def empty_result(cell: Cell, status: str, error: str | None = None) -> dict:
    """A result row for a cell that produced no measurement (oom, error)."""
    row = {k: None for k in CELL_FIELDS}
    row.update(model=cell.label, precision=cell.precision, engine=cell.engine, backend=cell.backend,
               scenario=cell.scenario, context_tokens=cell.context_tokens, new_tokens=cell.new_tokens,
               status=status, error=error)
    return row


def parse_lengths(text: str, option: str) -> list[int]:
    """'2048,8192' -> [2048, 8192]; 'none' -> [] (skip that scenario). Zero or negative is an error."""
    if text.strip().lower() == "none":
        return []
    out = []
    for part in text.split(","):
        try:
            n = int(part.strip())
        except ValueError:
            raise UserError(f"{option} takes positive token counts like 2048,8192 (or 'none'), "
                            f"not {part.strip()!r}") from None
        if n <= 0:
            raise UserError(f"{option} lengths must be positive token counts, got {n}")
        out.append(n)
    return list(dict.fromkeys(out))


def parse_precisions(text: str | None) -> list[str] | None:
    if text is None:
        return None
    out = [p.strip().lower() for p in text.split(",") if p.strip()]
    for p in out:
        if p not in PRECISIONS:
            raise UserError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if not out:
        raise UserError(f"--precision needs at least one of {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(out))


def plan_cells(models: list[tuple[str, str, list[str]]], encode: list[int], gens: list[int],
               engines: list[str], backend: str, batch: int = 1) -> list[Cell]:
    """Every (model, precision, engine, scenario) combination, model-major like the seed's tables.

    `models` holds (model as typed, label, precisions for that model).
    """
    cells = []
    for model, label, precisions in models:
        for precision in precisions:
            for engine in engines:
                for n in encode:
                    cells.append(Cell(model, label, precision, engine, backend, "encode", n, 1, batch))
                for n in gens:
                    cells.append(Cell(model, label, precision, engine, backend, "generate", 1, n, batch))
    return cells
