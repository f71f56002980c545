"""The one place that decides what a run achieved against its tolerance.

Three outcomes, from the written model's own figures (``report["end_to_end"]``) and its sites:

* ``met``: the tolerance holds with at least one substitution kept (or the model had nothing to
  substitute) — exit 0;
* ``met_by_rollback``: the tolerance holds only because every substitution was rolled back: OUTDIR
  holds the original computation, so nothing the run promised was delivered — exit 3;
* ``not_met``: the written model (the best configuration measured) misses the tolerance — exit 3.

``surgeon optimize`` prints ``Verdict.summary`` on stdout and ``Verdict.message`` on stderr, writes
``Verdict.to_json()`` as ``report.json``'s ``verdict`` and exits with ``Verdict.exit_code``; the
Python API's ``Result.verdict`` is the same object. docs/errors.md (rows "tolerance …") lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Verdict", "decide"]

Status = Literal["met", "met_by_rollback", "not_met"]
TOLERANCE_EXIT = 3  # = surgeon.errors.ToleranceNotMet.exit_code


@dataclass(frozen=True)
class Verdict:
    status: Status
    summary: str  # what follows "tolerance (…)" on the summary line: "met", "NOT met", …
    message: str  # one line for stderr (empty when met)
    exit_code: int

    @property
    def met(self) -> bool:
        return self.status == "met"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "summary": self.summary, "message": self.message, "exit_code": self.exit_code}


def _cos(v: Any) -> str:
    return "n/a" if v is None else f"{v:.6f}"


def decide(report: dict[str, Any]) -> Verdict:
    """The verdict of an ``optimize`` report (``tolerance``, ``sites``, ``end_to_end``)."""
    tol = report["tolerance"]
    desc = tol["description"]
    sites = [s for s in report.get("sites", []) if s["status"] in ("applied", "rolled_back") and not s.get("exact")]
    kept = [s for s in sites if s["status"] == "applied"]
    e2e = report.get("end_to_end") or {}
    figure = (f"perplexity ×{e2e['ppl_ratio']:.4f}, agreement {e2e['agreement']:.4f}" if "ppl_ratio" in e2e  # a decoder's file
              else f"cosine mean {_cos(e2e.get('cosine_mean'))}")
    if not tol["met"]:
        return Verdict("not_met", "NOT met", f"tolerance not met ({desc}): best model kept {len(kept)} site(s), {figure}",
                       TOLERANCE_EXIT)
    if sites and not kept:
        return Verdict("met_by_rollback", f"met only by rolling back all {len(sites)} substitution(s)",
                       f"tolerance ({desc}) met only by rolling back all {len(sites)} substitution(s): the written "
                       f"model computes as the original (relax the tolerance to keep substitutions)",
                       TOLERANCE_EXIT)
    return Verdict("met", "met", "", 0)
