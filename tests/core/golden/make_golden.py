"""Regenerate the golden fixtures from a checkout of the reference DINOv2 implementation.

    git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/dinov2_official
    python tests/core/golden/make_golden.py --official /tmp/dinov2_official --commit <sha>

Builds each reference model and ours, loads the same seeded weights into both (``deterministic_state_dict``, so a
successful strict load also proves the state-dict keys agree), runs the reference on seeded inputs and stores small
digests of its outputs plus the reference loss values. Nothing from the reference is stored but numbers.

Reference list inputs (forward_features on a list) need xformers; here the reference runs each tensor separately,
which is what the packed path computes in eval mode.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="path of a reference checkout (contains dinov2/)")
    ap.add_argument("--commit", default=None, help="reference commit hash (recorded in the fixtures)")
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args()

    os.environ["XFORMERS_DISABLED"] = "1"  # the reference then uses torch SDPA / plain SwiGLU
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, os.path.abspath(args.official))

    import warnings

    warnings.filterwarnings("ignore")
    import spec
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from dinov2.layers import DINOHead as RefHead
    from dinov2.layers import MemEffAttention as RefMemEff
    from dinov2.layers import NestedTensorBlock as RefBlock
    from dinov2.loss import DINOLoss as RefDINOLoss
    from dinov2.loss import KoLeoLoss as RefKoLeo
    from dinov2.loss import iBOTPatchLoss as RefIBOT
    from dinov2.models.vision_transformer import DinoVisionTransformer as RefViT

    from dinov2_core.heads import DINOHead
    from dinov2_core.models import DinoVisionTransformer, deterministic_state_dict

    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.check_output(
                ["git", "-C", args.official, "rev-parse", "HEAD"], text=True
            ).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    torch.set_grad_enabled(False)

    # ------------------------------------------------------------------------------------------ backbones
    vit_out = {}
    for name, cfg in spec.MODEL_CONFIGS.items():
        ref = RefViT(block_fn=partial(RefBlock, attn_class=RefMemEff), **cfg).eval()
        ours = DinoVisionTransformer(**cfg).eval()
        sd = deterministic_state_dict(ours, spec.WEIGHT_SEED)
        ref.load_state_dict(sd, strict=True)
        ours.load_state_dict(sd, strict=True)
        per_case = {}
        for case in spec.CASES_PER_MODEL[name]:
            xs, ms = spec.case_inputs(case, cfg["patch_size"])
            ref_outs = [ref.forward_features(x, masks=m) for x, m in zip(xs, ms)]
            our_outs = ours.forward_features(xs, ms) if len(xs) > 1 else [ours.forward_features(xs[0], ms[0])]
            diff = max(
                (a[k] - b[k]).abs().max().item()
                for a, b in zip(ref_outs, our_outs)
                for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm")
            )
            print(f"{name:18s} {case:12s} max|ref-ours| = {diff:.2e}")
            per_case[case] = [spec.summarize_features(o) for o in ref_outs]
        if name in spec.INTERMEDIATE_MODELS:
            for call, (case, kw) in spec.INTERMEDIATE_CALLS.items():
                (x,), _ = spec.case_inputs(case, cfg["patch_size"])
                res = ref.get_intermediate_layers(x, **kw)
                mine = ours.get_intermediate_layers(x, **kw)
                a = res[0][0] if kw.get("return_class_token") else res[0]
                b = mine[0][0] if kw.get("return_class_token") else mine[0]
                print(f"{name:18s} {call:20s} max|ref-ours| = {(a - b).abs().max().item():.2e}")
                per_case[f"intermediate/{call}"] = spec.summarize_intermediate(res)
        vit_out[name] = per_case

    # ------------------------------------------------------------------------------------------ losses
    with tempfile.TemporaryDirectory() as tmp:  # the reference iBOT Sinkhorn-Knopp needs a process group
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        inp = spec.loss_inputs()
        T, K, _B, NL = spec.TEACHER_TEMP, spec.LOSS_K, spec.LOSS_B, spec.LOSS_N_LOCAL
        losses: dict = {}

        dl = RefDINOLoss(K)
        p1 = dl.softmax_center_teacher(inp["teacher_global_1"], T)
        dl.update_center(inp["teacher_global_1"])
        p2 = dl.softmax_center_teacher(inp["teacher_global_2"], T)
        dl.update_center(inp["teacher_global_2"])
        dl.apply_center_update()
        losses["dino_center_probs_1"] = p1
        losses["dino_center_probs_2"] = p2
        losses["dino_center_after"] = dl.center.clone()

        def ref_multicrop(probs):
            # the reference training step: teacher crops swapped so student view A meets teacher view B
            a, b = probs.chunk(2)
            rev = torch.cat((b, a))
            n_terms = 2 * 1 + 2 * NL
            local = dl(inp["student_local"].chunk(NL), rev.view(2, -1, K)) / n_terms
            glob = dl([inp["student_global"]], [rev]) * 2 / n_terms
            return glob, local

        losses["dino_multicrop_center"] = torch.stack(ref_multicrop(p2))
        q = dl.sinkhorn_knopp_teacher(inp["teacher_global_1"], T)
        losses["dino_sk_q"] = q
        losses["dino_multicrop_sk"] = torch.stack(ref_multicrop(q))
        losses["dino_forward_pair"] = dl([inp["student_global"]], [p2])

        il = RefIBOT(K)
        m = inp["masks"]
        t1 = inp["teacher_patch_1"][m].unsqueeze(0)
        t2 = inp["teacher_patch_2"][m].unsqueeze(0)
        il.softmax_center_teacher(t1, T).squeeze(0)
        il.update_center(t1)
        ip2 = il.softmax_center_teacher(t2, T).squeeze(0)
        il.update_center(t2)
        il.apply_center_update()
        losses["ibot_center_probs_2"] = ip2
        losses["ibot_center_after"] = il.center.clone()
        M = int(m.sum())
        weight = (1 / m.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(m)[m]
        s_masked = inp["student_patch"][m]
        losses["ibot_forward_masked"] = il.forward_masked(
            s_masked, ip2, m, n_masked_patches=M, masks_weight=weight
        )
        losses["ibot_forward_masked_default_weight"] = il.forward_masked(s_masked, ip2, m)
        padded = torch.cat([s_masked, torch.zeros(5, K)])
        padded_t = torch.cat([ip2, torch.zeros(5, K)])
        losses["ibot_forward_masked_padded"] = il.forward_masked(
            padded, padded_t, m, n_masked_patches=M, masks_weight=weight
        )
        dense_t = F.softmax((inp["teacher_patch_2"] - il.center) / T, dim=-1)
        losses["ibot_forward_dense"] = il.forward(inp["student_patch"], dense_t, m)
        losses["ibot_sk_q"] = il.sinkhorn_knopp_teacher(
            inp["teacher_patch_1"][m], T, n_masked_patches_tensor=torch.tensor([M])
        )

        kl = RefKoLeo()
        with torch.enable_grad():
            for k in ("koleo_x", "koleo_pair", "koleo_dup"):
                losses[k] = kl(inp[k]).detach()
        dist.destroy_process_group()

    head = DINOHead(**spec.HEAD_KWARGS)
    ref_head = RefHead(**spec.HEAD_KWARGS)
    hsd = deterministic_state_dict(head, spec.WEIGHT_SEED)
    ref_head.load_state_dict(hsd, strict=True)
    head.load_state_dict(hsd, strict=True)
    losses["head_out"] = ref_head(inp["head_x"])
    print("head max|ref-ours| =", (losses["head_out"] - head(inp["head_x"])).abs().max().item())

    meta = {
        "official_repo": "facebookresearch/dinov2",
        "official_commit": commit,
        "torch": str(torch.__version__),
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "weight_seed": spec.WEIGHT_SEED,
        "note": "reference list inputs were run tensor by tensor (its packed path needs xformers)",
    }
    out = Path(args.out)
    torch.save({"meta": meta, "outputs": vit_out}, out / "vit_outputs.pt")
    torch.save(
        {"meta": meta, "values": {k: v.detach().clone() for k, v in losses.items()}}, out / "losses.pt"
    )
    total = sum((out / f).stat().st_size for f in ("vit_outputs.pt", "losses.pt"))
    print(f"wrote {out}/vit_outputs.pt, losses.pt ({total / 1e6:.2f} MB), official commit {commit}")


if __name__ == "__main__":
    main()
