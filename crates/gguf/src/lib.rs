//! GGUF reader and writer; tiny and 20b-shaped random gpt-oss models; HF checkpoint conversion; hub downloads.
