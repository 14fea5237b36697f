"""Test fixtures and oracles for lora-merge, run by the Rust tests through $LORA_TRAINER_PYTHON.

Every command prints one JSON line on stdout. Subcommands:
  model OUT --arch llama|qwen2|mistral --dims h,l,nh,kv,inter,vocab [--tie] [--dtype float32|bfloat16|float16]
        [--llama3-rope] [--seed N]
      A random-init model in Hugging Face layout made by transformers itself, with a byte-level BPE
      tokenizer trained by `tokenizers` and a chat template.
  adapter MODEL OUT [--targets q_proj,v_proj] [--r 8] [--alpha 16] [--rslora] [--dora] [--seed N]
        [--modules-to-save lm_head] [--alpha-pattern k=v,...] [--rank-pattern k=v,...] [--embed]
      A PEFT LoRA adapter with random (non-zero) A and B, saved by PEFT; OUT/peft_merged holds PEFT's
      merge_and_unload() result (the parity oracle) and OUT/logits.json the logits of base+adapter.
  logits MODEL_DIR IDS_JSON OUT_JSON [--adapter DIR]
      Logits of transformers (optionally + PEFT adapter) for the given token ids.
  torch-load FILE OUT.safetensors
      torch.load(FILE, weights_only=True) and re-save as safetensors (so Rust compares bytes).
  combine MODEL OUT --adapters d1,d2 --weights w1,w2 --type T [--density D] [--svd-rank R]
      PEFT add_weighted_adapter; saves the combined adapter (the oracle for our combination).
"""
import argparse, json, os, random, sys

def corpus(n=3000, seed=0):
    rnd = random.Random(seed)
    words = ("select from where group by order count sum avg customers orders products employees offices "
             "payments name city country price quantity total date status credit limit sales rep the a of "
             "to and is list show find how many which top most least each per between").split()
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(5, 40))) for _ in range(n)]

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

