"""Hugging Face round trips in one torchrun group (4 ranks): tiny models of each family built with
transformers' own classes, imported with and without growth at TP 4 (the bf16 and tied-OLMo cases at
TP 2), verified against transformers' logits, exported back and compared tensor by tensor. Writes
results.json."""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megaclone.pipeline.clone import CloneConfig, Variant  # noqa: E402
from megaclone.pipeline.expand import expand  # noqa: E402
from megaclone.pipeline.to_hf import expand_to_hf  # noqa: E402
from megaclone.export import export_hf  # noqa: E402
from megaclone.runtime import init_distributed  # noqa: E402
from megaclone.shape.request import Depth, Factors  # noqa: E402
from megaclone.check.logits import verify  # noqa: E402


def configs():
    import transformers as T

    small = dict(vocab_size=100, num_hidden_layers=2, max_position_embeddings=64)
    return {
        # untied, GQA, saved as two shards with an index
        "llama": (T.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=8, num_key_value_heads=4,
                                rms_norm_eps=1e-5, **small), "12KB"),
        # Llama's layout under another model_type (sliding window longer than the test sequences)
        "mistral": (T.MistralConfig(hidden_size=32, intermediate_size=48, num_attention_heads=8, num_key_value_heads=4,
                                    sliding_window=64, **small), None),
        # q/k/v biases, tied embeddings
        "qwen2": (T.Qwen2Config(hidden_size=32, intermediate_size=48, num_attention_heads=8, num_key_value_heads=4,
                                tie_word_embeddings=True, **small), None),
        # per-head q/k RMSNorm (megatron-core's qk_layernorm), head_dim apart from hidden/heads, tied
        "qwen3": (T.Qwen3Config(hidden_size=32, intermediate_size=48, num_attention_heads=8, num_key_value_heads=4,
                                head_dim=8, tie_word_embeddings=True, **small), None),
        # Conv1D transposes, learned positions, tanh GeLU, tied
        "gpt2": (T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                              bos_token_id=0, eos_token_id=0), None),
        # the paper's family: ReLU, learned positions at offset 2, biases everywhere, tied
        "opt": (T.OPTConfig(hidden_size=32, ffn_dim=48, num_attention_heads=4, word_embed_proj_dim=32, **small), None),
        # non-parametric LayerNorm (weight 1, bias 0 in Megatron), SwiGLU, GQA, untied
        "olmo": (T.OlmoConfig(hidden_size=32, intermediate_size=48, num_attention_heads=8, num_key_value_heads=4,
                              tie_word_embeddings=False, **small), None),
        # fused per-head QKV, partial rotary, biases (sequential residual: see the README)
        "gpt_neox": (T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                     use_parallel_residual=False, **small), None),
    }


