"""The API's resources, one module per family of endpoints.

``workflows`` (workflows, versions, webhook rotation, schedule), ``runs`` (queueing, reading,
cancelling and retrying runs), ``hooks`` (the webhook trigger), ``queue`` (queue stats and the
scheduler refresh), ``secrets``, ``health`` (liveness, readiness, the OpenAPI document) and
``base`` (what they share). Each resource reads and checks its input (``sluice_api.inputs``),
calls ``sluice_api.queries`` or common, and shapes the answer with ``sluice_api.schemas``; it
documents its operations next to its responders. The URLs are in ``sluice_api.routes``.
"""
