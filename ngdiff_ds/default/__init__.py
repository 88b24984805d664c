"""The embedded default: a demo, not the library. A synthetic TOFU/MUSE-style benchmark
(``synthetic``), a tokenizer trained on it (``tokenizer``), and the tiny Llama models
fine-tuned on it, built once and cached (``assets``)."""
