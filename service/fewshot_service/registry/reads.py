"""Reads of a namespace's classes, models and state, and the list of namespaces."""

from __future__ import annotations

from collections.abc import Callable

from fewshot_common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable

from .keys import decode, encode, namespace_of_state_key, redis_errors, state_key_pattern, text
from .migration import Migration
from .store import Store
from .types import ClassInfo, ClassSummary, ModelCompleteness, NamespaceStatus, NamespaceSummary

# Labels a search reads from the index per round trip while it fills a page.
_SEARCH_CHUNK = 1000


class Reads:
    def __init__(self, store: Store, migration: Migration) -> None:
        self._store = store
        self._migration = migration

    def list_classes(self, namespace: str) -> list[ClassSummary]:
        keys = self._store.keys(namespace)
        with redis_errors(self._store.client):
            counts = self._store.client.hgetall(keys.counts)  # the same field in both layouts
        summaries = [ClassSummary(decode(f), int(c)) for f, c in counts.items()]
        return sorted(summaries, key=lambda s: s.label)

    def class_page(
        self,
        namespace: str,
        after: str | None,
        limit: int,
        *,
        prefix: str = "",
        matches: Callable[[str], bool] | None = None,
    ) -> tuple[list[ClassSummary], str | None]:
        """Up to ``limit`` classes by label after ``after``, and the label the next page starts
        after (None: this is the last page).

        Read from the namespace's label index (keys.py, ``labels``): the fields are hex of the
        labels' UTF-8, which sorts as the labels do (code point order), so ZRANGEBYLEX finds the
        cursor and a ``prefix`` in O(log n + page). ``matches`` (a search the index cannot answer,
        e.g. a substring) walks the index from the cursor in chunks until the page is full: a
        page costs the labels walked to fill it, the whole namespace only when few match. A
        class deleted between the reads is left out of the page."""
        self._migration.ensure_layout(namespace)  # builds the index of an older namespace once
        keys = self._store.keys(namespace)
        client = self._store.client
        low = f"({encode(after)}" if after else "-"
        if prefix and (not after or encode(prefix) > encode(after)):
            low = f"[{encode(prefix)}"
        high = f"({encode(prefix)}g" if prefix else "+"  # 'g' sorts after every hex digit
        chosen: list[bytes] = []
        more = False
        with redis_errors(client):
            while True:
                wanted = limit + 1 - len(chosen)
                batch = max(wanted, _SEARCH_CHUNK) if matches is not None else wanted
                fields = client.zrangebylex(keys.labels, low, high, start=0, num=batch)
                for f in fields:
                    if matches is None or matches(decode(f)):
                        chosen.append(f)
                    if len(chosen) > limit:
                        break
                if len(chosen) > limit or len(fields) < batch:
                    break
                low = f"({text(fields[-1])}"
            more = len(chosen) > limit
            chosen = chosen[:limit]
            counts = client.hmget(keys.counts, chosen) if chosen else []
        found = [ClassSummary(decode(f), int(c)) for f, c in zip(chosen, counts) if c is not None]
        return found, decode(chosen[-1]) if more else None

    def get_class(self, namespace: str, label: str) -> ClassInfo:
        keys = self._store.keys(namespace)
        self._migration.ensure_layout(namespace)
        with redis_errors(self._store.client):
            example_ids = self._store.example_ids(keys, label)
        if not example_ids:
            raise NotFound(f"no class {label!r} in namespace {namespace!r}")
        return ClassInfo(label=label, count=len(example_ids), example_ids=example_ids)

    def example_image(self, namespace: str, label: str, example_id: str) -> bytes:
        """The stored copy of one example's image: b"" when it was stored without one
        (``--no-store-images``, or migrated from the layout before stored images)."""
        keys = self._store.keys(namespace)
        self._migration.ensure_layout(namespace)
        with redis_errors(self._store.client):
            pipe = self._store.client.pipeline(transaction=False)
            pipe.hget(keys.images(label), example_id)
            pipe.exists(keys.images(label))
            stored, class_exists = pipe.execute()
        if stored is None:
            if not class_exists:
                raise NotFound(f"no class {label!r} in namespace {namespace!r}")
            raise NotFound(f"class {label!r} in namespace {namespace!r} has no example {example_id!r}")
        return bytes(stored)

    def models(self, namespace: str) -> dict[str, int]:
        """Model id -> embedding dim, for every model holding embeddings in ``namespace``."""
        self._migration.ensure_layout(namespace)
        with redis_errors(self._store.client):
            raw = self._store.client.hgetall(self._store.keys(namespace).models)
        return {text(k): int(v) for k, v in raw.items()}

    def only_model(self, namespace: str) -> str:
        """The one model holding embeddings in ``namespace``; refused where there are none or several."""
        models = self.models(namespace)
        if len(models) == 1:
            return next(iter(models))
        if not models:
            raise FailedPrecondition(
                f"namespace {namespace!r} has no classes yet: add examples to a class first"
            )
        raise InvalidInput(f"namespace {namespace!r} holds embeddings of {len(models)} models: name one")

    def model_progress(self, namespace: str) -> list[ModelCompleteness]:
        """Each model's embedded count in ``namespace``, most embedded first (one MULTI)."""
        self._migration.ensure_layout(namespace)
        keys = self._store.keys(namespace)
        with redis_errors(self._store.client):
            pipe = self._store.client.pipeline(transaction=True)
            pipe.hkeys(keys.models)
            pipe.hgetall(keys.state)
            models, state = pipe.execute()
        return _progress(models, state)

    def list_namespaces(self) -> list[NamespaceSummary]:
        """Every namespace that holds classes, by name, with its counts and per-model progress."""
        store = self._store
        pattern = state_key_pattern(store.prefix)
        with redis_errors(store.client):
            names = sorted(
                {
                    namespace_of_state_key(store.prefix, key)
                    for key in store.client.scan_iter(match=pattern, count=1000)
                }
            )
        for name in names:
            self._migration.ensure_layout(name)
        with redis_errors(store.client):
            pipe = store.client.pipeline(transaction=False)
            for name in names:
                keys = store.keys(name)
                pipe.hvals(keys.counts)
                pipe.hkeys(keys.models)
                pipe.hgetall(keys.state)
            replies = pipe.execute() if names else []
        summaries = []
        for i, name in enumerate(names):
            counts, models, state = replies[3 * i : 3 * i + 3]
            if not counts:  # a namespace whose classes were all deleted keeps only its state
                continue
            summaries.append(
                NamespaceSummary(name, len(counts), sum(int(c) for c in counts), _progress(models, state))
            )
        return summaries

    def generation(self, namespace: str) -> int:
        """The namespace's change counter: one cheap round trip."""
        keys = self._store.keys(namespace)
        with redis_errors(self._store.client):
            return int(self._store.client.hget(keys.state, "generation") or 0)

    def status(self, namespace: str, model_id: str) -> NamespaceStatus:
        """Epoch, generation, example count and ``model_id``'s embedded count: one HMGET (a
        namespace still in the old layout is migrated first, once)."""
        keys = self._store.keys(namespace)
        for _attempt in range(2):
            with redis_errors(self._store.client):
                epoch, generation, layout, examples, embedded = self._store.client.hmget(
                    keys.state, "epoch", "generation", "layout", "examples", f"n:{model_id}"
                )
            if epoch is None or layout is not None:
                return NamespaceStatus(
                    text(epoch or b""), int(generation or 0), int(examples or 0), int(embedded or 0)
                )
            self._migration.migrate_namespace(namespace)
        raise Unavailable(f"namespace {namespace!r} could not be migrated; retry later")


def _progress(models: list[bytes], state: dict[bytes, bytes]) -> list[ModelCompleteness]:
    total = int(state.get(b"examples", 0))
    progress = []
    for model in (text(m) for m in models):
        embedded = int(state.get(f"n:{model}".encode(), 0))
        progress.append(ModelCompleteness(model, embedded, embedded >= total))
    return sorted(progress, key=lambda p: (-p.embedded, p.model_id))
