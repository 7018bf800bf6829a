"""GET /v1/cohorts/{id}/cases/{case}/preview.png: a case's most-tumour slice with its outline."""

import io

import numpy as np
from PIL import Image

from tests.service.conftest import A, B


def test_case_preview_is_a_png_of_the_case_and_private(client, cohort_id):
    cohort = client.get(f"/v1/cohorts/{cohort_id}", headers=A).json()
    case = cohort["cases"][0]
    r = client.get(f"/v1/cohorts/{cohort_id}/cases/{case}/preview.png", headers=A)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    rgb = np.asarray(img.convert("RGB"))
    assert img.width > 16 and (rgb == (255, 40, 40)).all(-1).any()  # the outline is drawn
    again = client.get(f"/v1/cohorts/{cohort_id}/cases/{case}/preview.png", headers=A)
    assert again.content == r.content  # served from the cache
    missing = client.get(f"/v1/cohorts/{cohort_id}/cases/nope/preview.png", headers=A)
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert client.get(f"/v1/cohorts/{cohort_id}/cases/{case}/preview.png", headers=B).status_code == 404
    assert client.get(f"/v1/cohorts/{cohort_id}/cases/{case}/preview.png").status_code == 401
