"""The values the registry hands its callers (plain, frozen), and its own refusal of a model that
has not embedded every example yet."""

from __future__ import annotations

from dataclasses import dataclass, field

from fewshot_common.errors import FailedPrecondition


@dataclass(frozen=True)
class ClassSummary:
    label: str
    count: int


@dataclass(frozen=True)
class ModelCompleteness:
    model_id: str
    embedded: int  # examples of the namespace this model has an embedding of
    complete: bool


@dataclass(frozen=True)
class NamespaceSummary:
    name: str
    class_count: int
    example_count: int
    models: list[ModelCompleteness] = field(default_factory=list)  # most embedded first

    @property
    def model_id(self) -> str | None:
        """The model with the most embeddings here (the only one, before any model roll)."""
        return self.models[0].model_id if self.models else None


@dataclass(frozen=True)
class DeletedNamespace:
    name: str
    class_count: int
    example_count: int


@dataclass(frozen=True)
class ClassInfo:
    label: str
    count: int
    example_ids: list[str]
    # Only set by add_examples: the ids given to this call's examples, in request order.
    added_example_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NamespaceStatus:
    """One namespace's state as one HMGET read it, for one model."""

    epoch: str
    generation: int
    examples: int  # the namespace's examples
    embedded: int  # how many of them the model has embedded

    @property
    def version(self) -> tuple[str, int]:
        return self.epoch, self.generation

    @property
    def complete(self) -> bool:
        return self.embedded >= self.examples


class ModelIncompleteError(FailedPrecondition):
    """Raised by :meth:`Registry.prototypes`: the model lacks embeddings of some examples.
    The core turns it into :class:`fewshot_common.errors.ModelIncomplete` with the whole story."""

    def __init__(self, namespace: str, model_id: str, status: NamespaceStatus) -> None:
        super().__init__(
            f"namespace {namespace!r}: {status.embedded} of {status.examples} examples embedded "
            f"for model {model_id!r}"
        )
        self.namespace, self.model_id, self.status = namespace, model_id, status
