from __future__ import annotations

from typing import Any

from django.db import migrations

# CR/DX chest goes to the chest X-ray model; a chest CT of at least 20 slices to the CT model.
# Body part may be absent on real radiographs, so an empty BodyPartExamined matches too.
DEFAULTS = [
    {
        "name": "Chest radiograph",
        "priority": 10,
        "modalities": "CR,DX",
        "body_part_regex": r"^(CHEST|THORAX|LUNG|TORSO)?$",
        "task": "cxr2d",
        "mode": "per_series",
    },
    {
        "name": "Chest CT",
        "priority": 20,
        "modalities": "CT",
        "body_part_regex": r"^(CHEST|THORAX|LUNG|CHEST_TO_PELVIS)?$",
        "min_instances": 20,
        "task": "ct3d",
        "mode": "per_series",
    },
]


def add_defaults(apps: Any, schema_editor: Any) -> None:
    rule = apps.get_model("inference", "RoutingRule")
    for fields in DEFAULTS:
        rule.objects.get_or_create(name=fields["name"], defaults=fields)


def remove_defaults(apps: Any, schema_editor: Any) -> None:
    apps.get_model("inference", "RoutingRule").objects.filter(
        name__in=[fields["name"] for fields in DEFAULTS]
    ).delete()


class Migration(migrations.Migration):
    dependencies = [("inference", "0001_initial")]
    operations = [migrations.RunPython(add_defaults, remove_defaults)]