def cmd_model(a):
    import torch, transformers
    from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
    os.makedirs(a.out, exist_ok=True)
    h, l, nh, kv, inter, voc = (int(x) for x in a.dims.split(","))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=voc, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), tr)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    torch.manual_seed(a.seed)
    common = dict(hidden_size=h, num_hidden_layers=l, num_attention_heads=nh, num_key_value_heads=kv,
                  intermediate_size=inter, vocab_size=voc, max_position_embeddings=512, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=a.tie,
                  initializer_range=a.init_range)
    if a.arch == "llama":
        rope = dict(rope_theta=10000.0)
        if a.llama3_rope:
            rope = dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64})
        cfg = transformers.LlamaConfig(**rope, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif a.arch == "qwen2":
        cfg = transformers.Qwen2Config(rope_theta=1000000.0, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
        # random q/k/v biases so that the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.02)
    else:
        cfg = transformers.MistralConfig(rope_theta=10000.0, sliding_window=None, **common)
        model = transformers.MistralForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms so that norm handling is tested
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, a.dtype))
    model.save_pretrained(a.out, safe_serialization=True)
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "add_bos_token": True, "tokenizer_class": "PreTrainedTokenizerFast",
                   "chat_template": CHAT_TEMPLATE}, f)
    with open(os.path.join(a.out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
    print(json.dumps({"out": a.out, "params": sum(p.numel() for p in model.parameters()),
                      "vocab_in_tokenizer": tok.get_vocab_size()}))

def _pairs(s, conv):
    out = {}
    if s:
        for kv in s.split(","):
            k, v = kv.split("=")
            out[k] = conv(v)
    return out

PROMPTS = [[1, 5, 17, 33, 60, 7, 9, 12], [1, 40, 41, 42, 43, 44]]

def _logits(model, prompts=PROMPTS):
    import torch
    out = []
    with torch.no_grad():
        for ids in prompts:
            out.append(model(torch.tensor([ids])).logits[0].float().tolist())
    return out

def cmd_adapter(a):
    import torch, transformers, peft
    torch.manual_seed(a.seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    targets = a.targets.split(",")
    if a.embed:
        targets.append("embed_tokens")
    cfg = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, target_modules=targets, use_rslora=a.rslora,
                          use_dora=a.dora, init_lora_weights=False, task_type="CAUSAL_LM",
                          modules_to_save=a.modules_to_save.split(",") if a.modules_to_save else None,
                          alpha_pattern=_pairs(a.alpha_pattern, float), rank_pattern=_pairs(a.rank_pattern, int))
    pm = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, a.init_std)
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.02)
    pm.save_pretrained(a.out)
    pm.eval()
    logits = _logits(pm)
    merged = pm.merge_and_unload()
    merged.save_pretrained(os.path.join(a.out, "peft_merged"), safe_serialization=True)
    with open(os.path.join(a.out, "logits.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "logits": logits, "merged_logits": _logits(merged)}, f)
    print(json.dumps({"out": a.out}))

def cmd_logits(a):
    import torch, transformers, peft
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    if a.adapter:
        model = peft.PeftModel.from_pretrained(model, a.adapter)
    model.eval()
    prompts = json.load(open(a.ids))
    json.dump({"logits": _logits(model, prompts)}, open(a.out_json, "w"))
    print(json.dumps({"ok": True}))

def cmd_torch_load(a):
    import torch
    from safetensors.torch import save_file
    sd = torch.load(a.file, weights_only=True)
    info = {k: [str(v.dtype), list(v.shape), list(v.stride()), v.storage_offset()] for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, a.out)
    mm = torch.load(a.file, weights_only=True, mmap=True)
    same = all(torch.equal(mm[k], sd[k]) for k in sd)
    print(json.dumps({"type": type(sd).__name__, "tensors": info, "mmap_equal": same}))

def cmd_combine(a):
    import torch, transformers, peft
    torch.manual_seed(a.seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    names = []
    pm = None
    for i, d in enumerate(a.adapters.split(",")):
        name = f"a{i}"
        names.append(name)
        if pm is None:
            pm = peft.PeftModel.from_pretrained(base, d, adapter_name=name)
        else:
            pm.load_adapter(d, adapter_name=name)
    kw = {}
    if a.density is not None:
        kw["density"] = a.density
    if a.svd_rank is not None:
        kw["svd_rank"] = a.svd_rank
    pm.add_weighted_adapter(names, [float(w) for w in a.weights.split(",")], "combined",
                            combination_type=a.type, **kw)
    pm.set_adapter("combined")
    for n in names:
        pm.delete_adapter(n)
    pm.save_pretrained(a.out)
    # PEFT saves a named adapter in a sub-folder
    print(json.dumps({"out": a.out}))

def cmd_gguf_read(a):
    import numpy as np, gguf
    from safetensors.numpy import save_file
    r = gguf.GGUFReader(a.file)
    fields = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        types = [t.name for t in f.types]
        v = f.contents()
        if isinstance(v, list) and len(v) > 8:
            v = {"len": len(v), "head": v[:4]}
        fields[k] = {"types": types, "value": v}
    tensors, arrays = [], {}
    for t in r.tensors:
        tensors.append({"name": t.name, "type": t.tensor_type.name, "ne": [int(x) for x in t.shape],
                        "offset": int(t.data_offset)})
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        arrays[t.name] = np.ascontiguousarray(arr.reshape([int(x) for x in reversed(t.shape)]))
    if a.out:
        save_file(arrays, a.out)
    print(json.dumps({"fields": fields, "tensors": tensors, "alignment": r.alignment}))

def cmd_llama_logits(a):
    import numpy as np, llama_cpp
    import llama_cpp.llama_cpp as lc
    # The CPU backend's weight repacking (extra buffer types: AMX/AVX-512 kernels) crashes on
    # Q8_0 models on this machine, whoever wrote the file (llama-quantize's own Q8_0 output
    # too); the plain ggml kernels are the reference path, so repacking is turned off.
    orig = lc.llama_model_default_params
    def params():
        p = orig()
        p.use_extra_bufts = False
        return p
    lc.llama_model_default_params = params
    prompts = json.load(open(a.ids))
    kw = dict(model_path=a.gguf, n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    if a.lora:
        kw["lora_path"] = a.lora
    llm = llama_cpp.Llama(**kw)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.asarray(llm.scores[: len(ids)], dtype=np.float32).tolist())
    meta = dict(llm.metadata)
    json.dump({"logits": out, "n_vocab": llm.n_vocab(), "metadata_keys": sorted(meta)}, open(a.out_json, "w"))
    print(json.dumps({"ok": True, "n_vocab": llm.n_vocab()}))

def cmd_llama_quantize(a):
    import ctypes, llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[a.ftype]
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(a.src.encode(), a.dst.encode(), ctypes.byref(p))
    print(json.dumps({"rc": rc}))

def cmd_suite(a):
    """All fixtures of the Rust integration tests in one process (Python start-up is slow)."""
    import types
    out = a.out
    def ns(**kw):
        return types.SimpleNamespace(**kw)
    base = dict(arch="llama", dims="256,2,4,2,512,1024", tie=False, dtype="float32", llama3_rope=False, seed=0,
                init_range=0.05)
    adapter = dict(targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", r=8, alpha=16.0,
                   rslora=False, dora=False, embed=False, seed=0, modules_to_save="", alpha_pattern="",
                   rank_pattern="", init_std=0.05)
    cmd_model(ns(**dict(base, out=f"{out}/llama")))
    cmd_adapter(ns(**dict(adapter, model=f"{out}/llama", out=f"{out}/a_plain")))
    cmd_adapter(ns(**dict(adapter, model=f"{out}/llama", out=f"{out}/a_rs", rslora=True, alpha_pattern="q_proj=32",
                          rank_pattern="v_proj=4", seed=1)))
    cmd_adapter(ns(**dict(adapter, model=f"{out}/llama", out=f"{out}/a_dora", dora=True, targets="q_proj,v_proj",
                          modules_to_save="lm_head", seed=2)))
    cmd_adapter(ns(**dict(adapter, model=f"{out}/llama", out=f"{out}/a_embed", embed=True, targets="q_proj", seed=3)))
    cmd_adapter(ns(**dict(adapter, model=f"{out}/llama", out=f"{out}/a_second", seed=4)))
    cmd_model(ns(**dict(base, out=f"{out}/qwen", arch="qwen2", tie=True, dtype="bfloat16")))
    cmd_adapter(ns(**dict(adapter, model=f"{out}/qwen", out=f"{out}/q_plain", seed=5)))

def cmd_combine_many(a):
    """PEFT add_weighted_adapter for several combination types: OUT/<type>/ each."""
    import torch, transformers, peft
    base = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    names, pm = [], None
    for i, d in enumerate(a.adapters.split(",")):
        name = f"a{i}"
        names.append(name)
        if pm is None:
            pm = peft.PeftModel.from_pretrained(base, d, adapter_name=name)
        else:
            pm.load_adapter(d, adapter_name=name)
    weights = [float(w) for w in a.weights.split(",")]
    for spec in a.types.split(","):
        t, _, dens = spec.partition(":")
        kw = {"density": float(dens)} if dens else {}
        new = f"c_{t}"
        pm.add_weighted_adapter(names, weights, new, combination_type=t, **kw)
        pm.save_pretrained(os.path.join(a.out, t), selected_adapters=[new])
    print(json.dumps({"out": a.out}))

def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model"); m.add_argument("out"); m.add_argument("--arch", default="llama")
    m.add_argument("--dims", default="256,2,4,2,512,1024"); m.add_argument("--tie", action="store_true")
    m.add_argument("--dtype", default="float32"); m.add_argument("--llama3-rope", action="store_true")
    m.add_argument("--seed", type=int, default=0); m.add_argument("--init-range", type=float, default=0.02)
    d = sub.add_parser("adapter"); d.add_argument("model"); d.add_argument("out")
    d.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    d.add_argument("--r", type=int, default=8); d.add_argument("--alpha", type=float, default=16)
    d.add_argument("--rslora", action="store_true"); d.add_argument("--dora", action="store_true")
    d.add_argument("--embed", action="store_true"); d.add_argument("--seed", type=int, default=0)
    d.add_argument("--modules-to-save", default=""); d.add_argument("--alpha-pattern", default="")
    d.add_argument("--rank-pattern", default=""); d.add_argument("--init-std", type=float, default=0.05)
    g = sub.add_parser("logits"); g.add_argument("model"); g.add_argument("ids"); g.add_argument("out_json")
    g.add_argument("--adapter")
    t = sub.add_parser("torch-load"); t.add_argument("file"); t.add_argument("out")
    c = sub.add_parser("combine"); c.add_argument("model"); c.add_argument("out")
    c.add_argument("--adapters", required=True); c.add_argument("--weights", required=True)
    c.add_argument("--type", required=True); c.add_argument("--density", type=float)
    c.add_argument("--svd-rank", type=int); c.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("gguf-read"); r.add_argument("file"); r.add_argument("--out")
    ll = sub.add_parser("llama-logits"); ll.add_argument("gguf"); ll.add_argument("ids"); ll.add_argument("out_json")
    ll.add_argument("--lora")
    q = sub.add_parser("llama-quantize"); q.add_argument("src"); q.add_argument("dst"); q.add_argument("ftype")
    cm = sub.add_parser("combine-many"); cm.add_argument("model"); cm.add_argument("out")
    cm.add_argument("--adapters", required=True); cm.add_argument("--weights", required=True)
    cm.add_argument("--types", required=True)
    su = sub.add_parser("suite"); su.add_argument("out")
    a = ap.parse_args()
    {"model": cmd_model, "adapter": cmd_adapter, "logits": cmd_logits, "torch-load": cmd_torch_load,
     "combine": cmd_combine, "gguf-read": cmd_gguf_read, "llama-logits": cmd_llama_logits,
     "llama-quantize": cmd_llama_quantize, "suite": cmd_suite, "combine-many": cmd_combine_many}[a.cmd](a)

if __name__ == "__main__":
    main()
