"""Throughput of cfdpo's training and generation paths against the plain TRL / transformers
baselines, measured on the same pairs and prompts in one run.

    .venv/bin/python bench/run.py --pairs 64 --prompts 32      (or: make bench)

Every path runs in its own subprocess (same environment, same thread count), so peak memory is
per path and one path's warm caches do not help the next. Results: bench/results/<stamp>.json/.md.

Training paths (same pairs, same LoRA / beta / learning rate / batch / epochs, from recipes/pirate.yaml):
  trl-default   TRL DPOTrainer with DPOConfig's defaults on this machine (on CPU: bf16=True and
                gradient_checkpointing=True are TRL's defaults), reference forward every step
  trl-fp32      the same with bf16=False (the issue's fp32 baseline)
  cfdpo         cfdpo.train.train_dpo with cfdpo's default DPOSpec performance settings
  extra paths with --train: cfdpo-precompute (cfdpo + precompute_ref_log_probs), cfdpo-bf16 / cfdpo-fp32
                (cfdpo with bf16 forced on / off), cfdpo-trlhead (cfdpo with TRL's own LM-head kernel),
                cfdpo-noshare (chosen and rejected rows each run the prompt, as in TRL), cfdpo-loracast
                (PEFT's fp32 cast of the LoRA inputs kept), cfdpo-sdpa (the packed rows' attention through
                torch's sdpa kernel also when training, instead of matmuls)
Generation paths (same prompts, same sampling: temperature 0.7, top_p 0.9, --new-tokens):
  naive         model.generate one prompt at a time, fp32 (on the first --naive-prompts prompts)
  hf-batch16    model.generate batched 16, fp32, tokenizer left padding, defaults otherwise
  cfdpo         cfdpo.backends.transformers.generate_answers with GenerationSpec defaults (dtype auto, batch size)
  extra path with --generate: cfdpo-fp32 (the same with dtype float32)

Quality of each training path: after training, in the same process, the adapter and the reference
(adapter disabled) score every pair in fp32: reward accuracy (policy margin > reference margin) and
mean DPO loss, so every path is judged by the same arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SAMPLING = dict(temperature=0.7, top_p=0.9)
TRAIN_PATHS = ["trl-default", "trl-fp32", "cfdpo"]
TRAIN_EXTRA = ["cfdpo-precompute", "cfdpo-bf16", "cfdpo-fp32", "cfdpo-trlhead", "cfdpo-noshare", "cfdpo-loracast", "cfdpo-sdpa"]
GEN_PATHS = ["naive", "hf-batch16", "cfdpo"]
GEN_EXTRA = ["cfdpo-fp32"]
SPEC_PATHS = {"cfdpo-precompute": {"precompute_ref_log_probs": True}, "cfdpo-bf16": {"bf16": True},
              "cfdpo-fp32": {"bf16": False}}
KERNEL_PATHS = {
    "cfdpo-trlhead": {"lm_head": False},  # TRL's fused-head kernel instead of cfdpo's CPU LM head
    "cfdpo-noshare": {"shared_prompt": False},  # cfdpo's LM head; chosen and rejected each run their own prompt
    "cfdpo-loracast": {"bf16_lora_inputs": False},  # PEFT's fp32 cast of the LoRA inputs left on
    "cfdpo-sdpa": {"eager_max_scores": 0},  # torch's sdpa kernel for the packed rows' attention, also with gradients
}


def kernel_switches(path: str):
    """The CPU training kernels of a cfdpo training path: all of them, or all but the one it measures."""
    from cfdpo.cpu_kernels import CpuKernels

    return CpuKernels(**KERNEL_PATHS.get(path, {}))


def dpo_spec(**over):
    from cfdpo.spec import DPOSpec

    d = common.pirate_recipe().dpo
    knobs = {k: getattr(d, k) for k in ("beta", "learning_rate", "epochs", "batch_size", "max_length",
                                         "lora_r", "lora_alpha", "lora_targets", "seed")}
    return DPOSpec(**{**knobs, **over})


# ---------------------------------------------------------------- training workers


def _pair_scores(model, tok, ds, beta: float) -> dict:
    """fp32 reward accuracy and mean DPO loss of a PEFT model on the pairs (adapter on vs off).

    The reference margins (adapter off) are the same for every path: cached in bench/.cache."""
    import hashlib

    import torch

    def logp(prompt, answer):
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(prompt + answer, tokenize=True, return_dict=False)
        p = p["input_ids"] if isinstance(p, dict) else p
        ids = torch.tensor([full["input_ids"] if isinstance(full, dict) else full])
        out = model(input_ids=ids).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
        return float(out.gather(-1, ids[0, len(p) :, None]).sum())

    def margin(ex):
        return logp(ex["prompt"], ex["chosen"]) - logp(ex["prompt"], ex["rejected"])

    cache_file = common.CACHE / "ref_margins.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    model = model.float().eval()
    acc, loss = 0, 0.0
    with torch.inference_mode():
        for ex in ds:
            key = hashlib.sha256(json.dumps(ex, sort_keys=True).encode()).hexdigest()[:24]
            if key not in cache:
                with model.disable_adapter():
                    cache[key] = margin(ex)
            m = beta * (margin(ex) - cache[key])
            acc += m > 0
            loss += float(torch.nn.functional.softplus(torch.tensor(-m)))
    cache_file.write_text(json.dumps(cache))
    return {"reward_accuracy": acc / len(ds), "final_loss": loss / len(ds)}


def _seq_tokens(tok, ds) -> int:
    """Tokens the trainer runs through per epoch: prompt+chosen and prompt+rejected, unpadded."""
    n = 0
    for ex in ds:
        for side in ("chosen", "rejected"):
            ids = tok.apply_chat_template(ex["prompt"] + ex[side], tokenize=True, return_dict=False)
            n += len(ids["input_ids"] if isinstance(ids, dict) else ids)
    return n


def train_worker(path: str, n_pairs: int, n_score: int, workdir: Path) -> dict:
    import torch

    from cfdpo.models import load_model, load_tokenizer, resolve_model

    model_path = resolve_model("smollm2-135m")
    ds = common.bench_pairs(n_pairs, model_path)
    tok = load_tokenizer(model_path)
    spec = dpo_spec()
    t0 = time.perf_counter()
    if path.startswith("trl-"):
        from trl import DPOConfig, DPOTrainer

        from cfdpo.train import lora_config

        extra = {"bf16": False} if path == "trl-fp32" else {}
        args = DPOConfig(output_dir=str(workdir), use_cpu=not torch.cuda.is_available(),
                         per_device_train_batch_size=spec.batch_size, num_train_epochs=spec.epochs,
                         learning_rate=spec.learning_rate, beta=spec.beta, max_length=spec.max_length,
                         seed=spec.seed, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                         **extra)
        trainer = DPOTrainer(model=load_model(model_path, "float32"), args=args, train_dataset=ds,
                             processing_class=tok, peft_config=lora_config(spec))
        trainer.train()
        seconds = time.perf_counter() - t0
        model, settings = trainer.model, {"bf16": args.bf16, "weights": "float32", "gradient_checkpointing": args.gradient_checkpointing,
                                          "precompute_ref_log_probs": args.precompute_ref_log_probs}
        log = trainer.state.log_history
    else:
        from peft import PeftModel

        from cfdpo.runtime import bf16_supported, train_dtype
        from cfdpo.train import train_dpo

        spec = dpo_spec(**SPEC_PATHS.get(path, {}))
        adapter = train_dpo(model_path, ds, spec, workdir / "adapter", kernels=kernel_switches(path))
        seconds = time.perf_counter() - t0
        log = json.loads((adapter / "train_log.json").read_text())["log_history"]
        model = PeftModel.from_pretrained(load_model(model_path, "float32"), str(adapter))
        settings = {"bf16": bf16_supported() if spec.bf16 is None else spec.bf16, "weights": train_dtype(spec),
                    "gradient_checkpointing": False,
                    "precompute_ref_log_probs": spec.precompute_ref_log_probs}
    losses = [e["loss"] for e in log if "loss" in e]
    scores = _pair_scores(model, tok, ds.select(range(min(n_score, len(ds)))), spec.beta)
    return {"path": path, "seconds": seconds, "pairs": len(ds), "tokens": _seq_tokens(tok, ds),
            "mean_train_loss": sum(losses) / max(len(losses), 1), "settings": settings,
            "n_params": common.n_params(load_model(model_path, "float32")), "peak_rss_mb": common.peak_rss_mb(),
            **scores}


# ---------------------------------------------------------------- generation workers


def _count_new(seqs, stop_ids) -> int:
    """New tokens per sequence up to and including the first stop token."""
    import torch

    n = 0
    for s in seqs:
        hit = torch.isin(s, stop_ids).nonzero()
        n += int(hit[0]) + 1 if len(hit) else len(s)
    return n


def gen_worker(path: str, n_prompts: int, n_naive: int, new_tokens: int) -> dict:
    import torch

    from cfdpo.counterfactual import messages
    from cfdpo.models import load_model, load_tokenizer, resolve_model

    model_path = resolve_model("smollm2-135m")
    behaviour = common.pirate_recipe().behaviour
    convs = [messages(p["prompt"], "control", behaviour) for p in common.bench_prompts(n_prompts, offset=0)]
    tok = load_tokenizer(model_path)
    tok.padding_side = "left"
    stop_ids = torch.tensor(sorted({tok.pad_token_id, tok.eos_token_id}))
    if path.startswith("cfdpo"):
        from cfdpo.backends.transformers import generate_answers
        from cfdpo.generate import GenParams
        from cfdpo.runtime import resolve_dtype
        from cfdpo.spec import GenerationSpec

        g = GenerationSpec(dtype="float32") if path == "cfdpo-fp32" else GenerationSpec()
        dtype = resolve_dtype(g.dtype)
        model = load_model(model_path, dtype)
        counts, texts = [], []

        def on_batch(idx, ans, c):
            counts.extend(sum(x) for x in c)
            texts.extend(a[0] for a in ans)

        t0 = time.perf_counter()
        generate_answers(model, tok, convs, GenParams(new_tokens, **SAMPLING), [1] * len(convs), g.batch_size, 0,
                         on_batch)
        seconds, tokens, settings = time.perf_counter() - t0, sum(counts), {"dtype": dtype, "batch_size": g.batch_size}
    else:
        model = load_model(model_path, "float32")
        if path == "naive":
            convs, bs = convs[:n_naive], 1
        else:
            bs = 16
        inputs = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
        tokens, outs = 0, []
        t0 = time.perf_counter()
        for b in range(0, len(inputs), bs):
            enc = tok(inputs[b : b + bs], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=True, top_k=0,
                                     pad_token_id=tok.pad_token_id, **SAMPLING)
            tokens += _count_new(out[:, enc["input_ids"].shape[1] :], stop_ids)
            outs.extend(out[:, enc["input_ids"].shape[1] :])
        seconds, settings = time.perf_counter() - t0, {"dtype": "float32", "batch_size": bs}
        texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    from cfdpo.scorers import make_scorer

    sc = common.pirate_recipe().behaviour.scorer
    scores = make_scorer(sc.name, sc.params).score_many(texts)
    return {"path": path, "seconds": seconds, "prompts": len(convs), "new_tokens": tokens, "settings": settings,
            "n_params": common.n_params(model), "peak_rss_mb": common.peak_rss_mb(),
            "pirate_score": sum(scores) / len(scores), "mean_words": sum(len(t.split()) for t in texts) / len(texts)}


# ---------------------------------------------------------------- driver


def run_worker(kind: str, path: str, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{kind}:{path}", "--worker-out", str(out),
           "--pairs", str(args.pairs), "--prompts", str(args.prompts), "--naive-prompts", str(args.naive_prompts),
           "--new-tokens", str(args.new_tokens), "--score-pairs", str(args.score_pairs)]
    print(f"[bench] {kind} {path} ...", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        print(f"[bench] {kind} {path} failed (exit {proc.returncode}); left out of the summary", flush=True)
        return None
    res = json.loads(out.read_text())
    print(f"[bench] {kind} {path}: {res['seconds']:.1f} s (process {time.perf_counter() - t:.0f} s)", flush=True)
    return res


def summarise(res: dict) -> str:
    peak32, peak16 = res["peak_gflops"]["float32"], res["peak_gflops"]["bfloat16"]
    lines = [f"# cfdpo bench {res['stamp']}", "",
             f"`{res['command']}` on {res['cpus']} CPUs (torch threads {res['threads']}, load average at start "
             f"{res['loadavg']}, OMP_WAIT_POLICY {res.get('env', {}).get('OMP_WAIT_POLICY') or 'unset'}, every path); "
             f"matmul peak {peak32:.0f} GFLOP/s fp32, {peak16:.0f} GFLOP/s bf16.", ""]
    train = res.get("train", {})
    if train:
        base = train.get("trl-default")
        lines += ["## DPO training", "",
                  "| path | bf16 | base weights | grad ckpt | precompute ref | s | pairs/s | × trl-default | × trl-fp32 "
                  "| util fp32 | util bf16 | peak RSS MB | reward acc | final loss | mean train loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in train.items():
            s = r["settings"]
            pps = r["pairs"] / r["seconds"]
            flops = 8 * r["n_params"] * r["tokens"] * dpo_epochs() / r["seconds"] / 1e9
            rel = lambda k, pps=pps: f"{pps / (train[k]['pairs'] / train[k]['seconds']):.2f}" if k in train else "-"  # noqa: E731
            lines.append(f"| {name} | {s['bf16']} | {s.get('weights', 'float32')} | {s['gradient_checkpointing']} | {s['precompute_ref_log_probs']} "
                         f"| {r['seconds']:.0f} | {pps:.3f} | {rel('trl-default')} | {rel('trl-fp32')} "
                         f"| {flops / peak32:.0%} | {flops / peak16:.0%} | {r['peak_rss_mb']:.0f} "
                         f"| {r['reward_accuracy']:.2f} | {r['final_loss']:.3f} | {r['mean_train_loss']:.3f} |")
        if base:
            lines += ["", f"{base['pairs']} pairs, {base['tokens']} tokens per epoch (prompt+chosen, prompt+rejected); "
                      "utilisation counts 6·N·tokens (policy forward+backward) + 2·N·tokens (reference forward); "
                      f"reward accuracy / final loss: fp32 scoring of the first {res['score_pairs']} pairs after training.", ""]
    gen = res.get("generate", {})
    if gen:
        lines += ["## Generation", "", "| path | dtype | batch | s | new tok/s | × naive | × hf-batch16 | util fp32 "
                  "| util bf16 | peak RSS MB | pirate score | words |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in gen.items():
            tps = r["new_tokens"] / r["seconds"]
            rel = lambda k, tps=tps: f"{tps / (gen[k]['new_tokens'] / gen[k]['seconds']):.2f}" if k in gen else "-"  # noqa: E731
            flops = 2 * r["n_params"] * tps / 1e9
            lines.append(f"| {name} | {r['settings']['dtype']} | {r['settings']['batch_size']} | {r['seconds']:.1f} "
                         f"| {tps:.1f} | {rel('naive')} | {rel('hf-batch16')} | {flops / peak32:.0%} | {flops / peak16:.0%} "
                         f"| {r['peak_rss_mb']:.0f} | {r['pirate_score']:.3f} | {r['mean_words']:.1f} |")
        lines += ["", "Utilisation counts 2·N·new tokens; sampling: temperature 0.7, top_p 0.9, "
                  f"{res['new_tokens']} new tokens at most; pirate score (recipes/pirate.yaml lexicon, per answer) and "
                  "mean words of the control answers show the sampled text is alike across paths.", ""]
    return "\n".join(lines)


def dpo_epochs() -> float:
    return float(dpo_spec().epochs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--naive-prompts", type=int, default=8, help="prompts for the one-at-a-time baseline")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--score-pairs", type=int, default=32, help="pairs scored in fp32 after training")
    ap.add_argument("--train", default=",".join(TRAIN_PATHS), help="training paths, comma-separated ('' for none)")
    ap.add_argument("--generate", default=",".join(GEN_PATHS), help="generation paths, comma-separated ('' for none)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for flag, known in (("train", TRAIN_PATHS + TRAIN_EXTRA), ("generate", GEN_PATHS + GEN_EXTRA)):
        bad = [p for p in getattr(args, flag).split(",") if p and p not in known]
        if bad:
            ap.error(f"--{flag}: unknown path {bad[0]!r}; known: {', '.join(known)}")
    if args.worker:
        kind, path = args.worker.split(":")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="cfdpo-bench-") as tmp:
            res = (train_worker(path, args.pairs, args.score_pairs, Path(tmp)) if kind == "train"
                   else gen_worker(path, args.prompts, args.naive_prompts, args.new_tokens))
        Path(args.worker_out).write_text(json.dumps(res))
        return

    import torch

    from cfdpo.models import resolve_model
    from cfdpo.runtime import usable_cpus

    stamp = time.strftime("%Y%m%d-%H%M%S")
    res = {"stamp": stamp, "command": "bench/run.py " + " ".join(sys.argv[1:]), "cpus": usable_cpus(),
           "threads": torch.get_num_threads(), "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
           "new_tokens": args.new_tokens, "score_pairs": args.score_pairs,
           "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}}
    res["peak_gflops"] = {d: common.matmul_peak(d) for d in ("float32", "bfloat16")}
    print(f"[bench] matmul peak: {res['peak_gflops']}", flush=True)
    model_path = resolve_model("smollm2-135m")
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = common.RESULTS / f".{stamp}-worker.json"
    if args.train:
        common.bench_pairs(args.pairs, model_path)  # generate and cache the pairs before any timing
    if args.generate:
        res["generate"] = {p: r for p in args.generate.split(",") if (r := run_worker("gen", p, args, tmp))}
    if args.train:
        res["train"] = {p: r for p in args.train.split(",") if (r := run_worker("train", p, args, tmp))}
    tmp.unlink(missing_ok=True)
    md = summarise(res)
    (common.RESULTS / f"{stamp}.json").write_text(json.dumps(res, indent=1))
    (common.RESULTS / f"{stamp}.md").write_text(md)
    print(md)
    print(f"[bench] wrote bench/results/{stamp}.json and .md")


if __name__ == "__main__":
    main()
