"""The service's API contract, shared by the server and the client: the gRPC/protobuf code
generated from ``protos/`` (:mod:`fewshot_api.fewshot.v1`, mirroring ``protos/fewshot/v1/``) and the
typed errors both sides raise (:mod:`fewshot_api.errors`).

It ships in the small ``fewshot-client`` distribution (``service/client/``) and in ``fewshot``
itself, so there is one copy of each. It imports no other project package, and nothing here runs
on ``import fewshot_api``: the server takes its stubs from it without loading the client's HTTP stack.
"""
