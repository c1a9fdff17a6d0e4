"""What a namespace report (classify/report.py) is computed from, and how its cost is bounded.

Here, not beside the math, because it reads the registry. The other classes are the replica's
synced prototype matrix (the one Classify and the shot-quality judgements use); the judged
examples are at most :data:`MAX_JUDGED_EXAMPLES`, from at most :data:`MAX_JUDGED_CLASSES` classes
(a stable hash sample of the labels, the calibrator's, so repeated reports judge the same
classes) and an even spread of each class's ids. A report is cached per namespace state: asking
again before the namespace changes costs one Redis round trip.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from ..classify.open_set import sampled_labels
from ..classify.report import NamespaceReport, judge_namespace

if TYPE_CHECKING:
    from ..classify.snapshot import PrototypeSet
    from ..registry.registry import Registry

MAX_JUDGED_CLASSES = 256
MAX_JUDGED_EXAMPLES = 2048
# However many classes: at least 2 examples per class (one left out, one left), at most 32.
MIN_EXAMPLES_PER_CLASS, MAX_EXAMPLES_PER_CLASS = 2, 32
CACHED_REPORTS = 64  # namespaces


def examples_per_class(classes: int) -> int:
    return max(MIN_EXAMPLES_PER_CLASS, min(MAX_EXAMPLES_PER_CLASS, MAX_JUDGED_EXAMPLES // max(classes, 1)))


class NamespaceReports:
    """Builds and caches (one per namespace state) the reports of this replica's namespaces."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[tuple[str, int, str | None], NamespaceReport]] = OrderedDict()

    def report(self, namespace: str, prototypes: PrototypeSet) -> NamespaceReport:
        state = (prototypes.epoch, prototypes.generation, prototypes.model_id)
        with self._lock:
            cached = self._cache.get(namespace)
        if cached is not None and cached[0] == state:
            return cached[1]
        labels = sampled_labels(prototypes.labels, MAX_JUDGED_CLASSES)
        per_class = examples_per_class(len(labels))
        sample = self._registry.example_snapshot(
            namespace, per_class, only_labels=labels, only_their_means=True, model_id=prototypes.model_id
        )
        total = self._registry.status(namespace, prototypes.model_id or "").examples
        report = judge_namespace(prototypes.classifier, sample, total)
        fetched = sum(len(ids) for ids in sample.example_ids)
        sampled = len(labels) < len(prototypes.labels) or fetched < int(sample.counts.sum())
        report = dataclasses.replace(report, sampled=sampled)
        with self._lock:
            self._cache[namespace] = (state, report)
            self._cache.move_to_end(namespace)
            while len(self._cache) > CACHED_REPORTS:
                self._cache.popitem(last=False)
        return report
