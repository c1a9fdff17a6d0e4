"""/v1/report: will a namespace's classes work? Leave-one-out accuracy per class, confused pairs,
classes needing more or cleaner shots, expected accuracy (classify/report.py)."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter

from ...names import resolve_namespace
from ..access import Action
from .dependencies import Core, Namespace, RequestCancellation, StrictQuery
from .schemas import ClassJudgementBody, ConfusedPairBody, ReportBody, error_responses
from .security import require

router = APIRouter(tags=["classes"], dependencies=[StrictQuery])


@router.get(
    "/v1/report",
    response_model=ReportBody,
    responses=error_responses(401, 403, 409, 422, 503),
    # Reads what listing the classes and their examples reads: the same rule.
    dependencies=[require(Action.LIST)],
    summary="How well the namespace's classes can be told apart, judged leave-one-out on their "
    "own examples: per-class accuracy, confused pairs, classes needing more or cleaner shots",
)
def get_report(core: Core, cancellation: RequestCancellation, namespace: Namespace = None) -> ReportBody:
    report = core.report(namespace, cancellation)
    return ReportBody(
        namespace=resolve_namespace(namespace),
        model_id=core.model_id,
        classes=report.classes,
        examples=report.examples,
        sampled=report.sampled,
        judged_examples=report.judged_examples,
        expected_accuracy=report.expected_accuracy,
        per_class=[ClassJudgementBody(**dataclasses.asdict(j)) for j in report.per_class],
        confused_pairs=[ConfusedPairBody(**dataclasses.asdict(p)) for p in report.confused_pairs],
    )
