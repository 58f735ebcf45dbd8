"""The training library modules stay pure: no orchestration, storage clients or pipeline code at import."""

import subprocess
import sys

MODULES = ["dinov2_core.train.ssl_meta_arch", "dinov2_core.train.distill_meta_arch", "dinov2_core.train.fsdp",
           "dinov2_core.train.checkpoint", "dinov2_core.train.loop", "dinov2_core.config",
           "dinov2_core.data.loader"]
FORBIDDEN = ["prefect", "dvc", "great_expectations", "boto3", "botocore", "s3fs", "fsspec", "tasks", "flows"]


def test_training_modules_import_nothing_forbidden():
    code = (f"import sys\nfor m in {MODULES!r}: __import__(m)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
