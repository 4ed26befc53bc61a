"""manage.py selftest against a running listener and a real worker process."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from studies.models import Series, Study


@pytest.mark.timeout(240)
def test_every_stage_passes_on_a_running_system(
    listener, celery_worker, default_routing, register_model
):
    register_model("cxr2d")
    out = StringIO()

    call_command("selftest", port=listener, timeout=90, stdout=out)

    lines = out.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["PASS", "echo"], ["PASS", "store"], ["PASS", "complete"], ["PASS", "inferred"],
        ["PASS", "exported"],
    ]  # fmt: skip
    assert "tiny-cxr2d" in out.getvalue()
    assert not Study.objects.exists()  # the synthetic study is removed afterwards


def test_without_a_worker_the_stage_that_stalls_is_named(listener):
    out = StringIO()

    with pytest.raises(CommandError):
        call_command("selftest", port=listener, timeout=2, stdout=out)

    assert "PASS  store" in out.getvalue()
    assert "FAIL  complete" in out.getvalue()
    assert not Series.objects.exists()
