"""Runs llama.cpp's convert_hf_to_gguf.py unchanged, except that the BPE pre-tokenizer
check (a hash over known tokenizers) is told "gpt-2" for our ad-hoc benchmark tokenizer,
which no real model uses; tensor conversion is untouched."""
import runpy, sys  # usage: convert_anchor.py LLAMA_CPP_SRC MODEL_DIR [convert args]
SRC = sys.argv.pop(1)
sys.path.insert(0, SRC + "/gguf-py")
sys.path.insert(0, SRC)
import conversion.base as base
for name in dir(base):
    cls = getattr(base, name)
    if isinstance(cls, type) and hasattr(cls, "get_vocab_base_pre"):
        cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
runpy.run_path(SRC + "/convert_hf_to_gguf.py", run_name="__main__")
