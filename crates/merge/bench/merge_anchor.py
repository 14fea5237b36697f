"""PEFT merge_and_unload + save_pretrained (what users run before convert_hf_to_gguf.py)."""
import sys, shutil, torch, transformers, peft
base = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
m = peft.PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3], safe_serialization=True)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(f"{sys.argv[1]}/{f}", f"{sys.argv[3]}/{f}")
