"""Schema fuzzing of every operation (schemathesis, a fixed example budget) against the in-process app
with a real Redis: no 5xx, and every answer (status, content type, body, headers) is the one the
OpenAPI schema documents. Requests carry a valid key, so the operations behind auth are reached.

The operations are driven with Hypothesis directly: schemathesis' own pytest plugin does not load
under pytest 9."""

from __future__ import annotations

import zipfile

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks

from tests.service import zips
from tests.service.conftest import A

pytestmark = pytest.mark.slow
EXAMPLES_PER_OPERATION = 12


def zip_bodies() -> st.SearchStrategy[bytes]:
    """What POST /v1/cohorts is fuzzed with (the schema says only "binary"): the hostile archives of
    tests/service/zips.py, small good and broken zips, and arbitrary bytes."""
    corpus = [
        zips.make_zip([("../evil.nii.gz", zips.NIFTI_GZ)]),
        zips.symlink_zip(),
        zips.encrypted_zip(),
        zips.nested_zip(),
        zips.overlapping_zip(),
        zips.bomb_zip(2 << 20),
        zips.make_zip([("c/a.nii.gz", zips.NIFTI_GZ)], zipfile.ZIP_BZIP2),
        zips.make_zip([("c/a.nii.gz", zips.NIFTI_GZ)])[:-10],
        zips.make_zip([]),
    ]
    return st.one_of(st.sampled_from(corpus), st.binary(max_size=4096))


schemathesis.openapi.media_type("application/zip", zip_bodies())


def fuzzer(operation, excluded: list, calls: list):
    """One operation's property test: every generated case answers as the schema documents."""

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same cases every run: a failure reproduces
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case):
        calls.append(operation.path)
        case.call_and_validate(headers=A, excluded_checks=excluded)

    return run


def test_every_operation_answers_as_documented(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    calls: list[str] = []
    for operation in operations:
        # "schema-valid data is accepted" is left out: whether bytes are a checkpoint or a cohort, or an
        # id names an object of yours, is not something a schema can say (those answers are 4xx with
        # ErrorOut bodies, and their shape is still checked)
        excluded = [checks.positive_data_acceptance]
        if operation.path == "/health/ready":  # its documented 503: no worker runs in this test
            excluded.append(checks.not_a_server_error)
        try:
            fuzzer(operation, excluded, calls)()
        except (Exception, BaseExceptionGroup) as e:  # every operation's failures, not only the first
            failures.append(f"{operation.method.upper()} {operation.path}: {type(e).__name__}: {e}"[:2000])
    assert not failures, "\n\n".join(failures)
    assert len(set(calls)) == len({o.path for o in operations}) and len(calls) >= 5 * len(operations)
