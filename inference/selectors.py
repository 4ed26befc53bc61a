"""Reads for the inference app."""

from __future__ import annotations

import re

from django.db.models import QuerySet

from inference.models import ModelVersion, RoutingRule
from studies.models import Series


def _listed(value: str, allowed: str) -> bool:
    choices = {item.strip().upper() for item in allowed.split(",") if item.strip()}
    return not choices or value.strip().upper() in choices


def routing_rule_for_series(*, series: Series) -> RoutingRule | None:
    """The first enabled rule, by priority, that the series matches; None if none does.

    A rule's ``min_instances`` is not matched here: the quality gate checks it, so a short
    series gets a visible "not analysed" with its reason instead of silence.
    """
    sop_classes = set(series.instances.values_list("sop_class_uid", flat=True).distinct())
    for rule in RoutingRule.objects.filter(enabled=True):
        if not _listed(series.modality, rule.modalities):
            continue
        if not _listed(series.view_position, rule.view_positions):
            continue
        if rule.sop_class_uids and not sop_classes <= {
            uid.strip() for uid in rule.sop_class_uids.split(",")
        }:
            continue
        if rule.body_part_regex and not re.search(
            rule.body_part_regex, series.body_part_examined.strip(), re.IGNORECASE
        ):
            continue
        if rule.series_description_regex and not re.search(
            rule.series_description_regex, series.series_description, re.IGNORECASE
        ):
            continue
        return rule
    return None


def active_models(*, task: str) -> QuerySet[ModelVersion]:
    """The active model versions of a task: one, or several that form a weighted ensemble."""
    return ModelVersion.objects.filter(task=task, status=ModelVersion.Status.ACTIVE).order_by("pk")
