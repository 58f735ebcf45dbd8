"""Pre-training from Python with the library alone: `dinov2_core.train.engine.run_training` on a plain process (no
torchrun, no pipeline params), then a rerun that resumes instead of retraining. Run in a subprocess that checks no
module of the pipeline (`tasks`, `flows`) was imported, so the library's independence is what is tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, sys
from pathlib import Path

import numpy as np

from dinov2_core.hub import load_export
from dinov2_core.config import BackboneConfig, HeadConfig, LossConfig, OptimConfig
from dinov2_core.config import DataConfig, MultiCropConfig
from dinov2_core.train.engine import TrainSpec, run_training
from dinov2_core.train.export import export_ssl
from dinov2_core.train.ssl_meta_arch import SSLMetaArch
from tests.train._shards import png_bytes, write_shards

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
images = [png_bytes(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(48)]
index = write_shards(out / "shards", images, per_shard=16)
bb = BackboneConfig(patch_size=14, img_size=56, depth=2, embed_dim=64, num_heads=2, layerscale=None)
head = HeadConfig(n_prototypes=32, hidden_dim=64, bottleneck_dim=32)
loss = LossConfig(dino_head=head, ibot_head=head)
optim = OptimConfig(epochs=2, epoch_length=3, warmup_epochs=1, warmup_teacher_temp_epochs=0)
crops = MultiCropConfig(global_crops_size=56, local_crops_size=28, local_crops_number=2)
spec = TrainSpec(
    stage="pretrain", out=out / "run1", build=lambda: SSLMetaArch(bb, loss, n_local_crops=2),
    init_fresh=lambda meta: None,
    export=lambda full, d, step: export_ssl(full, d, step, bb, loss, crops, optim, "pretrain"),
    data=DataConfig(shards=str(index), global_batch_size=8, streams=2), crops=crops, loss=loss, optim=optim,
    checkpoint_every=3, checkpoint_keep=1, digest_payload={"what": "engine test"})
first = run_training(spec)
again = run_training(spec)
model = load_export(out / "run1" / "export" / "model.json", "teacher_backbone.pth")
pipeline = sorted(m for m in sys.modules if m.split(".")[0] in ("tasks", "flows"))
print(json.dumps({"first": first, "again": again, "embed_dim": model.embed_dim, "pipeline_modules": pipeline}))
'''


def test_pretraining_runs_from_the_library_alone(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pipeline_modules"] == []
    assert result["first"]["iterations_run"] == 6 and result["first"]["resumed_from"] == 0
    # the rerun finds the final checkpoint of the same configuration: nothing to train, the export is rewritten
    assert result["again"]["resumed_from"] == 6 and result["again"]["iterations_run"] == 0
    assert result["embed_dim"] == 64
    log = (tmp_path / "run1" / "run" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 6
