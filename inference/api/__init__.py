"""The REST API for studies, jobs, predictions, the model registry and reports (``/api/``).

Thin DRF views over ``inference.selectors`` (reads) and ``inference.services`` (writes). Every AI
output carries its model's name, version and sha256 and the not-for-diagnostic-use notice; every
view of a patient's results is recorded as an ``AuditEvent``.
"""
