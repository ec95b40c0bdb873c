"""New tokens/s of cfdpo's generation backends on a GPU, same conversations and sampling.

    python bench/gpu_bench.py --model smollm2-135m|MODEL_DIR --backends transformers,vllm

Called by bench/gpu_bench.sh. Conversations: the pirate recipe's control and negative versions of
the builtin 'general' prompts (--prompts of them), --samples answers each, temperature 0.7,
top_p 0.9, --new-tokens at most. Results go to $OUT/gpu_bench.json and .md after each backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backends", default="transformers,vllm")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=96)
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "gpu-bench-out"))
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from cfdpo.backends.transformers import TransformersGenerator
    from cfdpo.counterfactual import messages
    from cfdpo.generate import GenParams
    from cfdpo.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(args.model)
    behaviour = common.pirate_recipe().behaviour
    prompts = common.bench_prompts(args.prompts)
    convs = [messages(p["prompt"], c, behaviour) for p in prompts for c in ("control", "negative")]
    params = GenParams(args.new_tokens, 0.7, 0.9)
    tok = load_tokenizer(path)
    tok.padding_side = "left"
    res = {"model": args.model, "gpu": torch.cuda.get_device_name(0), "conversations": len(convs),
           "samples": args.samples, "new_tokens_max": args.new_tokens, "runs": []}

    def measure(name, generator, batch_size):
        counts, answers = [], []

        def on_batch(idx, ans, c):
            counts.extend(sum(x) for x in c)
            answers.extend(a for group in ans for a in group)

        torch.cuda.synchronize()
        t = time.perf_counter()
        generator.generate_answers(tok, convs, params, [args.samples] * len(convs), batch_size, 0, on_batch)
        torch.cuda.synchronize()
        s = time.perf_counter() - t
        row = {"backend": name, "batch_size": batch_size, "seconds": s, "new_tokens": sum(counts),
               "tok_per_s": sum(counts) / s, "answers": len(answers),
               "mean_words": sum(len(a.split()) for a in answers) / max(len(answers), 1)}
        res["runs"].append(row)
        print(f"RESULT {name} batch {batch_size}: {row['tok_per_s']:.0f} new tok/s "
              f"({row['new_tokens']} tokens, {s:.1f} s)", flush=True)
        write(out, res)

    backends = args.backends.split(",")
    if "transformers" in backends:
        t = time.perf_counter()
        model = load_model(path, "bfloat16").to("cuda")
        res["transformers_load_s"] = time.perf_counter() - t
        for bs in (64, 256):
            measure("transformers", TransformersGenerator(model), bs)
        del model
        torch.cuda.empty_cache()
    if "vllm" in backends:
        from cfdpo.backends.vllm import VllmGenerator

        t = time.perf_counter()
        gen = VllmGenerator(path, "bfloat16", seed=0, gpu_memory_utilization=0.5)
        res["vllm_start_s"] = time.perf_counter() - t
        measure("vllm", gen, 256)
    base = next((r for r in res["runs"] if r["backend"] == "transformers" and r["batch_size"] == 256), None)
    vl = next((r for r in res["runs"] if r["backend"] == "vllm"), None)
    if base and vl:
        res["vllm_over_transformers"] = vl["tok_per_s"] / base["tok_per_s"]
        print(f"RESULT vllm / transformers(batch 256): {res['vllm_over_transformers']:.1f}x", flush=True)
    write(out, res)


def write(out: Path, res: dict) -> None:
    (out / "gpu_bench.json").write_text(json.dumps(res, indent=1))
    md = [f"# gpu bench: {res['gpu']}, model {res['model']}", "",
          f"{res['conversations']} conversations x {res['samples']} samples, up to {res['new_tokens_max']} new tokens, "
          "temperature 0.7, top_p 0.9", "", "| backend | batch | s | new tokens | new tok/s | mean words |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['backend']} | {r['batch_size']} | {r['seconds']:.1f} | {r['new_tokens']} | {r['tok_per_s']:.0f} "
           f"| {r['mean_words']:.1f} |" for r in res["runs"]]
    if "vllm_start_s" in res:
        md += ["", f"vLLM engine start: {res['vllm_start_s']:.0f} s (not in the timings above)"]
    (out / "gpu_bench.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
