"""Model loading, built-in smoke-test models, the encode / denoise / decode stages, CFG hooks."""