def make_hf(root: Path, config, shard_size, seed: int) -> None:
    """A transformers model with every parameter perturbed (norms and biases too), saved as safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(root), **kwargs)


# HF rows the import never reads: OPT's two position rows before position 0 (exported as zeros)
UNREAD_ROWS = {"model.decoder.embed_positions.weight": 2}


def safetensors_dir(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def bf16_case(out: Path, rt) -> dict:
    """A bf16 Llama grown 2x (symmetric): stays bf16 and is bit-exact (halving is exact in bf16);
    with --dtype float32 the values are the bf16 ones, widened. Checked on the exported HF tensors
    against W.repeat(2, 2) / 2 computed here."""
    import transformers as T

    config = T.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=8, num_key_value_heads=4,
                           vocab_size=100, num_hidden_layers=1, max_position_embeddings=64)
    src = out / "llama-bf16-hf"
    if rt.is_main:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(11)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(str(src))
    dist.barrier()
    r = {}
    for dtype in (None, torch.float32):
        name = "bf16" if dtype is None else "as-fp32"
        dst, hf_out = out / f"llama-{name}-wide", out / f"llama-{name}-wide-hf"
        expand(src, dst, Factors.uniform(2), 2, overwrite=True, load_format="hf", dtype=dtype)
        if dtype is None:
            checked = verify(None, dst, src_hf=src)
            r["verify_rel"], r["verify_tol"] = max(x.max_rel for x in checked), checked[0].tol
        export_hf(dst, hf_out, overwrite=True)
        if rt.is_main:
            a, b = safetensors_dir(src), safetensors_dir(hf_out)
            checks = {}
            for key in ("mlp.down_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.weight"):
                w = a[f"model.layers.0.{key}"]
                expected = (w.repeat(2, 2) / 2).to(dtype or torch.bfloat16)
                got = b[f"model.layers.0.{key}"]
                checks[key] = got.dtype == expected.dtype and torch.equal(got, expected)
            emb = a["model.embed_tokens.weight"].repeat(1, 2).to(dtype or torch.bfloat16)
            checks["embed"] = torch.equal(b["model.embed_tokens.weight"], emb)
            r[name] = checks
        dist.barrier()
    return r


def olmo_tied_case(out: Path, rt) -> dict:
    """A tied OLMo grown 2x keeps 1/2 in its final norm, which OLMo's non-parametric norm cannot hold:
    --save-hf refuses before writing; grown in Megatron it still verifies against transformers."""
    import transformers as T

    from megaclone.errors import MegacloneError

    src = out / "olmo-tied-hf"
    if rt.is_main:
        make_hf(src, T.OlmoConfig(hidden_size=32, intermediate_size=48, num_attention_heads=8, num_key_value_heads=4,
                                  tie_word_embeddings=True, vocab_size=100, num_hidden_layers=2,
                                  max_position_embeddings=64), None, seed=21)
    dist.barrier()
    r = {}
    try:
        expand_to_hf(src, out / "olmo-tied-wide-hf", Factors.uniform(2), overwrite=True)
    except MegacloneError as exc:
        r["error"] = str(exc)
    r["wrote"] = (out / "olmo-tied-wide-hf" / "config.json").exists()
    expand(src, out / "olmo-tied-wide", Factors.uniform(2), 2, overwrite=True, load_format="hf")
    r["verify_rel"] = max(x.max_rel for x in verify(None, out / "olmo-tied-wide", src_hf=src))
    return r


def main(out: Path) -> None:
    rt = init_distributed()
    results = {}
    for i, (family, (config, shard)) in enumerate(configs().items()):
        src = out / f"{family}-hf"
        if rt.is_main:
            make_hf(src, config, shard, seed=i)
        dist.barrier()
        r = results[family] = {"files": len(list(src.glob("*.safetensors")))}
        # the reader's row maps, plain and grown, at TP 4: the finest split these heads allow (a GPT-2 or
        # GPT-NeoX rank holds one source head); the variants compute on what it read (test_clone.py
        # checks each one's values), so one family runs a noisy variant too
        cases = [(2, 4, "symmetric"), (1, 4, "symmetric")]
        if family == "llama":
            cases.append((2, 4, "noisy-diagonal"))
        for factor, tp, variant in cases:
            dst = out / f"{family}-f{factor}-tp{tp}-{variant}"
            expand(src, dst, Factors.uniform(factor), tp, CloneConfig(Variant(variant), seed=3), overwrite=True,
                   load_format="hf")
            res = verify(None, dst, src_hf=src)
            r[f"f{factor}-tp{tp}-{variant}"] = max(x.max_rel for x in res)
        # back to HF: the plain conversion gives the input tensors exactly; the grown model loads in
        # transformers and computes the source's logits
        export_hf(out / f"{family}-f1-tp4-symmetric", out / f"{family}-roundtrip", overwrite=True)
        export_hf(out / f"{family}-f2-tp4-symmetric", out / f"{family}-wide-hf", overwrite=True)
        # HF to HF in one pass, no Megatron checkpoint; and grown in depth too
        expand_to_hf(src, out / f"{family}-hf2hf", Factors.uniform(2), overwrite=True)
        expand_to_hf(src, out / f"{family}-hf2hf-deep", Factors.uniform(2), depth=Depth(2, "identity", "top"),
                     overwrite=True)
        if rt.is_main:
            from transformers import AutoModelForCausalLM

            a, b = safetensors_dir(src), safetensors_dir(out / f"{family}-roundtrip")
            r["roundtrip_same_names"] = sorted(a) == sorted(b)
            skip = {k: UNREAD_ROWS.get(k, 0) for k in a}
            r["roundtrip_identical"] = all(k in b and torch.equal(a[k][skip[k]:], b[k][skip[k]:]) for k in a)
            r["roundtrip_unread_rows_zero"] = all(not b[k][:n].any() for k, n in skip.items() if n and k in b)
            small = AutoModelForCausalLM.from_pretrained(str(src)).eval()
            wide = AutoModelForCausalLM.from_pretrained(str(out / f"{family}-wide-hf")).eval()
            tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(5))
            with torch.no_grad():
                ls, lw = small(tokens).logits, wide(tokens).logits
            r["exported_wide_hidden"] = wide.config.hidden_size if hasattr(wide.config, "hidden_size") else None
            r["exported_wide_rel"] = ((ls - lw).abs().max() / ls.abs().max()).item()
            two_step, one_step = safetensors_dir(out / f"{family}-wide-hf"), safetensors_dir(out / f"{family}-hf2hf")
            r["hf2hf_equals_two_step"] = sorted(two_step) == sorted(one_step) and all(
                torch.equal(two_step[k], one_step[k]) for k in two_step)
            r["hf2hf_files"] = len(list((out / f"{family}-hf2hf").glob("*.safetensors")))
            for name in ("hf2hf", "hf2hf-deep"):
                grown = AutoModelForCausalLM.from_pretrained(str(out / f"{family}-{name}")).eval()
                with torch.no_grad():
                    lg = grown(tokens).logits
                r[f"{name}_rel"] = ((ls - lg).abs().max() / ls.abs().max()).item()
                r[f"{name}_layers"] = grown.config.num_hidden_layers
        dist.barrier()
    results["bf16"] = bf16_case(out, rt)
    results["olmo-tied"] = olmo_tied_case(out, rt)
    if rt.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()

