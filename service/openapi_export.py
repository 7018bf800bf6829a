"""Write openapi/openapi.json from the app: ``python -m service.openapi_export`` (`make openapi`).

tests/service/test_openapi.py fails when the committed file differs from what the app generates.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.main import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "openapi" / "openapi.json"


def render() -> str:
    # the schema does not depend on settings; these only let the app build without a server
    app = create_app(
        Settings(redis_url="redis://127.0.0.1:1/0", api_keys="doc:doc", data_dir=Path("/nonexistent"))
    )
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(ROOT)}")
