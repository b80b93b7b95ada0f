"""Peak memory per role: ``--roles split`` against monolithic on a model whose text encoder is
large relative to its denoiser (the Flux / Wan shape: T5-XXL or UMT5-XXL beside a smaller
transformer), so that the denoiser role's peak shows what it no longer holds.

The model: tiny-sd's directory with its CLIP text encoder widened to hidden 1024 x 16 layers
(seeded random weights, ~216M parameters, ~0.86 GB float32) beside tiny-sd's UNet (~0.1M),
written with save_pretrained and loaded through the same from_pretrained path as a user's model.

    python -m tests.benchmarks.bench_roles [--prompts 8] [--steps 4]

Prints the weights per component and, per role, peak RSS (summary.json ``roles``) and how far
below the monolithic rank's it is (the denoiser's should be about the text encoder's weights), and
writes tests/benchmarks/results/bench-roles.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench-roles.json"


def build_model(dest: Path) -> dict[str, int]:
    """tiny-sd with a wide text encoder at ``dest``; bytes of weights per component."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.loading import resolve_model

    shutil.copytree(resolve_model("tiny-sd").path, dest)
    config = CLIPTextConfig.from_pretrained(dest / "text_encoder")
    config.hidden_size, config.intermediate_size = 1024, 4096
    config.num_hidden_layers, config.num_attention_heads, config.projection_dim = 16, 16, 1024
    torch.manual_seed(0)
    shutil.rmtree(dest / "text_encoder")
    CLIPTextModel(config).save_pretrained(dest / "text_encoder")
    # the UNet's cross-attention must take the wider text states
    unet = json.loads((dest / "unet" / "config.json").read_text())
    unet["cross_attention_dim"] = 1024
    (dest / "unet" / "config.json").write_text(json.dumps(unet))
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    shutil.rmtree(dest / "unet")
    UNet2DConditionModel(**{k: v for k, v in unet.items() if not k.startswith("_")}).save_pretrained(dest / "unet")
    return {c: sum(f.stat().st_size for f in (dest / c).glob("*.safetensors")) for c in ("text_encoder", "unet", "vae")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = build_model(root / "wide-te-sd")
        pq.write_table(pa.table({"prompt": [f"a photo of object {i}" for i in range(args.prompts)]}), root / "m.parquet")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        found = {}
        for name, extra in (("monolithic", []), ("split", ["--roles", "split"])):
            cmd = ["gen", "batch", str(root / "m.parquet"), "--out", str(root / name), "--model", str(root / "wide-te-sd"),
                   "--steps", str(args.steps), "--batch-size", "4", *extra]  # fmt: skip
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            summary = json.loads((root / name / "summary.json").read_text())
            found[name] = {"roles": summary["roles"], "generate_wall_s": summary["generate_wall_s"]}
    mib = 2**20
    print("weights (MiB): " + ", ".join(f"{k} {v / mib:.1f}" for k, v in weights.items()))
    mono = found["monolithic"]["roles"]["monolithic"]["peak_rss_bytes"]
    print(f"{'run':<11} {'role':<11} {'peak RSS MiB':>12} {'monolithic - this':>18}")
    for name, run in found.items():
        for role, r in run["roles"].items():
            print(f"{name:<11} {role:<11} {r['peak_rss_bytes'] / mib:>12.0f} {(mono - r['peak_rss_bytes']) / mib:>18.0f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"weights_bytes": weights, "runs": found}, indent=1))


if __name__ == "__main__":
    main()
